package qcow2

import (
	"fmt"

	"github.com/diskserve/diskserve"
)

// shrink cuts the virtual size to size, as qemu does: the guest clusters
// from the first one wholly past the new end are freed, the L2 tables
// that cover only them too, refcount blocks left counting nothing are
// dropped, and the image file is cut after its last used cluster. The L1
// table keeps its size, its entries past the end cleared.
//
// The header's new size is made durable first, so that a crash leaves the
// image at the old size untouched or at the new one, with at most the
// clusters past the end still referenced or leaked.
//
// Preconditions: lockAll is held; the image is writable.
func (d *Disk) shrink(size int64) error {
	var b [8]byte
	be.PutUint64(b[:], uint64(size))
	if _, err := d.c.WriteAt(b[:], 24); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	d.h.Size = uint64(size)
	return d.freeFrom((size + d.cs - 1) / d.cs)
}

// MakeEmpty drops every cluster the image holds, so that its backing
// file shows through everywhere again: what commit does to an overlay
// once its data is in the backing file. The virtual size stays. A crash
// leaves some of the clusters dropped, which the backing file then shows
// through: it must hold the same data.
func (d *Disk) MakeEmpty() error {
	if !d.writable() {
		return fmt.Errorf("make empty: %w", diskserve.ErrReadOnly)
	}
	d.lockAll()
	defer d.unlockAll()
	return d.freeFrom(0)
}

// freeFrom frees the guest clusters from first on and the L2 tables that
// map only them, drops the refcount blocks left counting nothing, and cuts
// the file after its last used cluster.
//
// Preconditions: lockAll is held; the image is writable.
func (d *Disk) freeFrom(first int64) error {
	if l1i := first / d.l2n; first%d.l2n != 0 && l1i < int64(len(d.l1)) && d.l1[l1i]&offsetMask != 0 {
		t, err := d.l2ForWrite(first)
		if err != nil {
			return err
		}
		for ci := first; ci < (l1i+1)*d.l2n; ci++ {
			if e, bm := d.entryIn(t, ci); e != 0 || bm != 0 {
				d.setEntry(t, ci, 0, 0)
				d.free(e)
			}
		}
	}
	if err := d.releaseL2s(d.l1[(first+d.l2n-1)/d.l2n:]); err != nil {
		return err
	}
	for i := (first + d.l2n - 1) / d.l2n; i < int64(len(d.l1)); i++ {
		if d.l1[i] != 0 {
			d.l1[i] = 0
			d.w.l1Dirty = true
		}
	}
	if err := d.flushLocked(); err != nil {
		return err
	}
	if err := d.dropEmptyRefblocks(); err != nil {
		return err
	}
	if err := d.flushLocked(); err != nil {
		return err
	}
	last, err := d.lastUsed()
	if err != nil {
		return err
	}
	d.w.end = last + d.cs
	d.w.compressedNext = 0 // it may lie in a cluster freed now
	return d.trimFile()
}

// dropEmptyRefblocks removes from the refcount table the refcount blocks
// (but the first) that count no cluster but, perhaps, themselves.
//
// Preconditions: lockAll is held; the image is writable.
func (d *Disk) dropEmptyRefblocks() error {
	w := d.w
	for bi := int64(len(w.rt)) - 1; bi > 0; bi-- {
		rb := int64(w.rt[bi] & refTableMask)
		if rb == 0 {
			continue
		}
		self := rb>>d.bits/w.perBlock == bi
		for k := int64(0); k < w.perBlock; k++ {
			host := (bi*w.perBlock + k) << d.bits
			rc, err := d.refcount(host)
			if err != nil {
				return err
			}
			if rc != 0 && !(self && host == rb) {
				return nil // blocks below this one count clusters below it
			}
		}
		w.rt[bi] = 0
		w.rtDirty = true
		if !self {
			w.pendingFree = append(w.pendingFree, rb)
		}
	}
	return nil
}

// lastUsed returns the offset of the last host cluster with a refcount.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) lastUsed() (int64, error) {
	w := d.w
	for bi := int64(len(w.rt)) - 1; bi >= 0; bi-- {
		if w.rt[bi]&refTableMask == 0 {
			continue
		}
		for k := w.perBlock - 1; k >= 0; k-- {
			host := (bi*w.perBlock + k) << d.bits
			rc, err := d.refcount(host)
			if err != nil {
				return 0, err
			}
			if rc != 0 {
				return host, nil
			}
		}
	}
	return 0, corrupt(-1, "no cluster has a refcount, not even the header's")
}
