package format_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/format/zstd"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/newimage"
	"go.uber.org/goleak"
)

// TestGoldenRaw opens the raw golden image made by testdata/gen.sh and
// checks it against its recorded sha256.
func TestGoldenRaw(t *testing.T) {
	const path = "../testdata/raw/pattern.img"
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := os.ReadFile(path + ".sha256")
	if err != nil {
		t.Fatal(err)
	}
	if got := sha256.Sum256(want); hex.EncodeToString(got[:]) != strings.TrimSpace(string(sum)) {
		t.Fatalf("%s does not match its .sha256: regenerate with testdata/gen.sh", path)
	}
	d, err := format.Open(path, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if f := diskserve.Describe(d).Format; f != "raw" {
		t.Fatalf("opened as %q", f)
	}
	disktest.Check(t, d, want)
}

// TestNeverRaw opens images whose magic names a format but which that
// format cannot open: each must be refused as its format, never served as
// raw (which would hand its metadata to a guest as disk content).
func TestNeverRaw(t *testing.T) {
	composite := filepath.Join(t.TempDir(), "c.img")
	if err := os.WriteFile(composite, []byte("composite_disk\x1d\x08\x01"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, format, msg string }{
		{"../testdata/zstd/plain.zst", "zstd", "no seek table"},
		{composite, "composite", "bad spec"},
	} {
		t.Run(tc.format, func(t *testing.T) {
			d, err := format.Open(tc.path, diskserve.Options{ReadOnly: true})
			if err == nil {
				d.Close()
				t.Fatalf("%s opened as %q", tc.path, diskserve.Describe(d).Format)
			}
			var fe *diskserve.FormatError
			if !errors.As(err, &fe) || fe.Format != tc.format || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Open(%s) = %v, want a %s error saying %q", tc.path, err, tc.format, tc.msg)
			}
		})
	}
}

// TestSniffQcow2 opens the qcow2 conversion of the raw golden image
// without naming its format: it must be found to be qcow2 and read the
// same bytes.
func TestSniffQcow2(t *testing.T) {
	testSniff(t, "../testdata/qcow2/pattern.qcow2", "qcow2")
}

// TestSniffSparse is the same for img2simg's conversion of it.
func TestSniffSparse(t *testing.T) {
	testSniff(t, "../testdata/sparse/pattern.simg", "android-sparse")
}

func testSniff(t *testing.T, path, wantFormat string) {
	want, err := os.ReadFile("../testdata/raw/pattern.img")
	if err != nil {
		t.Fatal(err)
	}
	d, err := format.Open(path, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if f := diskserve.Describe(d).Format; f != wantFormat {
		t.Fatalf("opened as %q", f)
	}
	disktest.Check(t, d, want)
}

func TestAllRawLast(t *testing.T) {
	all := format.All()
	if all[len(all)-1].Name != "raw" {
		t.Fatalf("raw is not the last format: %v", format.Names())
	}
	seen := map[string]bool{}
	for _, f := range all {
		if seen[f.Name] {
			t.Fatalf("format %q listed twice", f.Name)
		}
		seen[f.Name] = true
	}
}

// TestOpenReadCloseCycles opens, reads and closes an image of every
// format 100 times, reading whole frames and clusters so that read-ahead
// starts where a format has it; after each Close no goroutine of the image
// is left (and TestMain checks the whole package).
func TestOpenReadCloseCycles(t *testing.T) {
	dir := t.TempDir()
	src := disktest.NewMemory(bytes.Repeat([]byte("cycle after cycle, "), 4<<20/19), true)
	images := map[string]string{"raw": "../testdata/raw/pattern.img", "qcow2": "../testdata/qcow2/pattern.qcow2", "android-sparse": "../testdata/sparse/pattern.simg"}
	for _, f := range []diskserve.Format{zstd.Format, composite.Format} {
		path := filepath.Join(dir, "cycle."+f.Name)
		if err := newimage.Convert(context.Background(), src, path, newimage.Target{Format: f}, nil); err != nil {
			t.Fatal(err)
		}
		images[f.Name] = path
	}
	p := make([]byte, 1<<20)
	for name, path := range images {
		before := goleak.IgnoreCurrent()
		for i := range 100 {
			d, err := format.Open(path, diskserve.Options{ReadOnly: true})
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			for off := int64(0); off < min(d.Size(), 2<<20); off += int64(len(p)) {
				if _, err := d.ReadAt(p, off); err != nil && err != io.EOF {
					t.Fatalf("%s: read at %d: %v", name, off, err)
				}
			}
			if err := d.Close(); err != nil {
				t.Fatalf("%s: close: %v", name, err)
			}
			if i%10 == 9 {
				if err := goleak.Find(before); err != nil {
					t.Fatalf("%s, after %d cycles: %v", name, i+1, err)
				}
			}
		}
	}
}
