package compare_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: every
// goroutine a disk, engine, exporter or cache starts is stopped and waited
// for by its Close.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
