package vhd_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/vhd"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/formattest"
	"github.com/diskserve/diskserve/internal/testtool"
)

var (
	dynamic   = formattest.Variant{Name: "dynamic"}
	fixed     = formattest.Variant{Name: "fixed", Options: []string{"subformat=fixed"}}
	forced    = formattest.Variant{Name: "dynamic force_size", Options: []string{"force_size=on"}}
	fixedAzur = formattest.Variant{Name: "fixed force_size", Options: []string{"subformat=fixed,force_size=on"}}
)

// TestReadsQemuImages: VHDs qemu-img converted read byte for byte. Only
// dynamic disks are found by sniffing; fixed ones need -f vpc.
func TestReadsQemuImages(t *testing.T) {
	formattest.ReadsQemuImages(t, "vpc", 9<<20+12345, true, []formattest.Variant{dynamic, forced})
	formattest.ReadsQemuImages(t, "vpc", 9<<20+12345, false, []formattest.Variant{fixed, fixedAzur})
}

// TestWritesLikeQemu: random workloads on qemu-img's and diskserve's
// disks read back the same through qemu-img (which has no check for vpc).
func TestWritesLikeQemu(t *testing.T) {
	formattest.WritesLikeQemu(t, "vpc", 9<<20+512, false, []formattest.Variant{dynamic, fixed, forced})
}

// TestConvertsLikeQemu: diskserve's conversions compare equal in
// qemu-img, zeroes past the size where the geometry rounds it up.
func TestConvertsLikeQemu(t *testing.T) {
	formattest.ConvertsLikeQemu(t, "vpc", 9<<20+1536, false, []formattest.Variant{dynamic, fixed, forced, fixedAzur})
}

// TestSizesAgreeWithQemu: for sizes across the geometry's regimes, with
// and without force_size, diskserve and qemu-img give new disks the same
// virtual size and geometry.
func TestSizesAgreeWithQemu(t *testing.T) {
	for _, size := range []int64{1, 512, 1 << 20, 10<<20 + 7, 100 << 20, 127 << 30, 200 << 30} {
		for _, v := range []formattest.Variant{dynamic, forced, fixedAzur} {
			dir := t.TempDir()
			ours, theirs := filepath.Join(dir, "ours.vhd"), filepath.Join(dir, "theirs.vhd")
			formattest.Create(t, ours, "vpc", size, v.Options)
			args := []string{"create", "-q", "-f", "vpc"}
			for _, o := range v.Options {
				args = append(args, "-o", o)
			}
			testtool.Run(t, "qemu-img", append(args, theirs, strconv.FormatInt(size, 10))...)
			var infos [2]diskserve.Info
			for k, img := range []string{ours, theirs} {
				var qi struct {
					VirtualSize int64 `json:"virtual-size"`
				}
				if err := json.Unmarshal(testtool.Run(t, "qemu-img", "info", "-f", "vpc", "--output=json", img), &qi); err != nil {
					t.Fatal(err)
				}
				d, err := format.Open(img, diskserve.Options{Format: "vpc", ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				infos[k] = diskserve.Describe(d)
				d.Close()
				if infos[k].VirtualSize != qi.VirtualSize {
					t.Fatalf("%d bytes %v, %s: diskserve reads %d bytes, qemu-img %d", size, v.Options, filepath.Base(img), infos[k].VirtualSize, qi.VirtualSize)
				}
			}
			if infos[0].VirtualSize != infos[1].VirtualSize || infos[0].Specific["geometry"] != infos[1].Specific["geometry"] {
				t.Fatalf("%d bytes %v: diskserve makes %d bytes, geometry %v; qemu-img %d, %v", size, v.Options,
					infos[0].VirtualSize, infos[0].Specific["geometry"], infos[1].VirtualSize, infos[1].Specific["geometry"])
			}
		}
	}
}

func TestGolden(t *testing.T) {
	formattest.Golden(t, "../../testdata/vpc/pattern.vhd", "vpc", true)
	formattest.Golden(t, "../../testdata/vpc/pattern-fixed.vhd", "vpc", false)
}

// TestFixedNotProbed: a fixed VHD without -f opens as raw, footer and
// all, as in qemu: a guest can write a footer into a raw disk.
func TestFixedNotProbed(t *testing.T) {
	d, err := format.Open("../../testdata/vpc/pattern-fixed.vhd", diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if f := diskserve.Describe(d).Format; f != "raw" {
		t.Fatalf("probed as %q", f)
	}
}

// TestHostile opens damaged disks: each is refused with a vpc error
// naming the file and what is wrong.
func TestHostile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.vhd")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vpc", good, "8M")
	testtool.Run(t, "qemu-io", "-f", "vpc", "-c", "write -P 1 0 1M", "-c", "write -P 2 4M 1M", good)
	be32 := func(b []byte, off int, v uint32) {
		b[off], b[off+1], b[off+2], b[off+3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
	}
	formattest.RefusesDamaged(t, "vpc", good, []formattest.Damage{
		{Name: "huge table", Msg: "more than diskserve loads", Edit: func(b []byte) []byte { be32(b, 512+28, 0xfffffff0); return b }},
		{Name: "table too small", Msg: "do not hold the disk", Edit: func(b []byte) []byte { be32(b, 512+28, 1); return b }},
		{Name: "block size", Msg: "power of two", Edit: func(b []byte) []byte { be32(b, 512+32, 3000); return b }},
		{Name: "huge block size", Msg: "larger than diskserve supports", Edit: func(b []byte) []byte { be32(b, 512+32, 1<<30); return b }},
		{Name: "entry past the end", Msg: "truncated", Edit: func(b []byte) []byte { be32(b, 1536, 0x7fffffff); return b }},
		{Name: "entry over the headers", Msg: "over the image's headers", Edit: func(b []byte) []byte { be32(b, 1536, 1); return b }},
		{Name: "no dynamic header", Msg: "no dynamic disk header", Edit: func(b []byte) []byte { b[512] = 'x'; return b }},
		{Name: "differencing without a parent", Msg: "names no parent", Edit: func(b []byte) []byte { be32(b, 60, 4); return b }},
		{Name: "truncated", Msg: "truncated", Edit: func(b []byte) []byte { return b[:len(b)-1<<20] }},
		{Name: "shared space", Msg: "shares its space", Edit: func(b []byte) []byte { copy(b[1536+8:1536+12], b[1536:1536+4]); return b }, ReadOnlyOpens: true},
	})
}

func FuzzOpen(f *testing.F) {
	for _, img := range []string{"pattern.vhd", "pattern-fixed.vhd"} {
		b, err := os.ReadFile("../../testdata/vpc/" + img)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[:4096])
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { formattest.FuzzImage(t, vhd.Format, b) })
}

// TestDifferencing makes a differencing disk over a dynamic disk qemu-img
// wrote, with `create -b`, and requires it to read as its parent, to take
// a random workload while the parent stays unchanged, to read sectors
// whose bitmap bits are clear from the parent, and to refuse a parent
// that was replaced. qemu 7.2 reads differencing VHDs as if they had no
// parent, so the model here is the parent's bytes as qemu-img reads them.
func TestDifferencing(t *testing.T) {
	dir := t.TempDir()
	parent := filepath.Join(dir, "parent.vhd")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vpc", parent, "8M")
	testtool.Run(t, "qemu-io", "-f", "vpc", "-c", "write -P 0x61 0 3M", "-c", "write -P 0x62 5M 100k", parent)
	parentBytes := testtool.QemuRaw(t, parent, "-f", "vpc")
	child := filepath.Join(dir, "child.vhd")
	formattest.CreateChild(t, child, "vpc", "parent.vhd")

	d, err := format.Open(child, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	info := diskserve.Describe(d)
	if info.Specific["subformat"] != "differencing" || info.BackingFile != "parent.vhd" || info.Backing == nil {
		t.Fatalf("info %+v", info)
	}
	formattest.CheckContent(t, d, parentBytes)
	d.Close()

	want := bytes.Clone(parentBytes)
	d, err = format.Open(child, diskserve.Options{})
	if err != nil {
		t.Fatal(err)
	}
	disktest.Workload(t, d, want, 11, 200)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if got := testtool.QemuRaw(t, parent, "-f", "vpc"); !bytes.Equal(got, parentBytes) {
		t.Fatal("writes to the child changed the parent")
	}
	d, err = format.Open(child, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	formattest.CheckContent(t, d, want)
	d.Close()

	// Clear the bitmap bits of the first 12 sectors of the child's first
	// stored block: those sectors now read from the parent.
	b, err := os.ReadFile(child)
	if err != nil {
		t.Fatal(err)
	}
	tableOff := binary.BigEndian.Uint64(b[512+16:])
	block := -1
	for i := range 4 {
		if e := binary.BigEndian.Uint32(b[tableOff+uint64(i)*4:]); e != 0xFFFFFFFF {
			bm := int64(e) * 512
			b[bm], b[bm+1] = 0, 0x0F // sectors 0-11 clear, 12-15 present
			block = i
			break
		}
	}
	if block < 0 {
		t.Fatal("the workload stored no block in the first four")
	}
	if err := os.WriteFile(child, b, 0o644); err != nil {
		t.Fatal(err)
	}
	start := block * 2 << 20
	copy(want[start:start+12*512], parentBytes[start:start+12*512])
	d, err = format.Open(child, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	formattest.CheckContent(t, d, want)
	d.Close()

	// Writes into the partly held block, over sectors it holds and
	// sectors it does not, make it whole in its place: the file does not
	// grow, and its bitmap says every sector is held.
	formattest.WritePattern(t, child, want, start+1024, start+64<<10)
	after, err := os.ReadFile(child)
	if err != nil {
		t.Fatal(err)
	}
	e := binary.BigEndian.Uint32(after[tableOff+uint64(block)*4:])
	if len(after) != len(b) || e != binary.BigEndian.Uint32(b[tableOff+uint64(block)*4:]) {
		t.Fatalf("the block moved or the file grew: entry %x, %d bytes, was %d", e, len(after), len(b))
	}
	if bm := after[int64(e)*512:][:512]; !bytes.Equal(bm, bytes.Repeat([]byte{0xff}, 512)) {
		t.Fatalf("the block's bitmap is not all set: % x", bm[:4])
	}
	if got := testtool.QemuRaw(t, child, "-f", "vpc"); !bytes.Equal(got, want) {
		t.Fatal("qemu-img reads other bytes from the child")
	}
	d, err = format.Open(child, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	formattest.CheckContent(t, d, want)
	if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions != 0 || r.Leaks != 0 {
		t.Fatalf("check: %+v, %v", r, err)
	}
	d.Close()

	// A parent replaced by another disk is refused.
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vpc", parent, "8M")
	if _, err := format.Open(child, diskserve.Options{ReadOnly: true}); err == nil || !strings.Contains(err.Error(), "replaced") {
		t.Fatalf("open over a replaced parent: %v", err)
	}
}

// TestCheckRepairsACutAllocation: a dynamic disk copied in the middle of
// an allocation (the block written, the footer not yet moved after it,
// as a crash leaves it) reads as before the write, and check reports the
// missing footer copy as leaked space, which -r leaks repairs.
func TestCheckRepairsACutAllocation(t *testing.T) {
	dir := t.TempDir()
	img, crashed := filepath.Join(dir, "disk.vhd"), filepath.Join(dir, "crashed.vhd")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vpc", img, "8M")
	before := testtool.QemuRaw(t, img, "-f", "vpc")
	d, err := format.Open(img, diskserve.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(bytes.Repeat([]byte{7}, 4096), 3<<20); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(img) // the file as a crash now leaves it
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if err := os.WriteFile(crashed, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if got := testtool.QemuRaw(t, crashed, "-f", "vpc"); !bytes.Equal(got, before) {
		t.Fatal("the cut allocation shows")
	}
	check := func(repair diskserve.Repair) diskserve.CheckReport {
		d, err := format.Open(crashed, diskserve.Options{ReadOnly: repair == diskserve.RepairNone})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		r, err := diskserve.Check(d, repair)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if r := check(diskserve.RepairNone); r.Leaks != 1 || r.Corruptions != 0 {
		t.Fatalf("check of the cut allocation: %+v", r)
	}
	if r := check(diskserve.RepairLeaks); r.LeaksFixed != 1 || r.Corruptions != 0 {
		t.Fatalf("check -r leaks: %+v", r)
	}
	if r := check(diskserve.RepairNone); r.Leaks != 0 || r.Corruptions != 0 {
		t.Fatalf("check after the repair: %+v", r)
	}
	if got := testtool.QemuRaw(t, crashed, "-f", "vpc"); !bytes.Equal(got, before) {
		t.Fatal("the repair changed the content")
	}
}
