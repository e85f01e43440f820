package faultdisk

import (
	"testing"

	"github.com/diskserve/diskserve/internal/disktest"
)

// TestForwards holds the fault injector to the capability list: it
// forwards every capability and maps no host range, so that every request
// meets the faults.
func TestForwards(t *testing.T) {
	disktest.CheckWrapper(t, New(disktest.NewMemory(make([]byte, 4096), false)), false)
}
