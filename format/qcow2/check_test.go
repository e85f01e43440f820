package qcow2_test

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/testtool"
)

// refcountOffset returns where the 16-bit refcount of host cluster k is
// stored in an image with one refcount block.
func refcountOffset(t *testing.T, b []byte, k int64) int64 {
	t.Helper()
	rt := int64(binary.BigEndian.Uint64(b[48:]))
	rb := int64(binary.BigEndian.Uint64(b[rt:]))
	return rb + 2*k
}

// qemuCheckCounts returns qemu-img check's counts of corruptions and leaks.
func qemuCheckCounts(t *testing.T, img string) (corruptions, leaks int64) {
	t.Helper()
	out, _ := exec.Command(testtool.Need(t, "qemu-img"), "check", "--output=json", img).Output()
	var res struct{ Corruptions, Leaks int64 }
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("qemu-img check: %v: %s", err, out)
	}
	return res.Corruptions, res.Leaks
}

// TestCheckAgreesWithQemu breaks refcounts on purpose and requires Check
// to find what qemu-img check finds, and its repairs to leave an image
// qemu-img check calls clean.
func TestCheckAgreesWithQemu(t *testing.T) {
	for _, tc := range []struct {
		name    string
		breakIt func(b []byte, rc func(k int64) int64)
		repair  diskserve.Repair
	}{
		{"clean", func([]byte, func(int64) int64) {}, diskserve.RepairNone},
		{"leak", func(b []byte, rc func(int64) int64) { binary.BigEndian.PutUint16(b[rc(5):], 2) }, diskserve.RepairLeaks},
		{"refcount too low", func(b []byte, rc func(int64) int64) { binary.BigEndian.PutUint16(b[rc(5):], 0) }, diskserve.RepairAll},
		{"L2 table unreferenced", func(b []byte, rc func(int64) int64) { binary.BigEndian.PutUint16(b[rc(4):], 0) }, diskserve.RepairAll},
		{"leak past the data", func(b []byte, rc func(int64) int64) { binary.BigEndian.PutUint16(b[rc(6):], 1) }, diskserve.RepairLeaks},
		{"L2 entry past the end of the file", func(b []byte, rc func(int64) int64) {
			// Guest cluster 1 now points at host cluster 1000, far past
			// the end, with no refcount.
			binary.BigEndian.PutUint64(b[4*65536+8:], 1<<63|1000*65536)
		}, diskserve.RepairNone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := create(t, t.TempDir(), "16M")
			qemuIO(t, img, "qcow2", "write -P 7 0 64k") // L2 table in cluster 4, data in 5
			testtool.Run(t, "qemu-img", "resize", img, "32M")
			b, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			if len(b) < 7*65536 {
				b = append(b, make([]byte, 7*65536-len(b))...) // room for cluster 6
			}
			tc.breakIt(b, func(k int64) int64 { return refcountOffset(t, b, k) })
			if err := os.WriteFile(img, b, 0o644); err != nil {
				t.Fatal(err)
			}
			wantCorrupt, wantLeaks := qemuCheckCounts(t, img)
			if tc.name != "clean" && wantCorrupt+wantLeaks == 0 {
				t.Fatal("qemu-img check finds nothing wrong: the damage missed")
			}
			d := openFile(t, img)
			r, err := diskserve.Check(d, diskserve.RepairNone)
			if err != nil {
				t.Fatal(err)
			}
			if r.Corruptions != wantCorrupt || r.Leaks != wantLeaks {
				t.Fatalf("Check found %d corruptions and %d leaks, qemu-img %d and %d\n%q", r.Corruptions, r.Leaks, wantCorrupt, wantLeaks, r.Messages)
			}
			d.Close()
			if tc.repair == diskserve.RepairNone {
				return
			}
			d = openRW(t, img)
			r, err = diskserve.Check(d, tc.repair)
			if err != nil {
				t.Fatal(err)
			}
			if r.Corruptions != r.CorruptionsFixed || r.Leaks != r.LeaksFixed {
				t.Fatalf("after repair: %+v", r)
			}
			d.Close()
			testtool.QemuCheck(t, img)
		})
	}
}

// TestCheckRepairNeedsWritable refuses to repair an image open read-only.
func TestCheckRepairNeedsWritable(t *testing.T) {
	d := openFile(t, filepath.Join("../../testdata/qcow2", "pattern.qcow2"))
	if _, err := diskserve.Check(d, diskserve.RepairLeaks); err == nil {
		t.Fatal("repair on a read-only image succeeded")
	}
	if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions+r.Leaks != 0 {
		t.Fatalf("check of a golden image: %+v, %v", r, err)
	}
}

// TestCheckSubclusterBitmaps breaks the subcluster bitmap of an extended
// L2 entry (a subcluster both allocated and zero) and expects check to
// report it, as qemu-img check does.
func TestCheckSubclusterBitmaps(t *testing.T) {
	img := filepath.Join(t.TempDir(), "ext.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", img, "1M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4k", img)
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	l2 := binary.BigEndian.Uint64(b[binary.BigEndian.Uint64(b[40:]):]) & 0x00ff_ffff_ffff_fe00
	bm := binary.BigEndian.Uint64(b[l2+8:])
	binary.BigEndian.PutUint64(b[l2+8:], bm|bm<<32) // allocated and zero
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
	d := openFile(t, img)
	r, err := diskserve.Check(d, diskserve.RepairNone)
	if err != nil || r.Corruptions == 0 {
		t.Fatalf("check of a bitmap with subclusters both allocated and zero: %+v, %v", r, err)
	}
}
