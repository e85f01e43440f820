// Package vhdx reads and writes Hyper-V virtual hard disks (VHDX), as
// Microsoft's VHDX Format Specification 1.0 defines them.
//
// # Layout
//
// The first MiB holds the file identifier ("vhdxfile"), two headers (at
// 64 and 128 KiB; the valid one with the higher sequence number is
// current) and two copies of the region table (192 and 256 KiB), each
// with a CRC-32C. The regions are the block allocation table (BAT) and the
// metadata (block size, virtual size, sector sizes, disk ID). The BAT has
// one 64-bit entry per payload block (1 to 256 MiB): a state (not
// present, zero, unmapped, fully present, ...) and the block's offset in
// MiB; after every chunk of payload entries comes one entry for a sector
// bitmap block, which only differencing disks use (parent.go). A log, named by the
// current header, holds metadata writes that an interrupted writer may
// not have applied.
//
// # Supported
//
//   - Dynamic and fixed disks, read and written; create and convert with
//     -o subformat=dynamic|fixed, block_size, log_size and
//     block_state_zero, with qemu-img's defaults.
//   - The log: replayed on a read-write open when the header names one
//     (its entries validated: checksums, sequence numbers, the file's
//     size); a read-only open of such a disk is refused with a message
//     that says why. diskserve itself writes no log: it writes a block's
//     data and makes it durable before its one BAT entry (one sector), so
//     an interrupted write leaves the BAT consistent.
//   - On the first read-write open, new file and data write GUIDs in both
//     headers, as the specification asks of a writer.
//   - Differencing disks, read and written, and made with create -b: the
//     parent found through the locator's relative_path (or an absolute
//     path of this system), opened read-only through the nesting context
//     and checked by its data write GUID and sector size; partially
//     present blocks read through their sector bitmaps. A write into a
//     block the child does not hold whole stores the block whole (the
//     rest copied from the parent) as fully present: a partially present
//     block in its place, its sector bitmap bits set once its data is
//     durable.
//   - Check: both headers and region tables, BAT entries outside the file
//     or overlapping.
//
// # Not supported
//
//   - Parent locators of other types than VHDX's, and Windows drive,
//     share and volume paths (they name nothing here): such a parent is
//     not found.
//   - Logical sectors of 4 KiB are read and written like 512-byte ones;
//     the disk's logical sector size is reported, not enforced.
//
// # Concurrency
//
// As [blockmap.Disk].
package vhdx

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/internal/blockmap"
)

// Name is the format's name, as qemu-img calls it.
const Name = "vhdx"

// Format is the VHDX format for the opener.
var Format = diskserve.Format{
	Name:   Name,
	Magic:  fileIDMagic,
	Open:   open,
	Create: creator,
}

// Payload block states of the BAT.
const (
	stateNotPresent   = 0
	stateUndefined    = 1
	stateZero         = 2
	stateUnmapped     = 3
	stateFullPresent  = 6
	statePartPresent  = 7
	stateMask         = 7
	batOffsetShift    = 20
	maxBATBytes       = 256 * mib // the largest BAT diskserve loads
	metadataItemLimit = mib       // the largest metadata item diskserve reads
)

func corrupt(off int64, msg string, args ...any) error {
	return diskserve.Corrupt(Name, off, msg, args...)
}

func unsupported(msg string, args ...any) error {
	return diskserve.Unsupported(Name, -1, msg, args...)
}

// Disk is an open VHDX disk.
type Disk struct {
	*blockmap.Disk
	path       string
	hdr        header
	hdrSlot    int64    // offset of the current header
	bat        []uint64 // guarded by blockmap's table lock
	batOff     int64
	blockSize  int64
	chunkRatio int64
	logical    uint32
	physical   uint32
	size       int64
	free       int64 // where the next block goes; guarded by blockmap's allocation lock
	overlap    int64 // a BAT entry whose space another entry names too, or -1
	replayed   int   // log entries replayed at open

	// Differencing disks only.
	locator    map[string]string  // the parent locator's key-value pairs
	parent     diskserve.DiskFile // closed by blockmap's Disk
	parentName string             // the path the parent was found at
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
	d := &Disk{path: oc.Path(), overlap: -1}
	if err := d.readHeaders(c); err != nil {
		return nil, err
	}
	if d.hdr.LogGUID != (guid{}) {
		if oc.ReadOnly() {
			return nil, unsupported("the disk was not closed cleanly and its log must be replayed first, which writes to it: open it read-write once (diskserve replays the log, as Hyper-V and qemu do)")
		}
		if err := d.replayLog(c); err != nil {
			return nil, err
		}
		oc.Logger().Warn("replayed the log of a disk not closed cleanly", "image", oc.Path(), "entries", d.replayed)
	}
	if err := d.readRegions(c); err != nil {
		return nil, err
	}
	if d.locator != nil {
		if err := d.openParent(oc); err != nil {
			return nil, err
		}
	}
	if !oc.ReadOnly() {
		if err := d.openForWriting(c); err != nil {
			if d.parent != nil {
				d.parent.Close()
			}
			return nil, err
		}
	}
	d.Disk = blockmap.New(blockmap.Config{
		Format:    Name,
		Path:      oc.Path(),
		File:      c,
		Size:      d.size,
		BlockSize: d.blockSize,
		Table:     (*table)(d),
		Backing:   d.parent,
		ReadOnly:  oc.ReadOnly(),
	})
	return d, nil
}

// imageFile is what reading a disk's structures needs of its file.
type imageFile interface {
	io.ReaderAt
	Size() int64
}

// openForWriting refuses a disk whose blocks overlap, and gives the
// headers new write GUIDs.
func (d *Disk) openForWriting(c diskserve.DiskFile) error {
	if d.overlap >= 0 {
		return corrupt(d.batOff+d.overlap*8, "BAT entry %d names space another entry names too: writing would change both (open it read-only, or convert it)", d.overlap)
	}
	newGUID(d.hdr.FileWriteGUID[:])
	newGUID(d.hdr.DataWriteGUID[:])
	return d.writeHeaders(c)
}

// readHeaders checks the file identifier and takes the valid header with
// the higher sequence number.
func (d *Disk) readHeaders(c imageFile) error {
	b := make([]byte, 8)
	if err := diskserve.ReadFullAt(c, b, 0); err != nil || string(b) != fileIDMagic {
		return corrupt(0, "no file identifier")
	}
	var best *header
	var errs []error
	for _, off := range []int64{header1Off, header2Off} {
		hb := make([]byte, headerLen)
		if err := diskserve.ReadFullAt(c, hb, off); err != nil {
			errs = append(errs, fmt.Errorf("header at %d: %v", off, err))
			continue
		}
		h, err := parseHeader(hb)
		if err != nil {
			errs = append(errs, fmt.Errorf("header at %d: %v", off, err))
			continue
		}
		if best == nil || h.Seq > best.Seq {
			best, d.hdrSlot = &h, off
		}
	}
	if best == nil {
		return corrupt(header1Off, "neither header is valid: %v", errors.Join(errs...))
	}
	if best.Version != 1 {
		return unsupported("header version %d is not supported (1)", best.Version)
	}
	if best.LogGUID != (guid{}) && best.LogVersion != 0 {
		return unsupported("log version %d is not supported (0)", best.LogVersion)
	}
	d.hdr = *best
	return nil
}

// writeHeaders writes d.hdr with the next sequence numbers into both
// header slots, the one not current first, making each durable, so that
// a crash leaves one valid header at every moment.
func (d *Disk) writeHeaders(c diskserve.DiskFile) error {
	for _, off := range []int64{header1Off + header2Off - d.hdrSlot, d.hdrSlot} {
		d.hdr.Seq++
		if _, err := c.WriteAt(d.hdr.encode(), off); err != nil {
			return err
		}
		if err := diskserve.Flush(c); err != nil {
			return err
		}
	}
	return nil
}

// readRegions reads a valid region table, the metadata and the BAT.
func (d *Disk) readRegions(c imageFile) error {
	var regions []region
	var errs []error
	for _, off := range []int64{region1Off, region2Off} {
		b := make([]byte, regionLen)
		err := diskserve.ReadFullAt(c, b, off)
		if err == nil {
			regions, err = parseRegions(b)
		}
		if err == nil {
			break
		}
		errs = append(errs, fmt.Errorf("region table at %d: %v", off, err))
	}
	if regions == nil {
		return corrupt(region1Off, "neither region table is valid: %v", errors.Join(errs...))
	}
	var bat, meta *region
	for i, r := range regions {
		switch r.GUID {
		case regionBAT:
			bat = &regions[i]
		case regionMetadata:
			meta = &regions[i]
		default:
			if r.Required {
				return unsupported("a required region of an unknown kind (%x)", r.GUID)
			}
		}
		if r.Off%mib != 0 || r.Len%mib != 0 || r.Off < mib || r.Off+uint64(r.Len) > uint64(c.Size()) {
			return corrupt(region1Off, "region %d (%d bytes at %d) is not a MiB-aligned part of the file", i, r.Len, r.Off)
		}
	}
	if bat == nil || meta == nil {
		return corrupt(region1Off, "the region table has no BAT or no metadata region")
	}
	if err := d.readMetadata(c, meta); err != nil {
		return err
	}
	return d.readBAT(c, bat)
}

// readMetadata reads the items diskserve needs from the metadata region.
func (d *Disk) readMetadata(c imageFile, r *region) error {
	tb := make([]byte, 64*kib)
	if err := diskserve.ReadFullAt(c, tb, int64(r.Off)); err != nil {
		return corrupt(int64(r.Off), "read metadata table: %v", err)
	}
	items, err := parseMetaTable(tb)
	if err != nil {
		return corrupt(int64(r.Off), "%v", err)
	}
	values := map[guid][]byte{}
	for _, it := range items {
		switch it.GUID {
		case itemFileParams, itemVirtualSize, itemDiskID, itemLogicalSize, itemPhysicalSize, itemParent:
		default:
			if it.Flags&metaRequired != 0 {
				return unsupported("a required metadata item of an unknown kind (%x)", it.GUID)
			}
			continue
		}
		if it.Len > metadataItemLimit || it.Off < 64*kib || uint64(it.Off)+uint64(it.Len) > uint64(r.Len) {
			return corrupt(int64(r.Off), "metadata item %x (%d bytes at %d) lies outside the metadata region", it.GUID, it.Len, it.Off)
		}
		v := make([]byte, it.Len)
		if err := diskserve.ReadFullAt(c, v, int64(r.Off)+int64(it.Off)); err != nil {
			return corrupt(int64(r.Off)+int64(it.Off), "read metadata item: %v", err)
		}
		values[it.GUID] = v
	}
	need := func(g guid, n int, what string) ([]byte, error) {
		v := values[g]
		if len(v) < n {
			return nil, corrupt(int64(r.Off), "the metadata has no %s", what)
		}
		return v, nil
	}
	fp, err := need(itemFileParams, 8, "file parameters")
	if err != nil {
		return err
	}
	vs, err := need(itemVirtualSize, 8, "virtual disk size")
	if err != nil {
		return err
	}
	ls, err := need(itemLogicalSize, 4, "logical sector size")
	if err != nil {
		return err
	}
	ps, err := need(itemPhysicalSize, 4, "physical sector size")
	if err != nil {
		return err
	}
	d.blockSize = int64(le.Uint32(fp))
	if le.Uint32(fp[4:])&flagHasParent != 0 {
		v, ok := values[itemParent]
		if !ok {
			return corrupt(int64(r.Off), "a differencing disk without a parent locator")
		}
		if d.locator, err = parseLocator(v); err != nil {
			return corrupt(int64(r.Off), "%v", err)
		}
	}
	d.size = int64(le.Uint64(vs))
	d.logical, d.physical = le.Uint32(ls), le.Uint32(ps)
	switch bs := d.blockSize; {
	case bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0:
		return corrupt(int64(r.Off), "block size %d is not a power of two from 1 to 256 MiB", bs)
	case d.logical != 512 && d.logical != 4096:
		return corrupt(int64(r.Off), "logical sector size %d is not 512 or 4096", d.logical)
	case d.size < 0 || d.size > maxDiskSize || d.size%int64(d.logical) != 0:
		return corrupt(int64(r.Off), "virtual size %d is not a whole number of sectors up to 64 TiB", d.size)
	}
	d.chunkRatio = (1 << 23) * int64(d.logical) / d.blockSize
	return nil
}

// blocks returns the number of payload blocks.
func (d *Disk) blocks() int64 { return (d.size + d.blockSize - 1) / d.blockSize }

// batIndex returns the BAT index of payload block i.
func (d *Disk) batIndex(i int64) int64 { return i + i/d.chunkRatio }

// readBAT reads the BAT and checks every stored block against the file.
// A differencing disk's BAT holds every chunk's sector bitmap entry, the
// last chunk's included; the other disks' may end after the last payload
// entry, as qemu-img writes it.
func (d *Disk) readBAT(c imageFile, r *region) error {
	n := d.blocks()
	chunks := (n + d.chunkRatio - 1) / d.chunkRatio
	entries := n + max(0, chunks-1)
	if d.locator != nil {
		entries = chunks * (d.chunkRatio + 1)
	}
	if entries*8 > int64(r.Len) {
		return corrupt(int64(r.Off), "the BAT region (%d bytes) is too small for %d entries", r.Len, entries)
	}
	if entries*8 > maxBATBytes {
		return unsupported("a BAT of %d entries is more than diskserve loads", entries)
	}
	b := make([]byte, entries*8)
	if err := diskserve.ReadFullAt(c, b, int64(r.Off)); err != nil {
		return corrupt(int64(r.Off), "read BAT: %v", err)
	}
	d.batOff = int64(r.Off)
	d.bat = make([]uint64, entries)
	for k := range d.bat {
		d.bat[k] = le.Uint64(b[k*8:])
	}
	type stored struct{ start, end, entry int64 }
	var spans []stored
	place := func(k, length int64, what string) error {
		start := int64(d.bat[k]>>batOffsetShift) * mib
		if start < mib || start > c.Size()-length {
			return corrupt(d.batOff+k*8, "%s is stored at %d, outside the file (%d bytes)", what, start, c.Size())
		}
		spans = append(spans, stored{start, start + length, k})
		return nil
	}
	if d.locator != nil {
		for k := range chunks {
			sb := k*(d.chunkRatio+1) + d.chunkRatio
			switch d.bat[sb] & stateMask {
			case stateNotPresent:
			case sbStatePresent:
				if err := place(sb, sbBlockSize, fmt.Sprintf("the sector bitmap of chunk %d", k)); err != nil {
					return err
				}
			default:
				return corrupt(d.batOff+sb*8, "the sector bitmap of chunk %d has state %d, which is not defined", k, d.bat[sb]&stateMask)
			}
		}
	}
	for i := range n {
		k := d.batIndex(i)
		switch d.bat[k] & stateMask {
		case stateNotPresent, stateUndefined, stateZero, stateUnmapped:
			continue
		case stateFullPresent:
		case statePartPresent:
			if d.locator == nil {
				return corrupt(d.batOff+k*8, "block %d is partly present, which only differencing disks may be", i)
			}
			if d.bat[d.sbIndex(i)]&stateMask != sbStatePresent {
				return corrupt(d.batOff+k*8, "block %d is partly present, and its chunk has no sector bitmap", i)
			}
		default:
			return corrupt(d.batOff+k*8, "block %d has state %d, which is not defined", i, d.bat[k]&stateMask)
		}
		if err := place(k, d.blockSize, fmt.Sprintf("block %d", i)); err != nil {
			return err
		}
	}
	d.free = (c.Size() + mib - 1) / mib * mib
	slices.SortFunc(spans, func(a, b stored) int { return int(a.start - b.start) })
	for k := 1; k < len(spans); k++ {
		if spans[k].start < spans[k-1].end {
			d.overlap = max(spans[k].entry, spans[k-1].entry)
			break
		}
	}
	return nil
}

// table is the BAT as a [blockmap.Table].
type table Disk

// Lookup: a block not present reads from the parent (zeroes without
// one); undefined and unmapped blocks read as zeroes, which the
// specification allows, and which keeps a differencing disk's unmapped
// block from showing its parent's data again.
func (t *table) Lookup(i int64) blockmap.Block {
	e := t.bat[(*Disk)(t).batIndex(i)]
	host := int64(e>>batOffsetShift) * mib
	switch e & stateMask {
	case stateFullPresent:
		return blockmap.Block{State: blockmap.Data, Host: host}
	case statePartPresent:
		return blockmap.Block{State: blockmap.Special, Host: host}
	case stateZero:
		return blockmap.Block{State: blockmap.Zero}
	case stateUndefined, stateUnmapped:
		if t.parent != nil {
			return blockmap.Block{State: blockmap.Zero}
		}
	}
	return blockmap.Block{State: blockmap.Unallocated}
}

// Reserve puts a block at the end of the file, at a whole MiB. A
// partially present block stays where it is: the disk writes it whole in
// place, and Record sets its sector bitmap bits and makes it fully
// present. (Only the allocation of block i sets its entry: it may be
// read here without the table lock.)
func (t *table) Reserve(i int64) (int64, error) {
	if b := t.Lookup(i); b.State == blockmap.Special {
		return b.Host, nil
	}
	if t.free/mib >= 1<<44 {
		return 0, fmt.Errorf("the file has grown past what a BAT entry can address")
	}
	host := t.free
	t.free += t.blockSize
	return host, nil
}

// Record writes the block's BAT entry: one sector, after the block's data
// is durable. A differencing disk's block also gets its sector bitmap
// bits set first (markPresent).
func (t *table) Record(i int64, host int64) error {
	if t.parent != nil {
		if err := (*Disk)(t).markPresent(i); err != nil {
			return err
		}
	}
	return t.writeEntry(i, uint64(host/mib)<<batOffsetShift|stateFullPresent)
}

// RecordZero marks an unallocated block as zero.
func (t *table) RecordZero(i int64) error {
	return t.writeEntry(i, stateZero)
}

func (t *table) writeEntry(i int64, e uint64) error {
	var b [8]byte
	le.PutUint64(b[:], e)
	_, err := (*Disk)(t).File().WriteAt(b[:], t.batOff+(*Disk)(t).batIndex(i)*8)
	return err
}

func (t *table) Set(i int64, b blockmap.Block) {
	e := uint64(stateZero)
	if b.State == blockmap.Data {
		e = uint64(b.Host/mib)<<batOffsetShift | stateFullPresent
	}
	t.bat[(*Disk)(t).batIndex(i)] = e
}

// Describe reports the block size as qemu-img info's cluster_size, the
// sector sizes, and a differencing disk's parent.
func (d *Disk) Describe(info *diskserve.Info) {
	info.Format = Name
	info.Filename = d.path
	info.ClusterSize = d.blockSize
	info.Specific = map[string]any{
		"logical-sector-size":  d.logical,
		"physical-sector-size": d.physical,
	}
	if d.parent != nil {
		info.BackingFile = d.parentName
		pi := diskserve.Describe(d.parent)
		info.Backing = &pi
	}
}

// Check re-reads both headers and region tables (one of each must be
// valid, and a damaged second copy is reported), and reports overlapping
// blocks.
func (d *Disk) Check(diskserve.Repair) (diskserve.CheckReport, error) {
	var r diskserve.CheckReport
	err := d.Exclusive(func() error {
		c := d.File()
		problem := func(format string, args ...any) {
			r.Corruptions++
			r.Messages = append(r.Messages, "ERROR: "+fmt.Sprintf(format, args...))
		}
		for _, off := range []int64{header1Off, header2Off} {
			b := make([]byte, headerLen)
			if err := diskserve.ReadFullAt(c, b, off); err != nil {
				return err
			}
			if _, err := parseHeader(b); err != nil {
				problem("header at %d: %v", off, err)
			}
		}
		for _, off := range []int64{region1Off, region2Off} {
			b := make([]byte, regionLen)
			if err := diskserve.ReadFullAt(c, b, off); err != nil {
				return err
			}
			if _, err := parseRegions(b); err != nil {
				problem("region table at %d: %v", off, err)
			}
		}
		if d.overlap >= 0 {
			problem("BAT entry %d names space another entry names too", d.overlap)
		}
		return nil
	})
	return r, err
}

// newGUID fills b with a random (version 4) GUID.
func newGUID(b []byte) {
	rand.Read(b)
	b[7] = b[7]&0x0f | 0x40 // the version, in the stored byte order
	b[8] = b[8]&0x3f | 0x80
}
