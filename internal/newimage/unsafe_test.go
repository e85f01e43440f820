package newimage

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/raw"
)

// flushCounter counts the flushes of a file the new image is written to.
type flushCounter struct {
	diskserve.Passthrough
	n *atomic.Int32
}

func (f flushCounter) Flush() error {
	f.n.Add(1)
	return f.Passthrough.Flush()
}

// TestUnsafeSyncsNothing writes into existing images of formats that
// sync their own metadata (block tables written after their data), as
// convert -n does, and counts the flushes that reach the image's file:
// none under Unsafe, as under qemu-img's unsafe cache mode, and some
// without it.
func TestUnsafeSyncsNothing(t *testing.T) {
	dir := t.TempDir()
	src, zero := filepath.Join(dir, "src.raw"), filepath.Join(dir, "zero.raw")
	data := make([]byte, 8<<20)
	if err := os.WriteFile(zero, data, 0o644); err != nil {
		t.Fatal(err)
	}
	for i := range data[:3<<20] {
		data[i] = byte(i/4096 + 1)
	}
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	convert := func(from, dst string, tg Target, into bool) {
		t.Helper()
		s, err := raw.OpenFile(from, true)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if into {
			err = ConvertInto(context.Background(), s, dst, tg, false, nil)
		} else {
			err = Convert(context.Background(), s, dst, tg, nil)
		}
		if err != nil {
			t.Fatalf("%s: %v", dst, err)
		}
	}
	for _, name := range []string{"vpc", "vdi", "vhdx", "vmdk", "qcow2"} {
		f, err := diskserve.LookupFormat(format.All(), name)
		if err != nil {
			t.Fatal(err)
		}
		for _, unsafe := range []bool{false, true} {
			dst := filepath.Join(t.TempDir(), "dst."+name)
			convert(zero, dst, Target{Format: f}, false)
			var flushes atomic.Int32
			open := func(path string, readOnly bool) (diskserve.DiskFile, error) {
				d, err := raw.OpenFile(path, readOnly)
				if err != nil || readOnly {
					return d, err
				}
				return flushCounter{diskserve.Passthrough{D: d}, &flushes}, nil
			}
			convert(src, dst, Target{Format: f, Unsafe: unsafe, Open: diskserve.Options{OpenFile: open}}, true)
			if got := flushes.Load(); (got == 0) != unsafe {
				t.Errorf("%s, unsafe %v: %d flushes reached the image's file", name, unsafe, got)
			}
			d, err := format.Open(dst, diskserve.Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			if err := diskserve.ReadFullAt(d, got, 0); err != nil || !bytes.Equal(got, data) {
				t.Errorf("%s, unsafe %v: the image does not read as the source (%v)", name, unsafe, err)
			}
			d.Close()
		}
	}
}
