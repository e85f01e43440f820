package qcow2

import (
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"sync/atomic"

	"github.com/diskserve/diskserve"
)

// Editing persistent dirty bitmaps, as qemu-img bitmap does. These calls
// must not run concurrently with any other method of the disk (as for
// snapshots), and need it open for writing. A new directory is written
// before the header points to it, and what the old one held is freed only
// after; a bitmap's changed bits reach the image on Close, marked in use
// until they are all there (see storeBitmaps). Enabling a bitmap takes
// effect from the next open.

// AddBitmap adds an empty bitmap called name, of granularity bytes per
// bit (0: the cluster size), enabled (recording writes) or not.
func (d *Disk) AddBitmap(name string, granularity int64, enabled bool) error {
	if !d.writable() {
		return fmt.Errorf("add bitmap: %w", diskserve.ErrReadOnly)
	}
	d.lockAll()
	defer d.unlockAll()
	if granularity == 0 {
		granularity = max(d.cs, 1<<minBitmapGranBits)
	}
	gbits := bits.TrailingZeros64(uint64(granularity))
	switch {
	case d.h.Version < 3:
		return unsupported(4, "add bitmap %q: bitmaps need a version 3 image (compat=1.1)", name)
	case name == "" || len(name) > maxBitmapName:
		return fmt.Errorf("add bitmap: a name of 1 to %d bytes is needed", maxBitmapName)
	case d.findBitmap(name) != nil:
		return fmt.Errorf("add bitmap: %s already has a bitmap named %q", d.path, name)
	case len(d.bitmaps) >= maxBitmaps:
		return fmt.Errorf("add bitmap %q: the image has %d bitmaps, the most it may", name, maxBitmaps)
	case granularity&(granularity-1) != 0 || gbits < minBitmapGranBits || gbits > maxBitmapGranBits:
		return fmt.Errorf("add bitmap %q: granularity %d is not a power of 2 from %d to %d", name, granularity, 1<<minBitmapGranBits, int64(1)<<maxBitmapGranBits)
	}
	b := &bitmap{Name: name, GranBits: uint8(gbits), nbits: bitmapBits(d.h.Size, uint8(gbits)), keep: true}
	if enabled {
		b.Flags = bitmapAuto
	}
	if (b.nbits+7)/8 > maxBitmapDataBytes {
		return fmt.Errorf("add bitmap %q: it would take %d bytes, more than %d", name, (b.nbits+7)/8, maxBitmapDataBytes)
	}
	need := bitmapClusters(b.nbits, d.cs)
	off, err := d.alloc((need*8 + d.cs - 1) / d.cs)
	if err != nil {
		return err
	}
	b.TableOffset, b.TableSize = uint64(off), uint32(need)
	b.table = make([]uint64, need)
	b.bits = make([]atomic.Uint64, (b.nbits+63)/64)
	if err := d.flushLocked(); err != nil { // the table's refcounts
		return err
	}
	if err := writeEntries(d.c, b.table, off); err != nil {
		return fmt.Errorf("write the table of bitmap %q: %w", name, err)
	}
	return d.writeBitmapDir(append(slices.Clone(d.bitmaps), b))
}

// RemoveBitmap removes the bitmap called name and frees its clusters.
func (d *Disk) RemoveBitmap(name string) error {
	d.lockAll()
	defer d.unlockAll()
	b, err := d.editedBitmap("remove", name, false)
	if err != nil {
		return err
	}
	table := b.table
	if table == nil {
		if table, err = readTable(d.c, b.TableOffset, b.TableSize); err != nil {
			return fmt.Errorf("read the table of bitmap %q: %w", name, err)
		}
	}
	if err := d.writeBitmapDir(slices.DeleteFunc(slices.Clone(d.bitmaps), func(o *bitmap) bool { return o == b })); err != nil {
		return err
	}
	d.tracked = slices.DeleteFunc(d.tracked, func(o *bitmap) bool { return o == b })
	for _, e := range table {
		if off := int64(e & offsetMask); off != 0 {
			d.w.pendingFree = append(d.w.pendingFree, off)
		}
	}
	for k := int64(0); k*d.cs < int64(b.TableSize)*8; k++ {
		d.w.pendingFree = append(d.w.pendingFree, int64(b.TableOffset)+k*d.cs)
	}
	return d.flushLocked()
}

// ClearBitmap clears every bit of the bitmap called name.
func (d *Disk) ClearBitmap(name string) error {
	d.lockAll()
	defer d.unlockAll()
	b, err := d.editedBitmap("clear", name, true)
	if err != nil {
		return err
	}
	for i := range b.bits {
		b.bits[i].Store(0)
	}
	return nil
}

// EnableBitmap sets whether the bitmap called name records writes (its
// auto flag), from the next open on.
func (d *Disk) EnableBitmap(name string, enabled bool) error {
	d.lockAll()
	defer d.unlockAll()
	b, err := d.editedBitmap("enable or disable", name, false)
	if err != nil {
		return err
	}
	if enabled {
		b.Flags |= bitmapAuto
	} else {
		b.Flags &^= bitmapAuto
	}
	if b.keep { // Close writes the flags with the bits
		return nil
	}
	if err := d.writeBitmapFlags(b); err != nil {
		return err
	}
	return diskserve.Flush(d.c)
}

// MergeBitmap sets in the bitmap called name every bit that src, a bitmap
// of a disk of the same size, has set.
func (d *Disk) MergeBitmap(name string, src diskserve.DirtyBitmap) error {
	d.lockAll()
	defer d.unlockAll()
	b, err := d.editedBitmap("merge into", name, true)
	if err != nil {
		return err
	}
	size := int64(d.h.Size)
	var ext []diskserve.Extent
	for pos := int64(0); pos < size; pos += 1 << 30 {
		ext = src.DirtyExtents(ext[:0], pos, min(1<<30, size-pos))
		for _, e := range ext {
			if e.Flags&diskserve.ExtentDirty != 0 && e.Len > 0 {
				b.set(e.Off, e.Len)
			}
		}
	}
	return nil
}

// findBitmap returns the bitmap called name, or nil.
func (d *Disk) findBitmap(name string) *bitmap {
	for _, b := range d.bitmaps {
		if b.Name == name {
			return b
		}
	}
	return nil
}

// editedBitmap returns the bitmap called name for an edit, loaded and kept
// for Close to store if the edit changes its bits.
//
// Preconditions: d.mu is held.
func (d *Disk) editedBitmap(op, name string, bitsToo bool) (*bitmap, error) {
	if !d.writable() {
		return nil, fmt.Errorf("%s bitmap %q: %w", op, name, diskserve.ErrReadOnly)
	}
	b := d.findBitmap(name)
	switch {
	case b == nil:
		return nil, fmt.Errorf("%s bitmap: %s has no bitmap named %q", op, d.path, name)
	case !bitsToo || b.keep:
		return b, nil
	case !b.usable():
		return nil, fmt.Errorf("%s bitmap %q: it is inconsistent (in use by a writer that did not close the image) or has extra data diskserve does not know: remove it", op, name)
	}
	if b.bits == nil {
		if err := d.loadBitmap(b, d.h.Size); err != nil {
			return nil, err
		}
	}
	b.keep = true
	return b, nil
}

// writeBitmapDir writes bms as the image's bitmap directory: into new
// clusters, then the header, then frees the old directory. Without
// bitmaps, the header's autoclear bit is cleared instead, which makes
// readers ignore the extension.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) writeBitmapDir(bms []*bitmap) error {
	old := d.h.Bitmaps
	consistent := old != nil && d.h.AutoclearFeatures&autoclearBitmaps != 0
	if len(bms) == 0 {
		if err := d.setAutoclear(d.h.AutoclearFeatures &^ autoclearBitmaps); err != nil {
			return err
		}
	} else {
		var dir []byte
		for _, b := range bms {
			e := make([]byte, 24, 24+len(b.extra)+len(b.Name)+7)
			be.PutUint64(e, b.TableOffset)
			be.PutUint32(e[8:], b.TableSize)
			be.PutUint32(e[12:], b.Flags)
			e[16], e[17] = bitmapTypeDirty, b.GranBits
			be.PutUint16(e[18:], uint16(len(b.Name)))
			be.PutUint32(e[20:], uint32(len(b.extra)))
			e = append(append(e, b.extra...), b.Name...)
			dir = append(dir, e...)
			dir = append(dir, make([]byte, (8-len(dir)%8)%8)...)
		}
		off, err := d.alloc((int64(len(dir)) + d.cs - 1) / d.cs)
		if err != nil {
			return err
		}
		if err := d.flushLocked(); err != nil { // the directory's refcounts
			return err
		}
		if _, err := d.c.WriteAt(dir, off); err != nil {
			return fmt.Errorf("write the bitmap directory: %w", err)
		}
		if err := diskserve.Flush(d.c); err != nil {
			return err
		}
		ext := &bitmapsExt{Count: uint32(len(bms)), DirSize: uint64(len(dir)), DirOffset: uint64(off)}
		if err := d.writeBitmapsExt(ext); err != nil {
			return err
		}
		pos := off
		for _, b := range bms {
			b.entry = pos
			pos += (24 + int64(len(b.extra)) + int64(len(b.Name)) + 7) &^ 7
		}
	}
	d.bitmaps = bms
	if consistent {
		for k := int64(0); k*d.cs < int64(old.DirSize); k++ {
			d.w.pendingFree = append(d.w.pendingFree, int64(old.DirOffset)+k*d.cs)
		}
	}
	return d.flushLocked()
}

// writeBitmapsExt points the header at a new bitmap directory, and sets
// the autoclear bit that says it is consistent. An extension already in
// the header is overwritten in place; otherwise the header's extensions
// are written anew with it, and the backing file name after them, in one
// write of the first cluster.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) writeBitmapsExt(ext *bitmapsExt) error {
	var data [24]byte
	be.PutUint32(data[0:], ext.Count)
	be.PutUint64(data[8:], ext.DirSize)
	be.PutUint64(data[16:], ext.DirOffset)
	if old := d.h.Bitmaps; old != nil {
		ext.At = old.At
		if _, err := d.c.WriteAt(data[:], old.At); err != nil {
			return fmt.Errorf("write the bitmaps extension: %w", err)
		}
	} else {
		at, err := d.insertExtension(extBitmaps, data[:])
		if err != nil {
			return err
		}
		ext.At = at
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	d.h.Bitmaps = ext
	return d.setAutoclear(d.h.AutoclearFeatures | autoclearBitmaps)
}

// insertExtension rewrites the header's extensions with one more, of type
// typ, before the end marker, moving the backing file name after them.
// It returns where the new extension's data lies.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) insertExtension(typ uint32, data []byte) (int64, error) {
	hdr := make([]byte, min(d.cs, d.c.Size()))
	if err := diskserve.ReadFullAt(d.c, hdr, 0); err != nil {
		return 0, fmt.Errorf("read header: %w", err)
	}
	pos := int64(d.h.HeaderLength)
	for { // past the extensions, to the end marker
		if pos+8 > int64(len(hdr)) {
			return 0, corrupt(pos, "header extensions run past the first cluster")
		}
		t, n := be.Uint32(hdr[pos:]), int64(be.Uint32(hdr[pos+4:]))
		if t == extEnd {
			break
		}
		pos += 8 + (n+7)&^7
	}
	at := pos + 8
	out := make([]byte, d.cs)
	copy(out, hdr[:pos])
	be.PutUint32(out[pos:], typ)
	be.PutUint32(out[pos+4:], uint32(len(data)))
	copy(out[at:], data)
	end := at + (int64(len(data))+7)&^7 + 8 // with the end marker
	if name := d.h.BackingFile; name != "" {
		if end+int64(len(name)) > d.cs {
			return 0, errors.New("the header extensions and backing file name do not fit in the first cluster")
		}
		copy(out[end:], name)
		be.PutUint64(out[8:], uint64(end))
		end += int64(len(name))
	}
	if _, err := d.c.WriteAt(out[:max(end, int64(len(hdr)))], 0); err != nil {
		return 0, fmt.Errorf("write header: %w", err)
	}
	if d.h.BackingFile != "" {
		d.h.BackingFileOffset = uint64(end) - uint64(len(d.h.BackingFile))
	}
	return at, nil
}
