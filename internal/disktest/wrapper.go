package disktest

import (
	"testing"

	"github.com/diskserve/diskserve"
)

// CheckWrapper checks that w, a wrapper, implements every capability that
// wrappers must forward ([diskserve.Forwarded]), so that a capability
// added to the list fails every wrapper that does not pass it on; and
// that it maps host ranges ([diskserve.HostMapper]) only if mapsHost says
// it has chosen to, since a mapping lets requests bypass it.
func CheckWrapper(t *testing.T, w diskserve.DiskFile, mapsHost bool) {
	t.Helper()
	if _, ok := w.(diskserve.Wrapper); !ok {
		t.Errorf("%T is not a diskserve.Wrapper", w)
	}
	has := diskserve.Implemented(w)
	if missing := diskserve.Forwarded &^ has; missing != 0 {
		t.Errorf("%T does not forward %v", w, missing)
	}
	if got := has&diskserve.CanMapHost != 0; got != mapsHost {
		t.Errorf("%T maps host ranges: %v, want %v", w, got, mapsHost)
	}
}
