package vhdx_test

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/vhdx"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/formattest"
	"github.com/diskserve/diskserve/internal/testtool"
)

var (
	dynamic   = formattest.Variant{Name: "dynamic"}
	fixed     = formattest.Variant{Name: "fixed", Options: []string{"subformat=fixed"}}
	small     = formattest.Variant{Name: "1M blocks", Options: []string{"block_size=1M"}}
	notZeroed = formattest.Variant{Name: "blocks not present", Options: []string{"block_state_zero=off,block_size=2M,log_size=2M"}}
)

// TestReadsQemuImages: VHDX disks qemu-img converted read byte for byte.
func TestReadsQemuImages(t *testing.T) {
	formattest.ReadsQemuImages(t, "vhdx", 9<<20+12345, true, []formattest.Variant{dynamic, fixed, small, notZeroed})
}

// TestWritesLikeQemu: random workloads on qemu-img's and diskserve's
// disks read back the same through qemu-img, whose check stays clean.
func TestWritesLikeQemu(t *testing.T) {
	formattest.WritesLikeQemu(t, "vhdx", 9<<20+512, true, []formattest.Variant{dynamic, fixed, small, notZeroed})
}

// TestConvertsLikeQemu: diskserve's conversions compare equal in qemu-img.
func TestConvertsLikeQemu(t *testing.T) {
	formattest.ConvertsLikeQemu(t, "vhdx", 9<<20+1536, true, []formattest.Variant{dynamic, fixed, small})
}

// TestInfoAgreesWithQemu: qemu-img info agrees on the virtual size and
// block size diskserve gives new disks, for sizes across the defaults.
func TestInfoAgreesWithQemu(t *testing.T) {
	for _, size := range []string{"10000000", "1G", "2G", "200G"} {
		dir := t.TempDir()
		ours, theirs := filepath.Join(dir, "ours.vhdx"), filepath.Join(dir, "theirs.vhdx")
		n, err := diskserve.ParseSize(size)
		if err != nil {
			t.Fatal(err)
		}
		formattest.Create(t, ours, "vhdx", n, nil)
		testtool.Run(t, "qemu-img", "create", "-q", "-f", "vhdx", theirs, size)
		a := infoLines(t, ours)
		b := infoLines(t, theirs)
		if a != b {
			t.Fatalf("%s: qemu-img info of diskserve's disk:\n%s\nof its own:\n%s", size, a, b)
		}
		testtool.QemuCheck(t, ours)
	}
}

func infoLines(t *testing.T, img string) string {
	var keep []string
	for _, l := range strings.Split(string(testtool.Run(t, "qemu-img", "info", img)), "\n") {
		if strings.HasPrefix(l, "virtual size") || strings.HasPrefix(l, "cluster_size") || strings.HasPrefix(l, "file format") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// TestLogReplay replays a log qemu wrote. qemu applies its log and
// clears the header's log GUID before it returns from a write, so a crash
// that leaves a log to replay is made here from qemu's real log: the BAT
// is put back as it was before qemu's writes, and the header names the
// log again, as a crash between qemu's log flush and its BAT update
// leaves it. A read-only open is refused saying why; a read-write open
// replays the log, and the data qemu wrote reads back; qemu-img check then
// finds the disk clean.
func TestLogReplay(t *testing.T) {
	img := filepath.Join(t.TempDir(), "dirty.vhdx")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "16M")
	before, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	testtool.Run(t, "qemu-io", "-f", "vhdx", "-c", "write -P 0x3c 1M 8k", "-c", "write -P 0x4d 9M 1M", img)
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	const logOff, batOff = 1 << 20, 2 << 20
	if string(b[logOff:logOff+4]) != "loge" {
		t.Fatal("qemu wrote no log entry")
	}
	copy(b[batOff:batOff+4096], before[batOff:batOff+4096])
	cur := 64 << 10
	if binary.LittleEndian.Uint64(b[128<<10+8:]) > binary.LittleEndian.Uint64(b[cur+8:]) {
		cur = 128 << 10
	}
	h := b[cur : cur+4096]
	// qemu names each log write with a new GUID: the header names the
	// newest entry's.
	newest := -1
	for off := logOff; off < batOff; off += 4096 {
		if string(b[off:off+4]) == "loge" && (newest < 0 || binary.LittleEndian.Uint64(b[off+16:]) > binary.LittleEndian.Uint64(b[newest+16:])) {
			newest = off
		}
	}
	copy(h[48:64], b[newest+32:newest+48])
	binary.LittleEndian.PutUint32(h[4:], 0)
	binary.LittleEndian.PutUint32(h[4:], crc32.Checksum(h, crc32.MakeTable(crc32.Castagnoli)))
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}

	_, err = format.Open(img, diskserve.Options{ReadOnly: true})
	if err == nil || !strings.Contains(err.Error(), "log must be replayed") {
		t.Fatalf("read-only open of a disk with a log: %v", err)
	}
	d, err := format.Open(img, diskserve.Options{})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	if _, err := d.ReadAt(got, 9<<20); err != nil || strings.Count(string(got), "\x4d") != len(got) {
		t.Fatalf("after replay, qemu's 1 MiB write reads back wrong: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	testtool.QemuCheck(t, img)
	testtool.Run(t, "qemu-io", "-f", "vhdx", "-r", "-c", "read -P 0x3c 1M 8k", "-c", "read -P 0x4d 9M 1M", img)
}

func TestGolden(t *testing.T) {
	formattest.Golden(t, "../../testdata/vhdx/pattern.vhdx", "vhdx", true)
}

// TestHostile opens damaged disks: each is refused with a vhdx error
// naming the file and what is wrong.
func TestHostile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.vhdx")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", good, "8M")
	testtool.Run(t, "qemu-io", "-f", "vhdx", "-c", "write -P 1 0 1M", good)
	formattest.RefusesDamaged(t, "vhdx", good, []formattest.Damage{
		{Name: "no header", Msg: "neither header is valid", Edit: func(b []byte) []byte { b[64<<10] ^= 1; b[128<<10] ^= 1; return b }},
		{Name: "no region table", Msg: "neither region table is valid", Edit: func(b []byte) []byte { b[192<<10+20] ^= 1; b[256<<10+20] ^= 1; return b }},
		{Name: "BAT entry outside the file", Msg: "outside the file", Edit: func(b []byte) []byte { b[2<<20+7] = 0x7f; return b }},
		{Name: "undefined state", Msg: "not defined", Edit: func(b []byte) []byte { b[2<<20] = 5; return b }},
		{Name: "truncated", Msg: "region", Edit: func(b []byte) []byte { return b[:3<<20] }},
	})
}

// fuzzPieces are the parts of a disk's first 4 MiB that FuzzOpen's input
// fills, in order: the file identifier, both headers and region tables,
// two log sectors, the start of the BAT and of the metadata region, and
// its first items, where qemu-img puts them. A fuzzer mutating 4 MiB
// inputs makes next to no progress; these are 9 KiB.
var fuzzPieces = []struct{ off, n int }{
	{0, 64}, {64 << 10, 128}, {128 << 10, 128}, {192 << 10, 128}, {256 << 10, 128},
	{1 << 20, 8192}, {2 << 20, 256}, {3 << 20, 256}, {3<<20 + 64<<10, 256},
}

// FuzzOpen opens disks whose first 4 MiB come from the fuzzer's input
// (fuzzPieces) and are zeroes elsewhere.
func FuzzOpen(f *testing.F) {
	b, err := os.ReadFile("../../testdata/vhdx/pattern.vhdx")
	if err != nil {
		f.Fatal(err)
	}
	var seed []byte
	for _, p := range fuzzPieces {
		seed = append(seed, b[p.off:p.off+p.n]...)
	}
	f.Add(seed)
	f.Fuzz(func(t *testing.T, in []byte) {
		img := make([]byte, 4<<20)
		for _, p := range fuzzPieces {
			in = in[copy(img[p.off:p.off+p.n], in):]
		}
		formattest.FuzzImage(t, vhdx.Format, img)
	})
}

// TestDifferencing makes a differencing disk with `create -b` over a disk
// qemu-img wrote (qemu itself refuses differencing VHDX), and reads it
// both through diskserve and through libvhdi (vhdimount), an independent
// reader: it must read as its parent, take a random workload with the
// parent unchanged, read the sectors a sector bitmap leaves to the parent
// from the parent, and refuse a parent that was replaced.
func TestDifferencing(t *testing.T) {
	dir := t.TempDir()
	parent := filepath.Join(dir, "parent.vhdx")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", parent, "24M")
	testtool.Run(t, "qemu-io", "-f", "vhdx", "-c", "write -P 0x61 0 3M", "-c", "write -P 0x62 5M 100k", "-c", "write -P 0x63 20M 1M", parent)
	parentBytes := testtool.QemuRaw(t, parent, "-f", "vhdx")
	child := filepath.Join(dir, "child.vhdx")
	formattest.CreateChild(t, child, "vhdx", "parent.vhdx")

	d, err := format.Open(child, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	info := diskserve.Describe(d)
	if info.BackingFile != "parent.vhdx" || info.Backing == nil || info.ClusterSize != 2<<20 || info.VirtualSize != 24<<20 {
		t.Fatalf("info %+v", info)
	}
	formattest.CheckContent(t, d, parentBytes)
	d.Close()

	want := bytes.Clone(parentBytes)
	d, err = format.Open(child, diskserve.Options{})
	if err != nil {
		t.Fatal(err)
	}
	disktest.Workload(t, d, want, 12, 200)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if got := testtool.QemuRaw(t, parent, "-f", "vhdx"); !bytes.Equal(got, parentBytes) {
		t.Fatal("writes to the child changed the parent")
	}
	checkWithLibvhdi(t, child, want)

	// Make the child's first stored block partly present: the bits of
	// its first 12 sectors cleared in its chunk's sector bitmap. Those
	// sectors now read from the parent.
	b, err := os.ReadFile(child)
	if err != nil {
		t.Fatal(err)
	}
	const batOff, blockSize, chunkRatio = 2 << 20, 2 << 20, 2048 // 2^23 sectors of 512 bytes in 2 MiB blocks
	block := -1
	for i := range 12 {
		if e := binary.LittleEndian.Uint64(b[batOff+8*i:]); e&7 == 6 {
			binary.LittleEndian.PutUint64(b[batOff+8*i:], e&^7|7)
			block = i
			break
		}
	}
	if block < 0 {
		t.Fatal("the workload stored no block whole")
	}
	sb := binary.LittleEndian.Uint64(b[batOff+8*chunkRatio:])
	if sb&7 != 6 {
		t.Fatalf("the chunk's sector bitmap is not stored (entry %x)", sb)
	}
	bits := b[sb>>20<<20+uint64(block)*blockSize/512/8:]
	if bits[0] != 0xff || bits[blockSize/512/8-1] != 0xff {
		t.Fatal("the stored block's sector bitmap bits are not set")
	}
	bits[0], bits[1] = 0, 0xf0 // sectors 0-11 clear
	if err := os.WriteFile(child, b, 0o644); err != nil {
		t.Fatal(err)
	}
	start := block * blockSize
	copy(want[start:start+12*512], parentBytes[start:start+12*512])
	d, err = format.Open(child, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	formattest.CheckContent(t, d, want)
	d.Close()
	checkWithLibvhdi(t, child, want)

	// Writes into the partly present block, over sectors it holds and
	// sectors it does not, make it fully present in its place: the file
	// does not grow, and its sector bitmap bits are set.
	formattest.WritePattern(t, child, want, start+1024, start+64<<10)
	after, err := os.ReadFile(child)
	if err != nil {
		t.Fatal(err)
	}
	e := binary.LittleEndian.Uint64(after[batOff+8*block:])
	if len(after) != len(b) || e != binary.LittleEndian.Uint64(b[batOff+8*block:])&^7|6 {
		t.Fatalf("the block moved or the file grew: entry %x, %d bytes, was %d", e, len(after), len(b))
	}
	if bits := after[sb>>20<<20+uint64(block)*blockSize/512/8:][:blockSize/512/8]; !bytes.Equal(bits, bytes.Repeat([]byte{0xff}, len(bits))) {
		t.Fatalf("the block's sector bitmap bits are not all set: % x", bits[:4])
	}
	checkWithLibvhdi(t, child, want)
	d, err = format.Open(child, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	formattest.CheckContent(t, d, want)
	d.Close()

	// A parent replaced by another disk is refused.
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vhdx", parent, "24M")
	if _, err := format.Open(child, diskserve.Options{ReadOnly: true}); err == nil || !strings.Contains(err.Error(), "replaced") {
		t.Fatalf("open over a replaced parent: %v", err)
	}
}

// checkWithLibvhdi requires the differencing disk img (2 MiB blocks, the
// BAT at 2 MiB) to read as want through libvhdi's vhdimount, which mounts
// each disk of the chain as a file, the parent first. libvhdi 20210425
// departs from the specification in two ways the caller must avoid or
// this leaves out: it reads a zero block of a differencing disk from the
// parent (the specification: zeroes), and misreads a chunk that has no
// sector bitmap block (the specification: every block of it from the
// parent, or from this file when fully present).
func checkWithLibvhdi(t *testing.T, img string, want []byte) {
	t.Helper()
	testtool.Need(t, "fusermount3")
	mnt := t.TempDir()
	testtool.Run(t, "vhdimount", img, mnt)
	defer exec.Command("fusermount3", "-u", mnt).Run()
	got, err := os.ReadFile(filepath.Join(mnt, "vhdi2"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("libvhdi reads %s as %d bytes, want %d", img, len(got), len(want))
	}
	const batOff, blockSize = 2 << 20, 2 << 20
	for i := 0; i*blockSize < len(want); i++ {
		g, w := got[i*blockSize:min(len(got), (i+1)*blockSize)], want[i*blockSize:min(len(want), (i+1)*blockSize)]
		if binary.LittleEndian.Uint64(b[batOff+8*i:])&7 == 2 || bytes.Equal(g, w) {
			continue
		}
		k := 0
		for g[k] == w[k] {
			k++
		}
		t.Fatalf("libvhdi reads %s differently from byte %d (entry %x): %x, want %x", img, i*blockSize+k, binary.LittleEndian.Uint64(b[batOff+8*i:]), g[k:min(k+16, len(g))], w[k:min(k+16, len(w))])
	}
}
