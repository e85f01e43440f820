package nbd

import (
	"errors"
	"slices"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// bitmapDisk keeps one dirty bitmap, "b0", dirty in [8 KiB, 12 KiB) and
// from 64 KiB on.
type bitmapDisk struct{ *disktest.Memory }

func (d bitmapDisk) DirtyBitmap(name string) (diskserve.DirtyBitmap, error) {
	if name != "b0" {
		return nil, errors.New("no such bitmap")
	}
	return fixedBitmap{}, nil
}

func (d bitmapDisk) Bitmaps() []diskserve.BitmapInfo {
	return []diskserve.BitmapInfo{{Name: "b0", Granularity: 4096, Enabled: true}}
}

type fixedBitmap struct{}

func (fixedBitmap) Granularity() int64 { return 4096 }

func (fixedBitmap) DirtyExtents(dst []diskserve.Extent, off, n int64) []diskserve.Extent {
	for pos := off; pos < off+n; pos += 4096 {
		var f diskserve.ExtentFlags
		if pos >= 8192 && pos < 12288 || pos >= 65536 {
			f = diskserve.ExtentDirty
		}
		dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: pos, Len: min(4096, off+n-pos), Flags: f})
	}
	return dst
}

// TestDirtyBitmapContext negotiates qemu:dirty-bitmap:b0 with
// base:allocation, as qemu's client does, and reads both in one
// BLOCK_STATUS reply: a chunk per context, in the order of their IDs, the
// last one ending the reply.
func TestDirtyBitmapContext(t *testing.T) {
	if _, err := NewServer([]Export{{Disk: bitmapDisk{disktest.NewMemory(pattern(diskSize), false)}, Bitmaps: []string{"missing"}}}, Options{}); err == nil {
		t.Fatal("a server offering a bitmap the disk lacks started")
	}
	e := Export{Disk: bitmapDisk{disktest.NewMemory(pattern(diskSize), false)}, Bitmaps: []string{"b0"}}
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	cl.option(optStructuredReply, nil)
	cl.expect(optStructuredReply, repAck)
	for _, q := range []string{"qemu:", "qemu:dirty-bitmap:", "qemu:dirty-bitmap:b0"} {
		cl.option(optListMetaContext, metaData("", q))
		if r := cl.expect(optListMetaContext, repMetaContext); string(r.data[4:]) != "qemu:dirty-bitmap:b0" {
			t.Fatalf("LIST_META_CONTEXT %q: % x", q, r.data)
		}
		cl.expect(optListMetaContext, repAck)
	}
	cl.option(optSetMetaContext, metaData("", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b9", contextBaseAllocation))
	ids := map[string]uint32{}
	for range 2 {
		r := cl.expect(optSetMetaContext, repMetaContext)
		ids[string(r.data[4:])] = be.Uint32(r.data)
	}
	cl.expect(optSetMetaContext, repAck)
	cl.goExport("")

	cl.request(cmdBlockStatus, 0, 7, 0, 80<<10, nil)
	got := map[uint32][][2]uint32{}
	for i := range 2 {
		c := cl.chunk()
		if c.typ != chunkBlockStatus || (c.flags&replyFlagDone != 0) != (i == 1) {
			t.Fatalf("chunk %d: %+v", i, c)
		}
		for p := c.payload[4:]; len(p) >= 8; p = p[8:] {
			got[be.Uint32(c.payload)] = append(got[be.Uint32(c.payload)], [2]uint32{be.Uint32(p), be.Uint32(p[4:])})
		}
	}
	base, bitmap := ids[contextBaseAllocation], ids["qemu:dirty-bitmap:b0"]
	if base == 0 || bitmap == 0 || base == bitmap {
		t.Fatalf("SET_META_CONTEXT gave the IDs %v", ids)
	}
	if want := [][2]uint32{{8192, 0}, {4096, 1}, {53248, 0}, {16384, 1}}; !slices.Equal(got[bitmap], want) {
		t.Errorf("dirty bitmap extents %v, want %v", got[bitmap], want)
	}
	if want := [][2]uint32{{80 << 10, 0}}; !slices.Equal(got[base], want) {
		t.Errorf("base:allocation extents %v, want %v", got[base], want)
	}
}
