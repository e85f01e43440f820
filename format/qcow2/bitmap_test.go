package qcow2_test

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/testtool"
)

// qemuBitmaps returns the flags of each bitmap as qemu-img info lists them,
// by name.
func qemuBitmaps(t *testing.T, img string) map[string][]string {
	t.Helper()
	out := testtool.Run(t, "qemu-img", "info", "-U", "--output=json", img)
	var info struct {
		Specific struct {
			Data struct {
				Bitmaps []struct {
					Name        string
					Flags       []string
					Granularity int64
				}
			}
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	m := map[string][]string{}
	for _, b := range info.Specific.Data.Bitmaps {
		m[b.Name] = b.Flags
	}
	return m
}

// qemuDirty returns the ranges qemu reads as dirty in bitmap name of img
// (qemu-nbd -B, read by nbdinfo --map), or the error qemu-nbd gives.
func qemuDirty(t *testing.T, img, name string) ([]testtool.Range, error) {
	t.Helper()
	testtool.Need(t, "nbdinfo")
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	out, err := exec.Command(testtool.Need(t, "qemu-nbd"), "--fork", "-r", "-f", "qcow2", "-B", name, "-k", sock, img).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("qemu-nbd: %v: %s", err, out)
	}
	out = testtool.Run(t, "nbdinfo", "--map=qemu:dirty-bitmap:"+name, "nbd+unix:///?socket="+sock)
	var dirty []testtool.Range
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		off, _ := strconv.ParseInt(f[0], 10, 64)
		n, _ := strconv.ParseInt(f[1], 10, 64)
		if f[2] == "1" {
			dirty = testtool.AddRange(dirty, off, n)
		}
	}
	return dirty, nil
}

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
	if flags := qemuBitmaps(t, img); !slices.Contains(flags["b0"], "in-use") || slices.Contains(flags["b2"], "in-use") {
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

	flags := qemuBitmaps(t, img)
	if !slices.Equal(flags["b0"], []string{"auto"}) || !slices.Equal(flags["b1"], []string{"auto"}) || len(flags["b2"]) != 0 {
		t.Errorf("after close, qemu-img info lists %v; want b0 and b1 auto, b2 with no flag", flags)
	}
	qemuCheck(t, img)
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
		got, err := qemuDirty(t, img, tc.name)
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
	flags = qemuBitmaps(t, img)
	if !slices.Contains(flags["b0"], "in-use") || slices.Contains(flags["b2"], "in-use") {
		t.Errorf("after a crash, qemu-img info lists %v; want b0 and b1 in use, b2 not", flags)
	}
	if _, err := qemuDirty(t, img, "b0"); err == nil {
		t.Errorf("qemu-nbd -B b0 serves a bitmap left in use by a crash")
	}
	if got, err := qemuDirty(t, img, "b2"); err != nil || len(got) != 0 {
		t.Errorf("the disabled bitmap after a crash: %v, %v; want it clean and usable", got, err)
	}
	d.Close()
}
