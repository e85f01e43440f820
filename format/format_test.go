package format_test

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/disktest"
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
