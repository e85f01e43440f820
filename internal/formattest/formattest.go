// Package formattest holds the interop tests that every format qemu-img
// also reads and writes goes through: images qemu-img makes read byte for
// byte through diskserve; images diskserve makes and writes read the same
// through qemu-img and pass its check. Each format's tests call it with
// its subformats' options.
package formattest

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/newimage"
	"github.com/diskserve/diskserve/internal/testtool"
)

// A Variant is one subformat, as qemu-img's and diskserve's -o options
// (the same names).
type Variant struct {
	Name    string
	Options []string // "subformat=fixed"; may be empty
}

// Base writes a raw image of size bytes into dir, with data runs, zero
// runs and holes at odd offsets, and returns its path and content.
func Base(t testing.TB, dir string, size int64) (string, []byte) {
	t.Helper()
	want := make([]byte, size)
	rnd := rand.New(rand.NewPCG(uint64(size), 5))
	for off := int64(0); off < size; {
		n := min(size-off, 1+rnd.Int64N(3<<20))
		if rnd.IntN(3) == 0 {
			for k := off; k < off+n; k++ {
				want[k] = byte(rnd.Uint32() | 1)
			}
		}
		off += n
	}
	path := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(path, want, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, want
}

// open opens path with the built-in formats, as format, read-only or not.
func open(t testing.TB, path, fmtName string, readOnly bool) diskserve.DiskFile {
	t.Helper()
	d, err := format.Open(path, diskserve.Options{Format: fmtName, ReadOnly: readOnly})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// ReadsQemuImages converts a base image with qemu-img into each variant
// of fmtName and requires diskserve to read what qemu-img reads, to pass
// the conformance suite, to find the image's format by sniffing unless
// sniffed is false, and to report the data qemu-img maps as data.
func ReadsQemuImages(t *testing.T, fmtName string, size int64, sniffed bool, variants []Variant) {
	for _, v := range variants {
		t.Run(v.Name, func(t *testing.T) {
			dir := t.TempDir()
			base, _ := Base(t, dir, size)
			img := filepath.Join(dir, "img."+fmtName)
			args := []string{"convert", "-f", "raw", "-O", fmtName}
			for _, o := range v.Options {
				args = append(args, "-o", o)
			}
			testtool.Run(t, "qemu-img", append(args, base, img)...)
			want := testtool.QemuRaw(t, img, "-f", fmtName)
			name := fmtName
			if sniffed {
				name = ""
			}
			d := open(t, img, name, true)
			defer d.Close()
			if got := diskserve.Describe(d).Format; got != fmtName {
				t.Fatalf("opened as %q", got)
			}
			disktest.Check(t, d, want)
			CheckMap(t, d, img, fmtName)
		})
	}
}

// CheckMap requires diskserve to know at least the holes qemu-img map
// knows: every range d's extents call data, qemu-img calls data too. (The
// conformance suite checks that what d calls zero reads as zeroes.)
func CheckMap(t *testing.T, d diskserve.DiskFile, img, fmtName string) {
	t.Helper()
	qemuData := testtool.DataRanges(t, testtool.Run(t, "qemu-img", "map", "-f", fmtName, "--output=json", img))
	var ours []testtool.Range
	err := diskserve.WalkExtents(d, 0, d.Size(), func(e diskserve.Extent) bool {
		if e.Flags&diskserve.ExtentZero == 0 {
			ours = testtool.AddRange(ours, e.Off, e.Len)
		}
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range ours {
		covered := false
		for _, q := range qemuData {
			if q.Start <= o.Start && o.End <= q.End {
				covered = true
			}
		}
		if !covered {
			t.Fatalf("diskserve maps [%d, %d) as data, qemu-img does not; qemu-img's data: %v", o.Start, o.End, qemuData)
		}
	}
}

// WritesLikeQemu runs a random workload through diskserve on images
// qemu-img created and on images diskserve created, in each variant, and
// requires qemu-img to read the same bytes afterwards and (where it can
// check the format) to find no error; and diskserve's own check to be
// clean. size is the virtual size asked for; formats may round it up.
func WritesLikeQemu(t *testing.T, fmtName string, size int64, qemuChecks bool, variants []Variant) {
	for _, v := range variants {
		for _, maker := range []string{"qemu-img", "diskserve"} {
			t.Run(v.Name+"/"+maker, func(t *testing.T) {
				dir := t.TempDir()
				img := filepath.Join(dir, "img."+fmtName)
				if maker == "qemu-img" {
					args := []string{"create", "-q", "-f", fmtName}
					for _, o := range v.Options {
						args = append(args, "-o", o)
					}
					testtool.Run(t, "qemu-img", append(args, img, strconv.FormatInt(size, 10))...)
				} else {
					Create(t, img, fmtName, size, v.Options)
				}
				want := testtool.QemuRaw(t, img, "-f", fmtName)
				d := open(t, img, fmtName, false)
				disktest.Workload(t, d, want, 7, 300)
				if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions+r.Leaks != 0 {
					t.Fatalf("diskserve's own check: %v %q", err, r.Messages)
				}
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
				if qemuChecks {
					testtool.QemuCheck(t, img)
				}
				if got := testtool.QemuRaw(t, img, "-f", fmtName); !bytes.Equal(got, want) {
					t.Fatalf("qemu-img reads other bytes than diskserve wrote (first at %d)", firstDiff(got, want))
				}
				d = open(t, img, fmtName, false)
				defer d.Close()
				disktest.Check(t, d, want)
			})
		}
	}
}

// Create makes an empty image with diskserve's creator for fmtName.
func Create(t testing.TB, img, fmtName string, size int64, options []string) {
	t.Helper()
	f, o := target(t, fmtName, options)
	if err := newimage.Create(img, f, diskserve.CreateArgs{Size: size, Options: o}); err != nil {
		t.Fatal(err)
	}
}

// CreateChild makes a new image of fmtName at img over the backing file
// backing (relative to img, or absolute), of the same format, as
// `diskserve create -b` does.
func CreateChild(t testing.TB, img, fmtName, backing string) {
	t.Helper()
	f, _ := target(t, fmtName, nil)
	if err := newimage.Create(img, f, diskserve.CreateArgs{BackingFile: backing, BackingFormat: fmtName}); err != nil {
		t.Fatal(err)
	}
}

// Convert writes src into a new image of fmtName at img with diskserve.
func Convert(t testing.TB, src diskserve.DiskFile, img, fmtName string, options []string) {
	t.Helper()
	f, o := target(t, fmtName, options)
	if err := newimage.Convert(context.Background(), src, img, newimage.Target{Format: f, Options: o}, nil); err != nil {
		t.Fatal(err)
	}
}

// target returns the format called fmtName and the parsed -o options.
func target(t testing.TB, fmtName string, options []string) (diskserve.Format, diskserve.CreateOptions) {
	t.Helper()
	f, err := diskserve.LookupFormat(format.All(), fmtName)
	if err != nil {
		t.Fatal(err)
	}
	o, err := diskserve.ParseCreateOptions(options)
	if err != nil {
		t.Fatal(err)
	}
	return f, o
}

// ConvertsLikeQemu converts a base image with diskserve into each
// variant and requires qemu-img to read it back equal (qemu-img compare),
// to find no error where it checks the format, and to agree on the
// content (zeroes past the converted size where the format rounds up).
func ConvertsLikeQemu(t *testing.T, fmtName string, size int64, qemuChecks bool, variants []Variant) {
	for _, v := range variants {
		t.Run(v.Name, func(t *testing.T) {
			dir := t.TempDir()
			base, want := Base(t, dir, size)
			img := filepath.Join(dir, "img."+fmtName)
			Convert(t, disktest.NewMemory(want, true), img, fmtName, v.Options)
			if qemuChecks {
				testtool.QemuCheck(t, img)
			}
			got := testtool.QemuRaw(t, img, "-f", fmtName)
			if int64(len(got)) < size || !bytes.Equal(got[:size], want) || firstNonZero(got[size:]) >= 0 {
				t.Fatalf("qemu-img reads %d bytes, other than the %d converted", len(got), size)
			}
			if int64(len(got)) == size {
				testtool.Run(t, "qemu-img", "compare", "-q", "-f", "raw", "-F", fmtName, base, img)
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func firstNonZero(p []byte) int {
	for i, c := range p {
		if c != 0 {
			return i
		}
	}
	return -1
}

// Golden opens a golden image that testdata/gen.sh made from
// testdata/raw/pattern.img (found from a format's package directory),
// sniffing its format unless sniffed is false,
// and requires it to read as the pattern (and zeroes past it, where the
// format rounds the size up) and to pass the conformance suite.
func Golden(t *testing.T, path, fmtName string, sniffed bool) {
	t.Helper()
	pattern, err := os.ReadFile("../../testdata/raw/pattern.img")
	if err != nil {
		t.Fatal(err)
	}
	name := fmtName
	if sniffed {
		name = ""
	}
	d := open(t, path, name, true)
	defer d.Close()
	if got := diskserve.Describe(d).Format; got != fmtName {
		t.Fatalf("%s opened as %q", path, got)
	}
	if d.Size() < int64(len(pattern)) {
		t.Fatalf("%s: %d bytes, want at least %d", path, d.Size(), len(pattern))
	}
	want := make([]byte, d.Size())
	copy(want, pattern)
	disktest.Check(t, d, want)
}

// CheckContent runs the conformance suite on d, read-only, against want.
func CheckContent(t *testing.T, d diskserve.DiskFile, want []byte) {
	t.Helper()
	if d.ReadOnly() {
		disktest.Check(t, d, want)
		return
	}
	disktest.Check(t, readOnlyView{d}, want)
}

// readOnlyView shows a disk to the conformance suite as read-only, so that
// it reads without writing.
type readOnlyView struct{ diskserve.DiskFile }

func (readOnlyView) ReadOnly() bool { return true }
func (v readOnlyView) WriteAt(p []byte, off int64) (int, error) {
	return 0, diskserve.ErrReadOnly
}

// A Damage is one way to break a good image, and what the refusal must
// say.
type Damage struct {
	Name string
	Msg  string              // in the error
	Edit func([]byte) []byte // the damaged image from the good one's bytes

	// ReadOnlyOpens says that the damage is refused only for writing
	// (blocks sharing space): a read-only open succeeds and its check
	// reports a corruption.
	ReadOnlyOpens bool
}

// RefusesDamaged applies each damage to a copy of the image good and
// requires a read-write open as fmtName to fail with a format error of
// fmtName that names the file and says the damage's Msg.
func RefusesDamaged(t *testing.T, fmtName, good string, damages []Damage) {
	for _, dm := range damages {
		t.Run(dm.Name, func(t *testing.T) {
			b, err := os.ReadFile(good)
			if err != nil {
				t.Fatal(err)
			}
			img := filepath.Join(t.TempDir(), "bad."+fmtName)
			if err := os.WriteFile(img, dm.Edit(b), 0o644); err != nil {
				t.Fatal(err)
			}
			if dm.ReadOnlyOpens {
				d := open(t, img, fmtName, true)
				r, err := diskserve.Check(d, diskserve.RepairNone)
				d.Close()
				if err != nil || r.Corruptions == 0 {
					t.Fatalf("check found nothing: %v %+v", err, r)
				}
			}
			d, err := format.Open(img, diskserve.Options{Format: fmtName})
			if err == nil {
				d.Close()
				t.Fatal("opened")
			}
			var fe *diskserve.FormatError
			if !errors.As(err, &fe) || fe.Format != fmtName || !strings.Contains(err.Error(), dm.Msg) || !strings.Contains(err.Error(), img) {
				t.Fatalf("error %q: want a %s error naming %s and saying %q", err, fmtName, img, dm.Msg)
			}
		})
	}
}

// WritePattern opens the image at img for writing, writes 4 KiB of 0xd7
// at each of offs, into want as well, and closes it.
func WritePattern(t *testing.T, img string, want []byte, offs ...int) {
	t.Helper()
	d := open(t, img, "", false)
	p := bytes.Repeat([]byte{0xd7}, 4096)
	for _, off := range offs {
		if _, err := d.WriteAt(p, int64(off)); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}
