// Package vhd reads and writes Virtual PC and Hyper-V disk images (VHD),
// as the VHD Image Format Specification 1.0 defines them, under qemu-img's
// name for the format, vpc.
//
// # Layout
//
// Every VHD ends with a 512-byte footer (big-endian: size, CHS geometry,
// disk type, UUID, checksum). A fixed disk is the raw disk followed by
// the footer. A dynamic disk starts with a copy of the footer, then a
// 1024-byte dynamic header pointing at the block allocation table (BAT):
// one big-endian uint32 per block (2 MiB by default), the sector where the
// block's sector bitmap starts, or 0xFFFFFFFF for a block never written.
// Each stored block is its bitmap (one bit per sector, padded to a sector)
// and then its data. New blocks go where the footer was, and the footer
// moves after them.
//
// # Sizes
//
// Readers disagree on a VHD's size. Virtual PC takes the CHS geometry,
// Hyper-V the footer's current size. Like qemu, diskserve takes the
// geometry when the creator application is Virtual PC's or qemu's ("vpc ",
// "qemu") and the geometry is not the largest one, and the current size
// otherwise. A new image sized by geometry (qemu-img's default) is rounded
// up to the smallest geometry that holds the size asked for; with
// force_size=on (what Azure needs: a whole number of MiB) the size is kept
// and the geometry set to the largest, so that every reader takes the
// footer's size.
//
// # Probing
//
// Only dynamic and differencing disks start with a footer. A fixed disk is
// recognised only when the format is named (-f vpc): a footer at the end
// of a file is something a guest can write into a raw disk.
//
// # Supported
//
//   - Fixed and dynamic disks, read and written; create and convert with
//     -o subformat=dynamic|fixed and force_size.
//
//   - Footer and dynamic header checksums: a mismatch is reported by check
//     and logged at open (qemu opens such images too).
//
//   - Check: checksums, the footer copies, BAT entries out of the file or
//     overlapping.
//
//   - Differencing disks, read and written: the parent found through the
//     header's locators (relative path first, then absolute, then the
//     bare name), opened through the nesting context, and checked by its
//     UUID; sectors whose bitmap bit is clear read from the parent.
//     `create -b PARENT` makes one. A write into a block the child holds
//     in part writes the whole block in its place (the rest copied from
//     the parent), and sets every bit of its bitmap once the data is
//     durable.
//
// # Not supported
//
//   - Sector bitmaps of dynamic disks are not consulted (as in qemu): a
//     stored block is read whole.
//   - qemu 7.2 opens differencing disks as if they had no parent, so
//     their interop is tested against diskserve's own model only.
//
// # Concurrency
//
// As [blockmap.Disk] for dynamic disks; fixed disks are a window onto the
// file.
package vhd

import (
	"crypto/rand"
	"fmt"
	"slices"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/internal/blockmap"
	"github.com/diskserve/diskserve/internal/window"
)

// Name is the format's name, as qemu-img calls it.
const Name = "vpc"

// Format is the VHD format for the opener.
var Format = diskserve.Format{
	Name:   Name,
	Magic:  cookie,
	Open:   open,
	Create: creator,
}

const (
	// maxBlocks bounds the BAT diskserve loads: 64 MiB of table.
	maxBlocks = 16 << 20
	// maxBlockSize bounds a block: the largest the VHDX format allows.
	maxBlockSize = 256 << 20
)

func corrupt(off int64, msg string, args ...any) error {
	return diskserve.Corrupt(Name, off, msg, args...)
}

func unsupported(msg string, args ...any) error {
	return diskserve.Unsupported(Name, -1, msg, args...)
}

// dynHeader is the part of the dynamic disk header diskserve uses.
type dynHeader struct {
	TableOffset     uint64
	MaxTableEntries uint32
	BlockSize       uint32
	checksumOK      bool
}

// parseDynHeader decodes the dynamic disk header read at off.
func parseDynHeader(b []byte, off int64) (dynHeader, error) {
	var h dynHeader
	if len(b) < dynHeaderLen || string(b[:8]) != dynCookie {
		return h, corrupt(off, "no dynamic disk header (the cookie %q is missing)", dynCookie)
	}
	h.TableOffset = be.Uint64(b[16:])
	h.MaxTableEntries = be.Uint32(b[28:])
	h.BlockSize = be.Uint32(b[32:])
	h.checksumOK = checksum(b[:dynHeaderLen], 36) == be.Uint32(b[36:])
	switch bs := h.BlockSize; {
	case bs < sectorSize || bs&(bs-1) != 0:
		return h, corrupt(off+32, "block size %d is not a power of two of at least 512", bs)
	case bs > maxBlockSize:
		return h, unsupported("block size %d is larger than diskserve supports (%d)", bs, maxBlockSize)
	case h.MaxTableEntries > maxBlocks:
		return h, unsupported("%d blocks are more than diskserve loads (%d)", h.MaxTableEntries, maxBlocks)
	case h.TableOffset%sectorSize != 0 || h.TableOffset > 1<<62:
		return h, corrupt(off+16, "BAT offset %d is not a sector in the file", h.TableOffset)
	}
	return h, nil
}

// bitmapSize is the size of a block's sector bitmap, padded to a sector.
func bitmapSize(blockSize uint32) int64 {
	return (int64(blockSize)/sectorSize/8 + sectorSize - 1) / sectorSize * sectorSize
}

// Disk is an open dynamic VHD.
type Disk struct {
	*blockmap.Disk
	path       string
	foot       footer
	dyn        dynHeader
	bitmap     int64          // bytes of a block's sector bitmap
	bat        []uint32       // guarded by blockmap's table lock
	full       []bool         // of a differencing disk: blocks whose bitmap says all present; guarded by blockmap's table lock
	parentName []string       // of a differencing disk: the names its header gives the parent
	free       int64          // where the next block's bitmap goes; guarded by blockmap's allocation lock
	wholed     map[int64]bool // blocks being made whole in place, whose bitmaps Record sets; guarded by blockmap's allocation lock
	overlap    int64          // a block that shares space with another, or -1
}

var (
	_ diskserve.DiskFile     = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.ZeroWriter   = (*Disk)(nil)
	_ diskserve.HolePuncher  = (*Disk)(nil)
	_ diskserve.Flusher      = (*Disk)(nil)
	_ diskserve.Describer    = (*Disk)(nil)
	_ diskserve.Checker      = (*Disk)(nil)
)

func open(c diskserve.DiskFile, oc *diskserve.OpenContext) (diskserve.DiskFile, error) {
	b := make([]byte, footerLen)
	if err := diskserve.ReadFullAt(c, b, 0); err != nil {
		return nil, corrupt(0, "read footer: %v", err)
	}
	if string(b[:8]) != cookie {
		return openFixed(c, oc)
	}
	f, err := parseFooter(b, 0)
	if err != nil {
		return nil, err
	}
	if !f.checksumOK {
		oc.Logger().Warn("the footer checksum is wrong", "image", oc.Path())
	}
	switch f.Type {
	case typeDynamic, typeDifferencing:
	default:
		return nil, unsupported("a disk of type %d with a footer copy at its start is not supported", f.Type)
	}
	return openDynamic(c, oc, f)
}

// openFixed opens a fixed disk: the data, then the footer in the last 512
// bytes of the file.
func openFixed(c diskserve.DiskFile, oc *diskserve.OpenContext) (diskserve.DiskFile, error) {
	end := c.Size() - footerLen
	if end < 0 {
		return nil, corrupt(0, "the file is shorter than a footer")
	}
	b := make([]byte, footerLen)
	if err := diskserve.ReadFullAt(c, b, end); err != nil {
		return nil, corrupt(end, "read footer: %v", err)
	}
	f, err := parseFooter(b, end)
	if err != nil {
		return nil, err
	}
	if f.Type != typeFixed {
		return nil, corrupt(end+60, "the footer at the end says disk type %d, but only a fixed disk (2) has no copy at the start", f.Type)
	}
	if !f.checksumOK {
		oc.Logger().Warn("the footer checksum is wrong", "image", oc.Path())
	}
	size := f.virtualSectors() * sectorSize
	if size > end {
		return nil, corrupt(end, "the footer claims %d bytes, the file holds %d before it", size, end)
	}
	return &Fixed{Disk: window.New(c, 0, size, true).Allocated(), path: oc.Path(), foot: f}, nil
}

// openDynamic opens a dynamic disk whose footer copy is f.
func openDynamic(c diskserve.DiskFile, oc *diskserve.OpenContext, f footer) (diskserve.DiskFile, error) {
	sectors := f.virtualSectors()
	if sectors > maxSectors {
		return nil, unsupported("a disk of %d bytes is larger than VHD allows (2040 GiB)", sectors*sectorSize)
	}
	if f.DataOffset > 1<<62 {
		return nil, corrupt(16, "dynamic header offset %#x is not in the file", f.DataOffset)
	}
	hb := make([]byte, dynHeaderLen)
	if err := diskserve.ReadFullAt(c, hb, int64(f.DataOffset)); err != nil {
		return nil, corrupt(int64(f.DataOffset), "read dynamic header: %v", err)
	}
	h, err := parseDynHeader(hb, int64(f.DataOffset))
	if err != nil {
		return nil, err
	}
	if !h.checksumOK {
		oc.Logger().Warn("the dynamic header checksum is wrong", "image", oc.Path())
	}
	if int64(h.MaxTableEntries)*int64(h.BlockSize) < sectors*sectorSize {
		return nil, corrupt(int64(f.DataOffset)+28, "%d blocks of %d bytes do not hold the disk's %d bytes", h.MaxTableEntries, h.BlockSize, sectors*sectorSize)
	}
	tb := make([]byte, int64(h.MaxTableEntries)*4)
	if err := diskserve.ReadFullAt(c, tb, int64(h.TableOffset)); err != nil {
		return nil, corrupt(int64(h.TableOffset), "read BAT: %v", err)
	}
	d := &Disk{path: oc.Path(), foot: f, dyn: h, bitmap: bitmapSize(h.BlockSize), overlap: -1}
	var parent diskserve.DiskFile
	if f.Type == typeDifferencing {
		if parent, err = openParent(c, oc, hb, int64(f.DataOffset)); err != nil {
			return nil, err
		}
		d.full = make([]bool, h.MaxTableEntries)
		d.parentName, _ = parentNames(c, hb, int64(f.DataOffset))
	}
	closeParent := func() {
		if parent != nil {
			parent.Close()
		}
	}
	d.bat = make([]uint32, h.MaxTableEntries)
	for i := range d.bat {
		d.bat[i] = be.Uint32(tb[i*4:])
	}
	tableEnd := (int64(h.TableOffset) + int64(len(tb)) + sectorSize - 1) / sectorSize * sectorSize
	if d.free, err = d.validateBAT(tableEnd, c.Size()); err != nil {
		closeParent()
		return nil, err
	}
	if d.overlap >= 0 && !oc.ReadOnly() {
		closeParent()
		return nil, corrupt(int64(h.TableOffset)+d.overlap*4, "block %d shares its space with another block: writing would change both (open it read-only, or convert it)", d.overlap)
	}
	d.Disk = blockmap.New(blockmap.Config{
		Format:    Name,
		Path:      oc.Path(),
		File:      c,
		Size:      sectors * sectorSize,
		BlockSize: int64(h.BlockSize),
		Table:     (*table)(d),
		Backing:   parent,
		ReadOnly:  oc.ReadOnly(),
		OwnHoles:  true,
	})
	return d, nil
}

// validateBAT checks that every stored block lies after the BAT and inside
// the file, notes the first block that overlaps another, and returns where
// the next block goes: after the last stored block, or after the BAT.
func (d *Disk) validateBAT(tableEnd, fileSize int64) (int64, error) {
	span := d.bitmap + int64(d.dyn.BlockSize)
	type stored struct{ start, block int64 }
	var blocks []stored
	free := tableEnd
	for i, e := range d.bat {
		if e == 0xFFFFFFFF {
			continue
		}
		start := int64(e) * sectorSize
		if overlaps(start, span, 0, footerLen) || overlaps(start, span, int64(d.foot.DataOffset), dynHeaderLen) || overlaps(start, span, int64(d.dyn.TableOffset), tableEnd-int64(d.dyn.TableOffset)) {
			return 0, corrupt(int64(d.dyn.TableOffset)+int64(i)*4, "block %d is stored at %d, over the image's headers", i, start)
		}
		if start+span > fileSize {
			return 0, corrupt(int64(d.dyn.TableOffset)+int64(i)*4, "block %d is stored at %d, past the end of the file (%d bytes): the image is truncated", i, start, fileSize)
		}
		blocks = append(blocks, stored{start, int64(i)})
		free = max(free, start+span)
	}
	slices.SortFunc(blocks, func(a, b stored) int { return int(a.start - b.start) })
	for k := 1; k < len(blocks); k++ {
		if blocks[k].start < blocks[k-1].start+span {
			d.overlap = max(blocks[k].block, blocks[k-1].block)
			break
		}
	}
	return free, nil
}

// overlaps reports whether [a, a+an) and [b, b+bn) share a byte.
func overlaps(a, an, b, bn int64) bool { return a < b+bn && b < a+an }

// table is the BAT as a [blockmap.Table].
type table Disk

func (t *table) Lookup(i int64) blockmap.Block {
	e := t.bat[i]
	if e == 0xFFFFFFFF {
		return blockmap.Block{State: blockmap.Unallocated}
	}
	host := int64(e)*sectorSize + t.bitmap
	if t.full != nil && !t.full[i] { // its bitmap says which sectors it holds
		return blockmap.Block{State: blockmap.Special, Host: host}
	}
	return blockmap.Block{State: blockmap.Data, Host: host}
}

// Reserve puts block i where the footer is: its bitmap, all sectors
// present (as qemu writes it), then its data. A block of a differencing
// disk that holds only some of its sectors stays where it is: the disk
// writes it whole in place, and Record then sets every bit of its bitmap.
func (t *table) Reserve(i int64) (int64, error) {
	// Only the allocation of block i sets its entry: it may be read here
	// without the table lock.
	if b := t.Lookup(i); b.State == blockmap.Special {
		if t.wholed == nil {
			t.wholed = map[int64]bool{}
		}
		t.wholed[i] = true
		return b.Host, nil
	}
	if t.free/sectorSize > 0xFFFFFFFE {
		return 0, fmt.Errorf("the image file has grown past what a BAT entry can address")
	}
	c := (*Disk)(t).File()
	if c.Size() < t.free+t.bitmap {
		if err := diskserve.Resize(c, t.free+t.bitmap); err != nil {
			return 0, err
		}
	}
	bm := make([]byte, t.bitmap)
	for k := range bm {
		bm[k] = 0xFF
	}
	if _, err := c.WriteAt(bm, t.free); err != nil {
		return 0, err
	}
	host := t.free + t.bitmap
	t.free = host + int64(t.dyn.BlockSize)
	return host, nil
}

// Record writes the bitmap of a block made whole in place, the footer at
// the file's end, after every block reserved so far, then the BAT entry.
// Until then a dynamic disk's footer is found by its copy at the start.
func (t *table) Record(i int64, host int64) error {
	c := (*Disk)(t).File()
	if t.wholed[i] {
		bm := make([]byte, t.bitmap)
		for k := range bm {
			bm[k] = 0xFF
		}
		if _, err := c.WriteAt(bm, host-t.bitmap); err != nil {
			return err
		}
		delete(t.wholed, i)
	}
	if c.Size() < t.free+footerLen {
		if err := diskserve.Resize(c, t.free+footerLen); err != nil {
			return err
		}
	}
	fb := make([]byte, footerLen)
	t.foot.encode(fb)
	if _, err := c.WriteAt(fb, t.free); err != nil {
		return err
	}
	var b [4]byte
	be.PutUint32(b[:], uint32((host-t.bitmap)/sectorSize))
	_, err := c.WriteAt(b[:], int64(t.dyn.TableOffset)+i*4)
	return err
}

// Set records a block the disk stored whole: its bitmap says every
// sector is present.
func (t *table) Set(i int64, b blockmap.Block) {
	t.bat[i] = uint32((b.Host - t.bitmap) / sectorSize)
	if t.full != nil {
		t.full[i] = true
	}
}

// Describe reports the block size as qemu-img info's cluster_size, and
// the subformat and creator.
func (d *Disk) Describe(info *diskserve.Info) {
	info.Format = Name
	info.Filename = d.path
	info.ClusterSize = int64(d.dyn.BlockSize)
	info.Specific = describeFooter(&d.foot)
	if bd := d.Backing(); bd != nil {
		if len(d.parentName) > 0 {
			info.BackingFile = d.parentName[0]
		}
		pi := diskserve.Describe(bd)
		info.Backing = &pi
	}
}

// describeFooter returns the footer's facts for info.
func describeFooter(f *footer) map[string]any {
	kind := map[uint32]string{typeFixed: "fixed", typeDynamic: "dynamic", typeDifferencing: "differencing"}[f.Type]
	return map[string]any{
		"subformat":   kind,
		"creator-app": string(f.CreatorApp[:]),
		"geometry":    fmt.Sprintf("%d/%d/%d", f.Cylinders, f.Heads, f.Sectors),
	}
}

// Check reports wrong checksums and blocks that overlap, and, as leaked
// space, a file whose end holds no copy of the footer: what a crash in an
// allocation leaves. With repair, it writes the footer back after the
// last block and cuts the file there.
func (d *Disk) Check(repair diskserve.Repair) (diskserve.CheckReport, error) {
	var r diskserve.CheckReport
	err := d.Exclusive(func() error {
		problem := func(format string, args ...any) {
			r.Corruptions++
			r.Messages = append(r.Messages, "ERROR: "+fmt.Sprintf(format, args...))
		}
		if !d.foot.checksumOK {
			problem("the footer checksum is wrong")
		}
		if !d.dyn.checksumOK {
			problem("the dynamic header checksum is wrong")
		}
		if d.overlap >= 0 {
			problem("block %d shares its space with another block", d.overlap)
		}
		c := d.File()
		b := make([]byte, footerLen)
		if err := diskserve.ReadFullAt(c, b, c.Size()-footerLen); err != nil {
			return err
		}
		start := make([]byte, footerLen)
		if err := diskserve.ReadFullAt(c, start, 0); err != nil {
			return err
		}
		if string(b) != string(start) {
			// An allocation cut short (the block reserved and written, the
			// footer not yet moved after it) leaves this: readers take the
			// copy at the start, and the block is unused space.
			if repair == diskserve.RepairNone || d.ReadOnly() {
				r.Leaks++
				r.Messages = append(r.Messages, "Leaked space: the end of the file holds no copy of the footer (an allocation was cut short); -r leaks writes it after the last block")
			} else {
				if _, err := c.WriteAt(start, d.free); err != nil {
					return err
				}
				if err := diskserve.Resize(c, d.free+footerLen); err != nil {
					return err
				}
				if err := diskserve.Flush(c); err != nil {
					return err
				}
				r.Leaks++
				r.LeaksFixed++
			}
		}
		for i := range int64(len(d.bat)) {
			if d.Lookup(i).State == blockmap.Data {
				r.Allocated++
			}
		}
		r.TotalClusters = int64(len(d.bat))
		r.ImageEndOffset = d.free + footerLen
		return nil
	})
	return r, err
}

// A Fixed is an open fixed VHD: the disk's bytes as they are in the file,
// before the footer.
type Fixed struct {
	*window.Disk
	path string
	foot footer
}

var (
	_ diskserve.Describer  = (*Fixed)(nil)
	_ diskserve.Checker    = (*Fixed)(nil)
	_ diskserve.HostMapper = (*Fixed)(nil)
)

// Describe reports the subformat and creator.
func (f *Fixed) Describe(info *diskserve.Info) {
	info.Format = Name
	info.Filename = f.path
	info.Specific = describeFooter(&f.foot)
}

// Check reports a wrong footer checksum.
func (f *Fixed) Check(diskserve.Repair) (diskserve.CheckReport, error) {
	var r diskserve.CheckReport
	if !f.foot.checksumOK {
		r.Corruptions++
		r.Messages = append(r.Messages, "ERROR: the footer checksum is wrong")
	}
	r.ImageEndOffset = f.Size() + footerLen
	return r, nil
}

// newUUID fills b with a random (version 4) UUID.
func newUUID(b []byte) {
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
}
