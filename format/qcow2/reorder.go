package qcow2

import (
	"fmt"
	"math/bits"

	"github.com/diskserve/diskserve"
)

// setRefcountBits rewrites the image's refcounts with width bits, as
// qemu-img amend -o refcount_bits does: new refcount blocks and a new
// refcount table, counting every cluster in use and themselves, are
// written after the end of the file and made durable; then one write of
// the header's sector switches to them (the table's place and size and
// the refcount order lie in its first 100 bytes); then the old table and
// blocks are given back. A crash leaves the old refcounts in force, or
// the new ones.
//
// Preconditions: lockAll is held; the image is writable; width is a
// power of two up to 64 (amend checks it).
func (d *Disk) setRefcountBits(width uint) error {
	if err := d.flushLocked(); err != nil {
		return err
	}
	w := d.w
	end := d.w.end / d.cs // clusters in use lie below
	// The old table and blocks are free once the header names the new
	// ones: the new refcounts do not count them.
	old := map[int64]bool{}
	for k := range int64(d.h.RefcountTableClusters) {
		old[int64(d.h.RefcountTableOffset)/d.cs+k] = true
	}
	for _, e := range w.rt {
		if off := int64(e & refTableMask); off != 0 {
			old[off/d.cs] = true
		}
	}
	count := func(ci int64) (uint64, error) {
		if old[ci] {
			return 0, nil
		}
		return d.refcount(ci * d.cs)
	}
	for ci := range end {
		rc, err := count(ci)
		if err != nil {
			return err
		}
		if width < 64 && rc >= 1<<width {
			return fmt.Errorf("refcount_bits=%d: cluster %#x has %d references, more than %d bits count", width, ci*d.cs, rc, width)
		}
	}
	// The new blocks and table: as many as count every cluster, theirs
	// included (a fixed point).
	perBlock := d.cs * 8 / int64(width)
	var blocks, table int64
	for {
		b := (end + blocks + table + perBlock - 1) / perBlock
		tb := (b*8 + d.cs - 1) / d.cs
		if b == blocks && tb == table {
			break
		}
		blocks, table = b, tb
	}
	rbOff := end * d.cs
	rtOff := rbOff + blocks*d.cs
	total := end + blocks + table
	if d.c.Size() < total*d.cs {
		if err := diskserve.Resize(d.c, total*d.cs); err != nil {
			return fmt.Errorf("grow the image file: %w", err)
		}
	}
	rt := make([]uint64, table*d.cs/8)
	buf := make([]byte, d.cs)
	for bi := range blocks {
		clear(buf)
		for k := range perBlock {
			ci := bi*perBlock + k
			var rc uint64
			switch {
			case ci < end:
				var err error
				if rc, err = count(ci); err != nil {
					return err
				}
			case ci < total:
				rc = 1 // the new blocks and table themselves
			}
			putRefcount(buf, k, width, rc)
		}
		if _, err := d.c.WriteAt(buf, rbOff+bi*d.cs); err != nil {
			return fmt.Errorf("write a refcount block: %w", err)
		}
		rt[bi] = uint64(rbOff + bi*d.cs)
	}
	if err := writeEntries(d.c, rt, rtOff); err != nil {
		return err
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	hdr := make([]byte, 100)
	if err := diskserve.ReadFullAt(d.c, hdr, 0); err != nil {
		return err
	}
	be.PutUint64(hdr[48:], uint64(rtOff))
	be.PutUint32(hdr[56:], uint32(table))
	be.PutUint32(hdr[96:], uint32(bits.TrailingZeros(width)))
	if _, err := d.c.WriteAt(hdr, 0); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	oldRT, oldClusters, oldBlocks := int64(d.h.RefcountTableOffset), int64(d.h.RefcountTableClusters), w.rt
	d.h.RefcountTableOffset, d.h.RefcountTableClusters, d.h.RefcountOrder = uint64(rtOff), uint32(table), uint32(bits.TrailingZeros(width))
	w.rt, w.bits, w.perBlock, w.end = rt, width, perBlock, total*d.cs
	// The old structures are unreferenced: their space goes back.
	_ = diskserve.PunchHole(d.c, oldRT, oldClusters*d.cs)
	for _, e := range oldBlocks {
		if off := int64(e & refTableMask); off != 0 {
			_ = diskserve.PunchHole(d.c, off, d.cs)
		}
	}
	return nil
}
