package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/diskserve/diskserve"
)

// Persistent dirty bitmaps (docs/interop/qcow2.txt, "Bitmaps").
//
// The bitmap directory is read at open, every field checked against
// qemu's limits, when the autoclear bit says the bitmaps extension is
// consistent (otherwise qemu ignores it, and so does this package).
//
// An image open for writing keeps its enabled bitmaps (flag auto) exact:
// each is loaded into memory, marked in_use on disk before the first write
// can land, set for every write, zero and discard, and stored back on
// Close, which clears in_use last. A crash leaves in_use set, so that qemu
// and diskserve take the bitmap for inconsistent, never for clean and
// wrong. Disabled bitmaps never change, so they stay valid on disk without
// being marked. A bitmap already in use (an earlier writer crashed) is
// left as it is: it is inconsistent either way.

// Limits of the bitmaps extension, qemu's (block/qcow2-bitmap.c), and the
// memory this package gives the bitmaps of one image.
const (
	maxBitmaps         = 65535
	maxBitmapDirBytes  = 64 << 20
	maxBitmapName      = 1023
	minBitmapGranBits  = 9
	maxBitmapGranBits  = 31
	maxBitmapTable     = 0x8000000 // entries
	maxBitmapDataBytes = 512 << 20 // of one bitmap
	maxBitmapMemory    = 512 << 20 // of all the bitmaps an image tracks

	bitmapInUse           = 1 << 0
	bitmapAuto            = 1 << 1
	bitmapExtraCompatible = 1 << 2
	bitmapKnownFlags      = bitmapInUse | bitmapAuto | bitmapExtraCompatible
	bitmapTypeDirty       = 1

	autoclearBitmaps = 1 << 0
)

// bitmapsExt is the bitmaps header extension.
type bitmapsExt struct {
	Count     uint32
	Reserved  uint32
	DirSize   uint64
	DirOffset uint64
	At        int64 // where its data lies in the file
}

// A bitmap is one entry of the bitmap directory, with, for a bitmap the
// image keeps up to date, its bits.
type bitmap struct {
	Name        string
	Flags       uint32
	GranBits    uint8
	TableOffset uint64
	TableSize   uint32
	ExtraSize   uint32
	extra       []byte // kept as it is
	entry       int64  // where its directory entry lies in the file
	keep        bool   // stored on Close: tracked, or changed by an edit

	bits  []atomic.Uint64 // bit i covers guest bytes [i<<GranBits, (i+1)<<GranBits)
	nbits int64
	table []uint64
}

// usable reports whether the bitmap's content may be trusted and kept.
func (b *bitmap) usable() bool {
	return b.Flags&bitmapInUse == 0 && (b.ExtraSize == 0 || b.Flags&bitmapExtraCompatible != 0)
}

// bitmapBits is the number of bits of a bitmap of granularity 1<<gran
// over size bytes.
func bitmapBits(size uint64, gran uint8) int64 {
	return int64((size + 1<<gran - 1) >> gran)
}

// bitmapClusters is the number of clusters the data of a bitmap of nbits
// takes: the entries its table needs.
func bitmapClusters(nbits, cs int64) int64 {
	return ((nbits+7)/8 + cs - 1) / cs
}

// parseBitmapDir parses the bitmap directory dir that the extension ext of
// an image with header h describes. It is a pure function, for fuzzing.
func parseBitmapDir(dir []byte, h *header, fileSize int64) ([]*bitmap, error) {
	ext := h.Bitmaps
	cs := h.clusterSize()
	var bms []*bitmap
	names := map[string]bool{}
	pos := int64(0)
	for i := range ext.Count {
		at := int64(ext.DirOffset) + pos
		if int64(len(dir))-pos < 24 {
			return nil, corrupt(at, "bitmap directory ends inside entry %d of %d", i, ext.Count)
		}
		e := dir[pos:]
		b := &bitmap{
			TableOffset: be.Uint64(e),
			TableSize:   be.Uint32(e[8:]),
			Flags:       be.Uint32(e[12:]),
			GranBits:    e[17],
			ExtraSize:   be.Uint32(e[20:]),
			entry:       at,
		}
		typ, nameSize := e[16], int64(be.Uint16(e[18:]))
		body := 24 + int64(b.ExtraSize) + nameSize
		size := (body + 7) &^ 7
		if size > int64(len(dir))-pos {
			return nil, corrupt(at, "bitmap directory entry %d (%d bytes) runs past the directory", i, size)
		}
		b.Name = string(e[24+int64(b.ExtraSize) : body])
		b.extra = e[24 : 24+int64(b.ExtraSize)]
		switch {
		case nameSize == 0 || nameSize > maxBitmapName:
			return nil, corrupt(at+18, "bitmap name of %d bytes, outside 1..%d", nameSize, maxBitmapName)
		case names[b.Name]:
			return nil, corrupt(at, "two bitmaps are named %q", b.Name)
		case b.Flags&^bitmapKnownFlags != 0:
			return nil, corrupt(at+12, "bitmap %q has unknown flags %#x", b.Name, b.Flags&^bitmapKnownFlags)
		case typ != bitmapTypeDirty:
			return nil, unsupported(at+16, "bitmap %q is of type %d; only dirty tracking bitmaps (1) are supported", b.Name, typ)
		case b.GranBits < minBitmapGranBits || b.GranBits > maxBitmapGranBits:
			return nil, unsupported(at+17, "bitmap %q has granularity bits %d, outside %d..%d", b.Name, b.GranBits, minBitmapGranBits, maxBitmapGranBits)
		case b.TableSize > maxBitmapTable:
			return nil, corrupt(at+8, "bitmap %q has a table of %d entries, more than %d", b.Name, b.TableSize, maxBitmapTable)
		case !bytes.Equal(e[body:size], make([]byte, size-body)):
			return nil, corrupt(at, "bitmap %q: the padding of its directory entry is not zero", b.Name)
		}
		if err := checkTable(fmt.Sprintf("table of bitmap %q", b.Name), at, b.TableOffset, int64(b.TableSize)*8, cs, fileSize); err != nil {
			return nil, err
		}
		if b.Flags&bitmapInUse == 0 { // an in-use bitmap's size may be outdated
			nbits := bitmapBits(h.Size, b.GranBits)
			if (nbits+7)/8 > maxBitmapDataBytes {
				return nil, unsupported(at, "bitmap %q takes %d bytes, more than %d", b.Name, (nbits+7)/8, maxBitmapDataBytes)
			}
			if need := bitmapClusters(nbits, cs); int64(b.TableSize) < need {
				return nil, corrupt(at+8, "bitmap %q has a table of %d entries; the disk size needs %d", b.Name, b.TableSize, need)
			}
		}
		names[b.Name] = true
		bms = append(bms, b)
		pos += size
	}
	if pos != int64(len(dir)) {
		return nil, corrupt(int64(ext.DirOffset), "bitmap directory of %d bytes holds %d bytes of entries", len(dir), pos)
	}
	return bms, nil
}

// readBitmaps reads the bitmap directory, if the image has a consistent
// one.
func readBitmaps(c diskserve.DiskFile, h *header, fileSize int64) ([]*bitmap, error) {
	ext := h.Bitmaps
	if ext == nil || h.AutoclearFeatures&autoclearBitmaps == 0 {
		return nil, nil
	}
	switch {
	case ext.Count == 0 || ext.Count > maxBitmaps:
		return nil, corrupt(-1, "bitmaps extension: %d bitmaps, outside 1..%d", ext.Count, maxBitmaps)
	case ext.Reserved != 0:
		return nil, corrupt(-1, "bitmaps extension: reserved field is %#x, not 0", ext.Reserved)
	case ext.DirSize > maxBitmapDirBytes || ext.DirSize < 24*uint64(ext.Count):
		return nil, corrupt(-1, "bitmaps extension: a directory of %d bytes for %d bitmaps", ext.DirSize, ext.Count)
	}
	if err := checkTable("bitmap directory", -1, ext.DirOffset, int64(ext.DirSize), h.clusterSize(), fileSize); err != nil {
		return nil, err
	}
	dir := make([]byte, ext.DirSize)
	if err := diskserve.ReadFullAt(c, dir, int64(ext.DirOffset)); err != nil {
		return nil, fmt.Errorf("read bitmap directory: %w", err)
	}
	return parseBitmapDir(dir, h, fileSize)
}

// trackBitmaps prepares an image opening for writing to keep its enabled
// bitmaps: it loads them and marks them in use on disk.
//
// Preconditions: the image is being opened; nothing else uses it.
func (d *Disk) trackBitmaps() error {
	var mem int64
	for _, b := range d.bitmaps {
		switch {
		case b.Flags&bitmapAuto == 0 || b.Flags&bitmapInUse != 0:
			continue
		case !b.usable():
			return unsupported(b.entry, "bitmap %q tracks writes but has extra data diskserve does not know: writing the image would make it wrong; open it read-only", b.Name)
		}
		mem += (bitmapBits(d.h.Size, b.GranBits) + 63) / 64 * 8
		if mem > maxBitmapMemory {
			return unsupported(b.entry, "the enabled bitmaps take more than %d bytes of memory: open the image read-only", maxBitmapMemory)
		}
		if err := d.loadBitmap(b, d.h.Size); err != nil {
			return err
		}
		b.keep = true
		d.tracked = append(d.tracked, b)
	}
	for _, b := range d.tracked {
		b.Flags |= bitmapInUse
		if err := d.writeBitmapFlags(b); err != nil {
			return err
		}
	}
	if len(d.tracked) > 0 {
		return diskserve.Flush(d.c)
	}
	return nil
}

// loadBitmap reads the table and the data of b, a bitmap of a disk of
// size bytes.
func (d *Disk) loadBitmap(b *bitmap, size uint64) error {
	nbits := bitmapBits(size, b.GranBits)
	need := bitmapClusters(nbits, d.cs)
	table, err := readTable(d.c, b.TableOffset, b.TableSize)
	if err != nil {
		return fmt.Errorf("read the table of bitmap %q: %w", b.Name, err)
	}
	if int64(len(table)) < need {
		return corrupt(int64(b.TableOffset), "bitmap %q has a table of %d entries; the disk size needs %d", b.Name, len(table), need)
	}
	b.table, b.nbits = table, nbits
	b.bits = make([]atomic.Uint64, (nbits+63)/64)
	dataBytes := (nbits + 7) / 8
	buf := make([]byte, d.cs)
	for ci, e := range table[:need] {
		n := min(d.cs, dataBytes-int64(ci)*d.cs)
		chunk := buf[:(n+7)&^7]
		clear(chunk)
		off := int64(e & offsetMask)
		switch {
		case e&^(offsetMask|1) != 0 || off != 0 && (e&1 != 0 || off%d.cs != 0):
			return corrupt(int64(b.TableOffset)+int64(ci)*8, "bitmap %q: bad table entry %#x", b.Name, e)
		case off != 0:
			if off > d.c.Size()-d.cs {
				return corrupt(int64(b.TableOffset)+int64(ci)*8, "bitmap %q: data cluster %#x lies past the end of the file", b.Name, off)
			}
			if err := diskserve.ReadFullAt(d.c, chunk[:n], off); err != nil {
				return fmt.Errorf("read bitmap %q: %w", b.Name, err)
			}
		case e&1 != 0:
			for i := range chunk[:n] {
				chunk[i] = 0xff
			}
		default:
			continue
		}
		first := int64(ci) * d.cs / 8 // the first word of the cluster
		for k := int64(0); k < int64(len(chunk)); k += 8 {
			if w := first + k/8; w < int64(len(b.bits)) {
				b.bits[w].Store(le64(chunk[k:]))
			}
		}
	}
	if tail := nbits % 64; tail != 0 { // the bits past the disk are zero
		last := &b.bits[len(b.bits)-1]
		last.Store(last.Load() & (1<<tail - 1))
	}
	return nil
}

// le64 decodes 8 little-endian bytes: the order of the bits of a bitmap
// (bit i is bit i%8 of byte i/8).
func le64(b []byte) uint64 {
	var v uint64
	for i := range 8 {
		v |= uint64(b[i]) << (8 * i)
	}
	return v
}

// markDirty sets, in every bitmap the image keeps, the bits of the guest
// range [off, off+n). It takes no lock.
func (d *Disk) markDirty(off, n int64) {
	if n <= 0 {
		return
	}
	for _, b := range d.tracked {
		b.set(off, n)
	}
}

// set sets the bits of the guest range [off, off+n), n > 0.
func (b *bitmap) set(off, n int64) {
	first := off >> b.GranBits
	last := min((off+n-1)>>b.GranBits, b.nbits-1)
	for w := first / 64; w <= last/64; w++ {
		lo, hi := max(first, w*64)-w*64, min(last, w*64+63)-w*64
		mask := (^uint64(0) >> (63 - (hi - lo))) << lo
		if b.bits[w].Load()&mask != mask {
			b.bits[w].Or(mask)
		}
	}
}

// writeBitmapFlags writes the flags of b's directory entry.
func (d *Disk) writeBitmapFlags(b *bitmap) error {
	var f [4]byte
	be.PutUint32(f[:], b.Flags)
	if _, err := d.c.WriteAt(f[:], b.entry+12); err != nil {
		return fmt.Errorf("write the flags of bitmap %q: %w", b.Name, err)
	}
	return nil
}

// storeBitmaps writes the bitmaps the image keeps back into it and clears
// their in_use flags. Clusters for data that was all zeroes (or all ones)
// before and is not all zeroes now are allocated, and their refcounts made
// durable, before anything refers to them; the data and tables are durable
// before in_use is cleared. The tables keep their places; data clusters
// are rewritten in place, which is safe while in_use is set.
//
// Preconditions: d.mu is held; no write is in flight.
func (d *Disk) storeBitmaps() error {
	var kept []*bitmap
	for _, b := range d.bitmaps {
		if b.keep {
			kept = append(kept, b)
		}
	}
	if len(kept) == 0 {
		return nil
	}
	// A bitmap changed by an edit is marked in use before its data is.
	var marked bool
	for _, b := range kept {
		if b.Flags&bitmapInUse == 0 {
			b.Flags |= bitmapInUse
			if err := d.writeBitmapFlags(b); err != nil {
				return err
			}
			marked = true
		}
	}
	if marked {
		if err := diskserve.Flush(d.c); err != nil {
			return err
		}
	}
	type write struct {
		b  *bitmap
		ci int
	}
	var writes []write
	changed := map[*bitmap]bool{}
	buf := make([]byte, d.cs)
	for _, b := range kept {
		for ci := range bitmapClusters(b.nbits, d.cs) {
			e := b.table[ci]
			if e&offsetMask != 0 {
				writes = append(writes, write{b, int(ci)})
				continue
			}
			chunk := b.serialize(buf, ci, d.cs)
			switch {
			case allBytes(chunk, 0):
				if e != 0 {
					b.table[ci], changed[b] = 0, true
				}
			default: // data, or ones where the entry said all ones
				host, err := d.alloc(1)
				if err != nil {
					return err
				}
				b.table[ci], changed[b] = uint64(host), true
				writes = append(writes, write{b, int(ci)})
			}
		}
	}
	if err := d.flushLocked(); err != nil { // the new clusters' refcounts
		return err
	}
	for _, w := range writes {
		chunk := w.b.serialize(buf, int64(w.ci), d.cs)
		clear(buf[len(chunk):])
		if _, err := d.c.WriteAt(buf, int64(w.b.table[w.ci]&offsetMask)); err != nil {
			return fmt.Errorf("write bitmap %q: %w", w.b.Name, err)
		}
	}
	for b := range changed {
		if err := writeEntries(d.c, b.table, int64(b.TableOffset)); err != nil {
			return fmt.Errorf("write the table of bitmap %q: %w", b.Name, err)
		}
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	var errs []error
	for _, b := range kept {
		b.keep = false
		b.Flags &^= bitmapInUse
		errs = append(errs, d.writeBitmapFlags(b))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return diskserve.Flush(d.c)
}

// serialize encodes the bits of data cluster ci of b into buf, and returns
// the bytes of it the bitmap uses.
func (b *bitmap) serialize(buf []byte, ci, cs int64) []byte {
	n := min(cs, (b.nbits+7)/8-ci*cs)
	first := ci * cs / 8
	for k := int64(0); k < n; k += 8 {
		v := b.bits[first+k/8].Load()
		for i := range min(8, n-k) {
			buf[k+i] = byte(v >> (8 * i))
		}
	}
	return buf[:n]
}

// allBytes reports whether every byte of p is v.
func allBytes(p []byte, v byte) bool {
	for _, c := range p {
		if c != v {
			return false
		}
	}
	return true
}

// bitmapInfo lists the bitmaps as qemu-img info does.
func (d *Disk) bitmapInfo() []map[string]any {
	var list []map[string]any
	for _, b := range d.bitmaps {
		flags := []string{}
		if b.Flags&bitmapInUse != 0 {
			flags = append(flags, "in-use")
		}
		if b.Flags&bitmapAuto != 0 {
			flags = append(flags, "auto")
		}
		list = append(list, map[string]any{"flags": flags, "name": b.Name, "granularity": int64(1) << b.GranBits})
	}
	return list
}

var _ diskserve.BitmapKeeper = (*Disk)(nil)

// DirtyBitmap returns the bitmap called name. A bitmap the image keeps is
// returned live; any other is read from the image on first use, unless it
// is in use (inconsistent) or has extra data this package does not know.
func (d *Disk) DirtyBitmap(name string) (diskserve.DirtyBitmap, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, b := range d.bitmaps {
		if b.Name != name {
			continue
		}
		switch {
		case b.bits != nil:
			return b, nil
		case b.Flags&bitmapInUse != 0:
			return nil, fmt.Errorf("%s: bitmap %q is inconsistent: a writer did not close the image (qemu-img bitmap --clear or --remove it)", d.path, name)
		case !b.usable():
			return nil, fmt.Errorf("%s: bitmap %q has extra data diskserve does not know: %w", d.path, name, diskserve.ErrUnsupported)
		}
		// Read without d.mu, into a copy: an edit may load it meanwhile.
		read, size := *b, d.h.Size
		d.mu.Unlock()
		err := d.loadBitmap(&read, size)
		d.mu.Lock()
		if err != nil {
			return nil, err
		}
		if b.bits == nil && b.TableOffset == read.TableOffset {
			b.table, b.nbits, b.bits = read.table, read.nbits, read.bits
		}
		return b, nil
	}
	have := "none"
	if len(d.bitmaps) > 0 {
		names := make([]string, len(d.bitmaps))
		for i, b := range d.bitmaps {
			names[i] = fmt.Sprintf("%q", b.Name)
		}
		have = strings.Join(names, ", ")
	}
	return nil, fmt.Errorf("%s: no bitmap named %q (the image has %s)", d.path, name, have)
}

// Bitmaps lists the image's bitmaps.
func (d *Disk) Bitmaps() []diskserve.BitmapInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	var list []diskserve.BitmapInfo
	for _, b := range d.bitmaps {
		list = append(list, diskserve.BitmapInfo{Name: b.Name, Granularity: 1 << b.GranBits,
			Enabled: b.Flags&bitmapAuto != 0, InUse: b.Flags&bitmapInUse != 0})
	}
	return list
}

// Granularity returns the bytes one bit covers.
func (b *bitmap) Granularity() int64 { return 1 << b.GranBits }

// DirtyExtents appends the runs of set and clear bits over [off, off+n).
func (b *bitmap) DirtyExtents(dst []diskserve.Extent, off, n int64) []diskserve.Extent {
	end := off + n
	for pos := off; pos < end; {
		i := pos >> b.GranBits
		dirty := b.bit(i)
		last := (end - 1) >> b.GranBits
		j := i + 1
		for j <= last {
			if j%64 == 0 && j+63 <= last {
				if w := b.bits[j/64].Load(); dirty && w == ^uint64(0) || !dirty && w == 0 {
					j += 64
					continue
				}
			}
			if b.bit(j) != dirty {
				break
			}
			j++
		}
		next := min(j<<b.GranBits, end)
		var f diskserve.ExtentFlags
		if dirty {
			f = diskserve.ExtentDirty
		}
		dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: pos, Len: next - pos, Flags: f})
		pos = next
	}
	return dst
}

// bit reports whether bit i is set.
func (b *bitmap) bit(i int64) bool {
	return i < b.nbits && b.bits[i/64].Load()&(1<<(i%64)) != 0
}
