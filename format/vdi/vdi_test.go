package vdi_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/vdi"
	"github.com/diskserve/diskserve/internal/formattest"
	"github.com/diskserve/diskserve/internal/testtool"
)

var variants = []formattest.Variant{
	{Name: "dynamic"},
	{Name: "static", Options: []string{"static=on"}},
}

// TestReadsQemuImages: VDI images qemu-img converted read byte for byte.
func TestReadsQemuImages(t *testing.T) {
	formattest.ReadsQemuImages(t, "vdi", 9<<20+12345, true, variants)
}

// TestWritesLikeQemu: random workloads on qemu-img's and diskserve's
// images read back the same through qemu-img, whose check stays clean.
func TestWritesLikeQemu(t *testing.T) {
	formattest.WritesLikeQemu(t, "vdi", 9<<20+512, true, variants)
}

// TestConvertsLikeQemu: diskserve's conversions compare equal in
// qemu-img.
func TestConvertsLikeQemu(t *testing.T) {
	formattest.ConvertsLikeQemu(t, "vdi", 9<<20+1536, true, variants)
}

// TestInfoAgreesWithQemu: virtual size and cluster size as qemu-img info
// reports them, for an odd size that both round up to a sector.
func TestInfoAgreesWithQemu(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.vdi")
	formattest.Create(t, img, "vdi", 3000000, []string{"static=on"})
	out := string(testtool.Run(t, "qemu-img", "info", img))
	if !strings.Contains(out, "file format: vdi") || !strings.Contains(out, "(3000320 bytes)") || !strings.Contains(out, "cluster_size: 1048576") {
		t.Fatalf("qemu-img info:\n%s", out)
	}
	d, err := format.Open(img, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	info := diskserve.Describe(d)
	if info.Format != "vdi" || info.VirtualSize != 3000320 || info.ClusterSize != 1<<20 || info.Specific["type"] != "static" {
		t.Fatalf("info = %+v", info)
	}
}

// TestHostile opens damaged images: each is refused with a vdi error
// naming what is wrong, or (a block map whose entries share a place)
// refused read-write only.
func TestHostile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.vdi")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vdi", good, "4M")
	testtool.Run(t, "qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 1M 1M", good)
	le32 := func(b []byte, off int, v uint32) {
		b[off], b[off+1], b[off+2], b[off+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	}
	formattest.RefusesDamaged(t, "vdi", good, []formattest.Damage{
		{Name: "huge block count", Msg: "more than diskserve loads", Edit: func(b []byte) []byte { le32(b, 0x180, 0xffffff00); return b }},
		{Name: "disk larger than its blocks", Msg: "does not fit in", Edit: func(b []byte) []byte { b[0x176] = 1; return b }},
		{Name: "entry past the end", Msg: "past the image's", Edit: func(b []byte) []byte { le32(b, 0x204, 99); return b }},
		{Name: "block map over the data", Msg: "overlaps the block map", Edit: func(b []byte) []byte { le32(b, 0x158, 0x200); return b }},
		{Name: "parent", Msg: "differencing", Edit: func(b []byte) []byte { b[0x1B8] = 1; return b }},
		{Name: "block size", Msg: "block size", Edit: func(b []byte) []byte { le32(b, 0x178, 4096); return b }},
		{Name: "truncated", Msg: "past the end of the file", Edit: func(b []byte) []byte { return b[:0x200] }},
		{Name: "shared place", Msg: "shares its place", Edit: func(b []byte) []byte { le32(b, 0x204, 0); return b }, ReadOnlyOpens: true},
	})
}

func TestGolden(t *testing.T) {
	for _, img := range []string{"pattern.vdi", "pattern-static.vdi"} {
		t.Run(img, func(t *testing.T) { formattest.Golden(t, "../../testdata/vdi/"+img, "vdi", true) })
	}
}

func FuzzOpen(f *testing.F) {
	for _, img := range []string{"pattern.vdi", "pattern-static.vdi"} {
		b, err := os.ReadFile("../../testdata/vdi/" + img)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[:4096]) // the header and map: blocks past the end of the file
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { formattest.FuzzImage(t, vdi.Format, b) })
}
