package qcow2

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/diskserve/diskserve"
)

// maxCheckClusters bounds the reference counts a check keeps: one uint32
// per host cluster, 256 MiB for 2^26 clusters (4 TiB of file at 64 KiB).
const maxCheckClusters = 1 << 26

var _ diskserve.Checker = (*Disk)(nil)

// Check counts the references to every host cluster (header, L1 tables,
// refcount table and blocks, snapshot table, bitmap directory, tables and
// data, L2 tables, data and compressed clusters, for the active layer and
// every snapshot) and compares them with
// the refcounts, as qemu-img check does: a refcount below the references is
// a corruption, one above them a leak. It also checks the COPIED flags of
// the active layer. Repairs set the refcounts to the references: leaks with
// RepairLeaks, and too-low refcounts too with RepairAll; after repairing,
// the image is checked again, and what that finds is what remains (the
// Fixed counts are the difference).
func (d *Disk) Check(repair diskserve.Repair) (diskserve.CheckReport, error) {
	d.lockAll()
	defer d.unlockAll()
	if d.writable() {
		// Clusters freed since the last flush still have their refcount
		// until the flush; they are not leaks.
		if err := d.flushLocked(); err != nil {
			return diskserve.CheckReport{}, err
		}
	}
	r, err := d.checkLocked(repair)
	if err != nil || r.LeaksFixed+r.CorruptionsFixed == 0 {
		return r, err
	}
	if err := d.flushLocked(); err != nil {
		return r, err
	}
	after, err := d.checkLocked(diskserve.RepairNone)
	if err != nil {
		return r, err
	}
	r.CorruptionsFixed = max(0, r.Corruptions-after.Corruptions)
	r.LeaksFixed = max(0, r.Leaks-after.Leaks)
	return r, nil
}

// Preconditions: d.mu is held.
func (d *Disk) checkLocked(repair diskserve.Repair) (diskserve.CheckReport, error) {
	var r diskserve.CheckReport
	if repair != diskserve.RepairNone && !d.writable() {
		return r, fmt.Errorf("check: repairs need the image open read-write: %w", diskserve.ErrReadOnly)
	}
	w := d.w
	if w == nil {
		rt, err := readTable(d.c, d.h.RefcountTableOffset, uint32(int64(d.h.RefcountTableClusters)*d.cs/8))
		if err != nil {
			return r, fmt.Errorf("read refcount table: %w", err)
		}
		w = &writer{rt: rt, bits: 1 << d.h.RefcountOrder, perBlock: d.cs * 8 / (1 << d.h.RefcountOrder)}
	}
	fileClusters := (d.c.Size() + d.cs - 1) / d.cs
	if fileClusters > maxCheckClusters {
		return r, fmt.Errorf("check: %d clusters is more than the %d a check can count", fileClusters, maxCheckClusters)
	}
	c := &checker{d: d, w: w, r: &r, refs: make([]uint32, fileClusters)}
	c.ref(0, d.cs, "header")
	c.ref(int64(d.h.L1TableOffset), int64(d.h.L1Size)*8, "L1 table")
	c.ref(int64(d.h.RefcountTableOffset), int64(d.h.RefcountTableClusters)*d.cs, "refcount table")
	for i, e := range w.rt {
		if off := int64(e & refTableMask); off != 0 {
			c.refAligned(off, fmt.Sprintf("refcount block %d", i))
		}
	}
	if d.h.NbSnapshots > 0 {
		c.ref(int64(d.h.SnapshotsOffset), d.snapBytes, "snapshot table")
	}
	if err := c.refBitmaps(); err != nil {
		return r, err
	}
	if err := c.walkL1(d.l1, true); err != nil {
		return r, err
	}
	for _, s := range d.snaps {
		l1, err := readTable(d.c, s.L1TableOffset, s.L1Size)
		if err != nil {
			return r, fmt.Errorf("read L1 table of snapshot %q: %w", s.ID, err)
		}
		c.ref(int64(s.L1TableOffset), int64(s.L1Size)*8, "snapshot L1 table")
		if err := c.walkL1(l1, false); err != nil {
			return r, err
		}
	}
	if err := c.compare(repair); err != nil {
		return r, err
	}
	r.TotalClusters = (int64(d.h.Size) + d.cs - 1) / d.cs
	return r, nil
}

// checker is the state of one check.
type checker struct {
	d    *Disk
	w    *writer
	r    *diskserve.CheckReport
	refs []uint32 // references found, by host cluster
}

func (c *checker) corruption(format string, args ...any) {
	c.r.Corruptions++
	c.r.Messages = append(c.r.Messages, "ERROR "+fmt.Sprintf(format, args...))
}

// ref counts one reference to each cluster of [off, off+n).
func (c *checker) ref(off, n int64, what string) {
	if n <= 0 {
		return
	}
	first, last := off/c.d.cs, (off+n-1)/c.d.cs
	if off < 0 || last >= int64(len(c.refs)) {
		c.corruption("%s at %#x (%d bytes) lies past the end of the file", what, off, n)
		return
	}
	for k := first; k <= last; k++ {
		c.refs[k]++
	}
}

func (c *checker) refAligned(off int64, what string) bool {
	if off%c.d.cs != 0 {
		c.corruption("%s at %#x is not cluster aligned", what, off)
		return false
	}
	c.ref(off, c.d.cs, what)
	return true
}

// refBitmaps counts the references of the bitmap directory and of each
// bitmap's table and data clusters, and checks the table entries.
func (c *checker) refBitmaps() error {
	d := c.d
	if len(d.bitmaps) == 0 {
		return nil
	}
	c.ref(int64(d.h.Bitmaps.DirOffset), int64(d.h.Bitmaps.DirSize), "bitmap directory")
	for _, b := range d.bitmaps {
		c.ref(int64(b.TableOffset), int64(b.TableSize)*8, fmt.Sprintf("table of bitmap %q", b.Name))
		table, err := readTable(d.c, b.TableOffset, b.TableSize)
		if err != nil {
			return fmt.Errorf("read the table of bitmap %q: %w", b.Name, err)
		}
		for i, e := range table {
			off := int64(e & offsetMask)
			switch {
			case e&^(offsetMask|1) != 0 || off != 0 && e&1 != 0:
				c.corruption("bitmap %q: table entry %d is %#x, with reserved bits set", b.Name, i, e)
			case off != 0:
				c.refAligned(off, fmt.Sprintf("data cluster %d of bitmap %q", i, b.Name))
			}
		}
	}
	return nil
}

// walkL1 counts the references of one L1 table's L2 tables and clusters.
// For the active one it also checks the COPIED flags, which say whether a
// cluster's refcount is exactly 1.
func (c *checker) walkL1(l1 []uint64, active bool) error {
	d := c.d
	for i, l1e := range l1 {
		l2off := int64(l1e & offsetMask)
		if l2off == 0 || !c.refAligned(l2off, fmt.Sprintf("L2 table of L1 entry %d", i)) {
			continue
		}
		if active {
			c.checkCopied(l1e, l2off, fmt.Sprintf("L2 cluster: l1_index=%d l1_entry=%x", i, l1e))
		}
		t, err := d.meta.get(l2off, kindL2, d.loadTable)
		if err != nil {
			return err
		}
		release := d.meta.hold(t)
		next := int64(0) // where a cluster right after the last one would be, as qemu counts fragments: per L2 table
		step := int64(8)
		if d.h.extendedL2() {
			step = 16
		}
		for j := int64(0); j < d.cs; j += step {
			e := be.Uint64(t.data[j:])
			if step == 16 {
				guest := (int64(i)*d.l2n + j/16) << d.bits
				if err := d.checkSubclusters(e, be.Uint64(t.data[j+8:]), guest); err != nil {
					c.corruption("%v", err)
				}
			}
			switch host := int64(e & offsetMask); {
			case e&entryCompressed != 0:
				off, n := d.compressedRange(e)
				c.ref(off, n, "compressed cluster")
				if active {
					c.r.Allocated++
					c.r.Compressed++
					c.r.Fragmented++
				}
			case host != 0:
				if !c.refAligned(host, fmt.Sprintf("data cluster of L2 entry %x", e)) {
					continue
				}
				if active {
					c.checkCopied(e, host, fmt.Sprintf("data cluster: l2_entry=%x", e))
					c.r.Allocated++ // zero clusters that keep their space too, as qemu counts them
					if next != 0 && host != next {
						c.r.Fragmented++
					}
					next = host + d.cs
				}
			}
		}
		release()
	}
	return nil
}

// checkCopied reports a COPIED flag that disagrees with the refcount.
func (c *checker) checkCopied(entry uint64, host int64, what string) {
	rc, err := c.d.refcountIn(c.w, host)
	if err != nil {
		return // reported when the refcounts are compared
	}
	if (rc == 1) != (entry&entryCopied != 0) {
		c.corruption("OFLAG_COPIED %s refcount=%d", what, rc)
	}
}

// compare compares references with refcounts, and repairs what it may.
//
// As in qemu-img, only clusters inside the file are compared: refcounts of
// clusters past its end are not reported.
func (c *checker) compare(repair diskserve.Repair) error {
	d := c.d
	covered := int64(len(c.w.rt)) * c.w.perBlock
	for k := range int64(len(c.refs)) {
		rc, err := d.refcountIn(c.w, k*d.cs)
		if err != nil {
			var fe *diskserve.FormatError
			if errors.As(err, &fe) {
				c.corruption("cluster %d: %v", k, err)
				continue
			}
			return err
		}
		ref := uint64(c.refs[k])
		if rc > 0 {
			c.r.ImageEndOffset = (k + 1) * d.cs
		}
		switch {
		case rc == ref:
			continue
		case rc > ref:
			c.r.Leaks++
			c.r.Messages = append(c.r.Messages, fmt.Sprintf("Leaked cluster %d refcount=%d reference=%d", k, rc, ref))
			if repair >= diskserve.RepairLeaks {
				if err := d.setRefcount(k*d.cs, ref); err != nil {
					return err
				}
				c.r.LeaksFixed++
			}
		default:
			c.corruption("cluster %d refcount=%d reference=%d", k, rc, ref)
			if repair >= diskserve.RepairAll && k < covered {
				if err := d.setRefcount(k*d.cs, ref); err != nil {
					return err
				}
				c.r.CorruptionsFixed++
			}
		}
	}
	return nil
}

// repairDirty rebuilds the refcounts of an image that a writer with lazy
// refcounts left dirty (its refcounts may lag behind its tables), as qemu
// does when it opens such an image for writing, then clears the dirty bit.
// What it repaired is logged.
func (d *Disk) repairDirty(log *slog.Logger) error {
	d.lockAll()
	defer d.unlockAll()
	r, err := d.checkLocked(diskserve.RepairAll)
	if err != nil {
		return fmt.Errorf("rebuild the refcounts of a dirty image: %w", err)
	}
	if err := d.flushLocked(); err != nil {
		return err
	}
	after, err := d.checkLocked(diskserve.RepairNone)
	if err != nil {
		return fmt.Errorf("rebuild the refcounts of a dirty image: %w", err)
	}
	if after.Corruptions > 0 {
		return corrupt(72, "the image is dirty and rebuilding its refcounts left %d errors (%s): repair it with qemu-img check -r all, or open it read-only", after.Corruptions, after.Messages[0])
	}
	if err := d.setFeatures(&d.h.IncompatibleFeatures, 72, d.h.IncompatibleFeatures&^incompatDirty); err != nil {
		return err
	}
	log.Warn("the image was not closed cleanly (lazy refcounts): its refcounts were rebuilt",
		"image", d.path, "corruptions-fixed", r.CorruptionsFixed, "leaks-fixed", r.LeaksFixed)
	return nil
}
