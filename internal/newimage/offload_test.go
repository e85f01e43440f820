package newimage

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
)

// TestOffloadCopiesInKernel: from a raw file into a new one, offload
// copies a piece itself (copy_file_range) rather than leaving it to the copy
// through memory, and the piece arrives whole; where a disk maps nothing
// it copies nothing.
func TestOffloadCopiesInKernel(t *testing.T) {
	dir := t.TempDir()
	want := make([]byte, 3<<20)
	for i := range want {
		want[i] = byte(rand.IntN(256))
	}
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	if err := os.WriteFile(src, want, 0o644); err != nil {
		t.Fatal(err)
	}
	// A new, sparse target, as convert writes into. (Ranges of a target
	// in the page cache raw does not map for writing, and they are
	// copied through memory.)
	if err := os.WriteFile(dst, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(dst, int64(len(want))); err != nil {
		t.Fatal(err)
	}
	s, err := raw.OpenFile(src, true)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d, err := raw.OpenFile(dst, false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if done, err := offload(d, s, 1<<20, 1<<20+4321); !done || err != nil {
		t.Fatalf("offload between raw files: done %v, %v", done, err)
	}
	got := make([]byte, len(want))
	if err := diskserve.ReadFullAt(d, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[1<<20:2<<20+4321], want[1<<20:2<<20+4321]) || !diskserve.IsZero(got[:1<<20]) || !diskserve.IsZero(got[2<<20+4321:]) {
		t.Fatal("the offloaded piece is not exactly the source's")
	}
	// A disk that maps nothing onto a host file: nothing copied.
	if done, err := offload(diskserve.Passthrough{D: d}, s, 0, 4096); done || err != nil {
		t.Fatalf("offload into a disk that maps nothing: done %v, %v", done, err)
	}
}
