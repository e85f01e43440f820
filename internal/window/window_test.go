package window_test

import (
	"bytes"
	"testing"

	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/window"
)

// TestConformance runs the conformance suite on a window onto a disk
// with no capabilities, so the fallbacks of the disk apply through it.
func TestConformance(t *testing.T) {
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i * 31)
	}
	w := window.New(disktest.NewMemory(data, false), 1<<20, 1<<20+4096, false)
	disktest.Check(t, w, bytes.Clone(data[1<<20:2<<20+4096]))
	if !bytes.Equal(data[:1<<20], func() []byte {
		b := make([]byte, 1<<20)
		for i := range b {
			b[i] = byte(i * 31)
		}
		return b
	}()) {
		t.Fatal("writes through the window reached outside it")
	}
}
