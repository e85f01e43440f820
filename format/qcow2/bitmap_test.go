package qcow2_test

import (
	"path/filepath"
	"slices"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/testtool"
)

// TestBitmapsKeptByWrites is the libvirt flow on the image itself: bitmaps
// that qemu-img added (enabled at two granularities, and one disabled),
// then writes by qemu and by diskserve; qemu reads exactly the ranges both
// wrote as dirty in the enabled bitmaps, nothing in the disabled one, and
// the image checks clean.
func TestBitmapsKeptByWrites(t *testing.T) {
	img := filepath.Join(t.TempDir(), "b.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	testtool.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	testtool.Run(t, "qemu-img", "bitmap", "--add", "-g", "4096", img, "b1")
	testtool.Run(t, "qemu-img", "bitmap", "--add", "--disable", img, "b2")
	qemuIO(t, img, "qcow2", "write 0 4k")

	d := openRW(t, img)
	if flags := testtool.BitmapFlags(t, img); !slices.Contains(flags["b0"], "in-use") || slices.Contains(flags["b2"], "in-use") {
		t.Errorf("while open for writing, qemu-img info lists %v; want b0 and b1 in use, b2 not", flags)
	}
	if _, err := d.WriteAt(make([]byte, 10), 1<<20+100); err != nil {
		t.Fatal(err)
	}
	if err := diskserve.WriteZeroes(d, 8<<20, 128<<10, diskserve.ZeroMayUnmap); err != nil {
		t.Fatal(err)
	}
	if err := diskserve.PunchHole(d, 16<<20+4096, 4096); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}

	flags := testtool.BitmapFlags(t, img)
	if !slices.Equal(flags["b0"], []string{"auto"}) || !slices.Equal(flags["b1"], []string{"auto"}) || len(flags["b2"]) != 0 {
		t.Errorf("after close, qemu-img info lists %v; want b0 and b1 auto, b2 with no flag", flags)
	}
	testtool.QemuCheck(t, img)
	ro := openFile(t, img)
	if r, err := ro.(diskserve.Checker).Check(diskserve.RepairNone); err != nil || r.Corruptions+r.Leaks != 0 {
		t.Errorf("diskserve check: %+v, %v", r, err)
	}
	ro.Close()
	r := func(start, end int64) testtool.Range { return testtool.Range{Start: start, End: end} }
	for _, tc := range []struct {
		name string
		want []testtool.Range
	}{
		{"b0", []testtool.Range{r(0, 64<<10), r(1<<20, 1<<20+64<<10), r(8<<20, 8<<20+128<<10), r(16<<20, 16<<20+64<<10)}},
		{"b1", []testtool.Range{r(0, 4096), r(1<<20, 1<<20+4096), r(8<<20, 8<<20+128<<10), r(16<<20+4096, 16<<20+8192)}},
		{"b2", nil},
	} {
		got, err := testtool.QemuDirtyRanges(t, img, tc.name)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("bitmap %s: qemu reads %v dirty, want %v", tc.name, got, tc.want)
		}
	}

	// Opened again, written and left without Close (as after a crash):
	// qemu takes the enabled bitmaps for inconsistent.
	d = openRW(t, img)
	if _, err := d.WriteAt(make([]byte, 512), 32<<20); err != nil {
		t.Fatal(err)
	}
	if err := diskserve.Flush(d); err != nil {
		t.Fatal(err)
	}
	flags = testtool.BitmapFlags(t, img)
	if !slices.Contains(flags["b0"], "in-use") || slices.Contains(flags["b2"], "in-use") {
		t.Errorf("after a crash, qemu-img info lists %v; want b0 and b1 in use, b2 not", flags)
	}
	if _, err := testtool.QemuDirtyRanges(t, img, "b0"); err == nil {
		t.Errorf("qemu-nbd -B b0 serves a bitmap left in use by a crash")
	}
	if got, err := testtool.QemuDirtyRanges(t, img, "b2"); err != nil || len(got) != 0 {
		t.Errorf("the disabled bitmap after a crash: %v, %v; want it clean and usable", got, err)
	}
	d.Close()
}
