// Package blockmap serves the disks of formats that cut the virtual disk
// into blocks of one size and keep a table saying where in the image file
// each block is stored, if anywhere: VDI's block map, VHD's BAT, VMDK's
// grain tables, VHDX's BAT. The format parses its headers and owns the
// table's encoding ([Table]); a [Disk] does the rest: splitting requests
// at block boundaries, reading holes from the backing disk or as zeroes,
// allocating blocks on first write with the data before the table entry,
// zeroing, extents, flushing and closing.
//
// # Concurrency
//
// Reads and writes of allocated blocks run in parallel and hold no lock
// across I/O. Allocations take one mutex to reserve their place and to
// record it, and write their data without it, so that blocks allocate in
// parallel; writers of a block being allocated wait for it. A block is
// allocated once: it never moves and is never freed while the disk is
// open, so a location looked up stays valid.
package blockmap

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/diskserve/diskserve"
)

// State is what a table entry says of a block.
type State uint8

const (
	// Unallocated blocks read from the backing disk, or as zeroes when
	// there is none.
	Unallocated State = iota
	// Zero blocks read as zeroes whatever is below.
	Zero
	// Data blocks are stored at [Block.Host], BlockSize bytes in a row.
	Data
	// Special blocks are read by the table ([SpecialReader]): compressed
	// grains, blocks present only in part. They are never written in
	// place.
	Special
)

// A Block is the table entry of one block.
type Block struct {
	State State
	Host  int64 // byte offset of the block in the image file, for Data
}

// A Table is a format's block table.
//
// Lookup is called concurrently, and is excluded only from Set. The
// other methods are called one at a time, with allocations serialised.
type Table interface {
	// Lookup returns the entry of block i, from memory.
	Lookup(i int64) Block

	// Reserve returns where a new block i will be stored, the file
	// offset of its first data byte, and takes that space: the next
	// Reserve returns a place after it. It may write what must precede
	// the data (VHD's sector bitmap). The disk then grows the file to
	// hold the block and writes the data there (skipping runs of zeroes
	// in space the file did not have).
	Reserve(i int64) (host int64, err error)

	// Record writes the entry saying block i is stored at host into the
	// image file (and whatever else an allocation changes: the VHD
	// footer at the file's new end, a VDI header's count). The disk calls
	// it at its next flush, once the block's data is durable, for the
	// blocks allocated since, in the order they were reserved.
	Record(i int64, host int64) error

	// Set makes Lookup(i) return b.
	Set(i int64, b Block)
}

// A SpecialReader reads [Special] blocks.
type SpecialReader interface {
	// ReadSpecial fills p with the bytes of block i from offset off
	// inside it; below reads the layers beneath for what the block
	// leaves to them (it reads zeroes where there is none).
	ReadSpecial(i int64, b Block, p []byte, off int64, below io.ReaderAt) error
}

// A ZeroRecorder can record a block as reading zeroes without storing
// data (VMDK's zero grains). RecordZero returns an error wrapping
// [errors.ErrUnsupported] for a block it cannot record so (an extent
// without zero grains), and the block is then stored.
type ZeroRecorder interface {
	RecordZero(i int64) error
}

// A RunReporter knows runs of unallocated blocks (an absent VMDK grain
// table), so that extent walks over a huge sparse disk skip them whole.
type RunReporter interface {
	// Unallocated returns how many blocks from i on are unallocated
	// for certain; 0 if it does not know.
	Unallocated(i int64) int64
}

// Config is what a format tells [New] of its image.
type Config struct {
	Format    string             // for messages: "vdi"
	Path      string             // the image file, for messages
	File      diskserve.DiskFile // the image file; the disk closes it
	Size      int64              // virtual size
	BlockSize int64              // bytes per block
	Table     Table
	Backing   diskserve.DiskFile // the disk below, or nil; the disk closes it
	ReadOnly  bool

	// OwnHoles makes unallocated blocks that no disk below reaches the
	// image's own in allocation depths (depth 1, not 0): qemu reports
	// them so for VDI and VHD, whose drivers call them zeroes.
	OwnHoles bool

	// Sync makes writes to File durable. It defaults to [diskserve.Flush]
	// of File.
	Sync func() error

	// Close runs before File is closed, with the table quiet: to write
	// back what the format keeps in memory (a header marked open).
	Close func() error
}

// A Disk is a block-mapped image.
type Disk struct {
	cfg Config

	mu        sync.RWMutex   // guards the table against Set
	allocMu   sync.Mutex     // serialises reservations and records
	allocated *sync.Cond     // on allocMu: an allocation in flight ended
	inflight  map[int64]bool // under allocMu: blocks whose data is being written
	failed    error          // under allocMu: a failed allocation stops writes
	pending   []int64        // under allocMu: blocks allocated, not yet recorded in the file
}

// maxPending bounds the blocks allocated between two records: past it an
// allocation records them all, so that a client that never flushes loses
// at most that many blocks' entries to a crash.
const maxPending = 4096

// New returns the disk that cfg describes.
func New(cfg Config) *Disk {
	if cfg.Sync == nil {
		cfg.Sync = func() error { return diskserve.Flush(cfg.File) }
	}
	d := &Disk{cfg: cfg, inflight: map[int64]bool{}}
	d.allocated = sync.NewCond(&d.allocMu)
	return d
}

// Size returns the virtual size.
func (d *Disk) Size() int64 { return d.cfg.Size }

// ReadOnly reports whether writes are refused.
func (d *Disk) ReadOnly() bool { return d.cfg.ReadOnly }

// File returns the image file.
func (d *Disk) File() diskserve.DiskFile { return d.cfg.File }

// Backing returns the disk below, or nil.
func (d *Disk) Backing() diskserve.DiskFile { return d.cfg.Backing }

// Lookup returns the entry of block i.
func (d *Disk) Lookup(i int64) Block {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.cfg.Table.Lookup(i)
}

// Exclusive runs fn with allocations excluded and, on a writable disk,
// every allocation recorded in the file: for checks and repairs that walk
// the table, the format's counters and the file.
func (d *Disk) Exclusive(fn func() error) error {
	d.allocMu.Lock()
	defer d.allocMu.Unlock()
	if !d.cfg.ReadOnly {
		if err := d.record(); err != nil {
			return err
		}
	}
	return fn()
}

// ReadAt reads the virtual disk.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(d.cfg.Size, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	bs := d.cfg.BlockSize
	for done := 0; done < len(p); {
		pos := off + int64(done)
		i, in := pos/bs, pos%bs
		n := min(int64(len(p)-done), bs-in)
		if b := d.Lookup(i); b.State == Data {
			// Blocks stored one after another read in one call.
			k := d.dataRun(i, b, (in+int64(len(p)-done)+bs-1)/bs)
			n = min(int64(len(p)-done), k*bs-in)
			if err := d.readHost(p[done:done+int(n)], b.Host+in); err != nil {
				return done, err
			}
		} else if err := d.readBlock(i, p[done:done+int(n)], in); err != nil {
			return done, err
		}
		done += int(n)
	}
	return len(p), eof
}

// dataRun returns how many blocks from i on, up to limit, are stored one
// after another in the image file, block i at b (a Data block) first.
func (d *Disk) dataRun(i int64, b Block, limit int64) int64 {
	k := int64(1)
	for ; k < limit; k++ {
		next := d.Lookup(i + k)
		if next.State != Data || next.Host != b.Host+k*d.cfg.BlockSize {
			break
		}
	}
	return k
}

// readBlock fills p from block i at offset in.
func (d *Disk) readBlock(i int64, p []byte, in int64) error {
	b := d.Lookup(i)
	switch b.State {
	case Data:
		return d.readHost(p, b.Host+in)
	case Special:
		sr, ok := d.cfg.Table.(SpecialReader)
		if !ok {
			return fmt.Errorf("%s: block %d has no reader", d.cfg.Format, i)
		}
		return sr.ReadSpecial(i, b, p, in, below{d, i * d.cfg.BlockSize})
	case Unallocated:
		return d.readBelow(p, i*d.cfg.BlockSize+in)
	}
	clear(p)
	return nil
}

// readHost reads image file bytes, naming the image in errors.
func (d *Disk) readHost(p []byte, off int64) error {
	if err := diskserve.ReadFullAt(d.cfg.File, p, off); err != nil {
		return fmt.Errorf("%s: read %d bytes at %d: %w", d.cfg.Path, len(p), off, err)
	}
	return nil
}

// readBelow fills p with what the layers below the image hold at the
// virtual offset off: the backing disk's bytes, zeroes past its end or
// without one.
func (d *Disk) readBelow(p []byte, off int64) error {
	bd := d.cfg.Backing
	if bd == nil || off >= bd.Size() {
		clear(p)
		return nil
	}
	n, err := bd.ReadAt(p, off)
	if err == io.EOF && off+int64(n) >= bd.Size() {
		err = nil
	}
	if err != nil {
		return err
	}
	clear(p[n:])
	return nil
}

// below reads the layers below one block, for [SpecialReader]s.
type below struct {
	d    *Disk
	base int64
}

func (b below) ReadAt(p []byte, off int64) (int, error) {
	if err := b.d.readBelow(p, b.base+off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes the virtual disk, allocating the blocks it touches.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := diskserve.CheckWrite(d, off, int64(len(p))); err != nil {
		return 0, err
	}
	bs := d.cfg.BlockSize
	for done := 0; done < len(p); {
		pos := off + int64(done)
		i, in := pos/bs, pos%bs
		n := min(int64(len(p)-done), bs-in)
		if err := d.writeBlock(i, p[done:done+int(n)], in); err != nil {
			return done, err
		}
		done += int(n)
	}
	return len(p), nil
}

// writeBlock writes p into block i at offset in.
func (d *Disk) writeBlock(i int64, p []byte, in int64) error {
	if b := d.Lookup(i); b.State == Data {
		return d.writeHost(p, b.Host+in)
	}
	return d.allocate(i, in, int64(len(p)), p)
}

// piece is how much of a block allocate holds in memory at a time.
const piece = 1 << 20

// allocate stores block i anew: its current content with [in, in+n)
// replaced by p, or by zeroes when p is nil. The content is built and
// written a piece at a time; where the block lies in space the file did
// not have before and its old content is zeroes, only the new bytes are
// written, so that the image file stays sparse and a small first write
// costs no more than its bytes. The
// block's entry is in memory at once and reaches the file at the next
// flush (record). A failure after the place is reserved leaves the disk
// refusing writes: the file's end may no longer be where the table
// thinks.
func (d *Disk) allocate(i, in, n int64, p []byte) error {
	d.allocMu.Lock()
	b := d.Lookup(i)
	for b.State != Data && d.inflight[i] { // another writer is allocating it
		d.allocated.Wait()
		b = d.Lookup(i)
	}
	if b.State == Data { // allocated meanwhile
		d.allocMu.Unlock()
		if p == nil {
			return diskserve.WriteZeroes(d.cfg.File, b.Host+in, n, 0)
		}
		return d.writeHost(p, b.Host+in)
	}
	if d.failed != nil {
		d.allocMu.Unlock()
		return d.failed
	}
	bs := d.cfg.BlockSize
	fresh := d.cfg.File.Size()
	host, err := d.cfg.Table.Reserve(i)
	if err != nil { // nothing taken: later writes may still succeed
		d.allocMu.Unlock()
		return fmt.Errorf("%s: %w", d.cfg.Path, err)
	}
	if end := host + bs; d.cfg.File.Size() < end {
		err = diskserve.Resize(d.cfg.File, end)
	}
	if err == nil {
		d.inflight[i] = true
	}
	d.allocMu.Unlock()

	// The data is written without the lock: other blocks allocate
	// meanwhile, and writers of this one wait for it.
	var buf []byte
	oldZero := b.State == Zero || b.State == Unallocated && d.belowIsZero(i*bs, bs)
	for o := int64(0); err == nil && o < bs; o += piece {
		k := min(piece, bs-o)
		var part []byte
		lo, hi := max(o, in), min(o+k, in+n) // the new bytes in this piece
		switch {
		case host+o >= fresh && oldZero:
			// The file has a hole here, which reads as the old zeroes:
			// only the new bytes are written.
			if p != nil && lo < hi {
				err = d.writeHost(p[lo-in:hi-in], host+lo)
			}
			continue
		case p != nil && in <= o && o+k <= in+n: // all new bytes
			part = p[o-in : o-in+k]
		default:
			if buf == nil {
				buf = make([]byte, min(bs, piece))
			}
			part = buf[:k]
			if o < in || o+k > in+n {
				err = d.readBlockState(i, b, part, o)
			}
			if err == nil && lo < hi {
				if p == nil {
					clear(part[lo-o : hi-o])
				} else {
					copy(part[lo-o:hi-o], p[lo-in:hi-in])
				}
			}
		}
		if err == nil && (host+o < fresh || !diskserve.IsZero(part)) {
			err = d.writeHost(part, host+o)
		}
	}

	d.allocMu.Lock()
	defer d.allocMu.Unlock()
	delete(d.inflight, i)
	d.allocated.Broadcast()
	if err != nil {
		d.failed = fmt.Errorf("%s: an earlier block allocation failed, writes are refused: %w", d.cfg.Path, err)
		return err
	}
	d.mu.Lock()
	d.cfg.Table.Set(i, Block{State: Data, Host: host})
	d.mu.Unlock()
	d.pending = append(d.pending, i)
	if len(d.pending) >= maxPending {
		return d.record()
	}
	return nil
}

// record makes the data of the blocks allocated since the last record
// durable, then writes their entries, then makes those durable: the
// table on disk never names a block whose data could be lost. The
// caller holds allocMu.
func (d *Disk) record() error {
	if err := d.cfg.Sync(); err != nil {
		return err
	}
	if len(d.pending) == 0 {
		return nil
	}
	for k, i := range d.pending {
		if err := d.cfg.Table.Record(i, d.Lookup(i).Host); err != nil {
			d.pending = d.pending[k:]
			return fmt.Errorf("%s: record block %d: %w", d.cfg.Path, i, err)
		}
	}
	d.pending = d.pending[:0]
	return d.cfg.Sync()
}

// readBlockState fills p with what block i, in state b, reads as from
// offset o inside it.
func (d *Disk) readBlockState(i int64, b Block, p []byte, o int64) error {
	switch b.State {
	case Unallocated:
		return d.readBelow(p, i*d.cfg.BlockSize+o)
	case Special:
		return d.readBlock(i, p, o)
	}
	clear(p) // Zero
	return nil
}

// writeHost writes image file bytes, naming the image in errors.
func (d *Disk) writeHost(p []byte, off int64) error {
	if _, err := d.cfg.File.WriteAt(p, off); err != nil {
		return fmt.Errorf("%s: write %d bytes at %d: %w", d.cfg.Path, len(p), off, err)
	}
	return nil
}

// WriteZeroesAt makes [off, off+n) read as zeroes: whole stored blocks
// get holes punched in the image file (they stay allocated), unallocated
// blocks with nothing below are left alone, and whole blocks over a
// backing disk are recorded as zero where the table can say so. The
// rest is written as zeroes.
func (d *Disk) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	if err := diskserve.CheckWrite(d, off, n); err != nil {
		return err
	}
	bs := d.cfg.BlockSize
	for end := off + n; off < end; {
		i, in := off/bs, off%bs
		m := min(end-off, bs-in)
		if err := d.zeroBlock(i, in, m, flags); err != nil {
			return err
		}
		off += m
	}
	return nil
}

// zeroBlock zeroes [in, in+m) of block i.
func (d *Disk) zeroBlock(i, in, m int64, flags diskserve.ZeroFlags) error {
	b := d.Lookup(i)
	switch {
	case b.State == Zero:
		return nil
	case b.State == Unallocated && d.belowIsZero(i*d.cfg.BlockSize+in, m):
		return nil
	case b.State == Data:
		return d.zeroHost(b.Host+in, m, flags)
	}
	if zr, ok := d.cfg.Table.(ZeroRecorder); ok && m == d.cfg.BlockSize {
		done, err := d.recordZero(zr, i, flags)
		if done || err != nil {
			return err
		}
	}
	if flags&diskserve.ZeroFast != 0 {
		return fmt.Errorf("%s: zeroing part of block %d means storing it: %w", d.cfg.Path, i, errors.ErrUnsupported)
	}
	return d.allocate(i, in, m, nil)
}

// recordZero records block i as zeroes, if the table can; done is false
// when it cannot.
func (d *Disk) recordZero(zr ZeroRecorder, i int64, flags diskserve.ZeroFlags) (done bool, err error) {
	d.allocMu.Lock()
	defer d.allocMu.Unlock()
	for d.inflight[i] {
		d.allocated.Wait()
	}
	if b := d.Lookup(i); b.State == Data {
		return true, d.zeroHost(b.Host, d.cfg.BlockSize, flags)
	}
	if err := zr.RecordZero(i); errors.Is(err, errors.ErrUnsupported) {
		return false, nil
	} else if err != nil {
		return true, fmt.Errorf("%s: %w", d.cfg.Path, err)
	}
	d.mu.Lock()
	d.cfg.Table.Set(i, Block{State: Zero})
	d.mu.Unlock()
	return true, nil
}

// belowIsZero reports whether the layers below read as zeroes over the
// virtual range [off, off+n) (nothing below, or a hole past the backing
// disk's end).
func (d *Disk) belowIsZero(off, n int64) bool {
	return d.cfg.Backing == nil || off >= d.cfg.Backing.Size()
}

// zeroHost zeroes image file bytes of a stored block: a hole where the
// file can punch one and the caller allows it, zero bytes otherwise.
func (d *Disk) zeroHost(off, n int64, flags diskserve.ZeroFlags) error {
	if flags&diskserve.ZeroMayUnmap != 0 {
		err := diskserve.PunchHole(d.cfg.File, off, n)
		if err == nil || !errors.Is(err, errors.ErrUnsupported) {
			return err
		}
	}
	return diskserve.WriteZeroes(d.cfg.File, off, n, 0)
}

// PunchHole makes [off, off+n) read as zeroes, releasing the file space of
// whole stored blocks.
func (d *Disk) PunchHole(off, n int64) error {
	return d.WriteZeroesAt(off, n, diskserve.ZeroMayUnmap)
}

// AppendExtents reports stored blocks as data, or zeroes where the image
// file has holes in them; zero blocks as zero holes; unallocated blocks
// as the backing disk's extents (zero holes past its end or without one).
// Special blocks are data.
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	bs := d.cfg.BlockSize
	hole := diskserve.ExtentHole | diskserve.ExtentZero
	for end := off + n; off < end; {
		i := off / bs
		m := min(end-off, bs-off%bs)
		if run := d.unallocatedRun(i); run > 1 {
			m = min(end-off, run*bs-off%bs)
		}
		switch b := d.Lookup(i); b.State {
		case Data:
			k := d.dataRun(i, b, (off%bs+end-off+bs-1)/bs)
			m = min(end-off, k*bs-off%bs)
			var err error
			if dst, err = d.hostExtents(dst, off, m, b.Host+off%bs); err != nil {
				return dst, err
			}
		case Special:
			dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: off, Len: m})
		case Zero:
			dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: off, Len: m, Flags: hole})
		default:
			var err error
			if dst, err = d.backingExtents(dst, off, m); err != nil {
				return dst, err
			}
		}
		off += m
	}
	return dst, nil
}

// hostExtents appends the extents of [off, off+n), stored at host in the
// image file: data where the file has data, zeroes where it has a hole
// (a block written only in part, or punched). The range stays allocated
// in the image, so it is never a hole of the disk.
func (d *Disk) hostExtents(dst []diskserve.Extent, off, n, host int64) ([]diskserve.Extent, error) {
	ext, err := diskserve.Extents(d.cfg.File, nil, host, n)
	if err != nil {
		return dst, fmt.Errorf("%s: %w", d.cfg.Path, err)
	}
	for _, e := range ext {
		flags := diskserve.ExtentFlags(0)
		if e.Flags&diskserve.ExtentZero != 0 {
			flags = diskserve.ExtentZero
		}
		dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: e.Off - host + off, Len: e.Len, Flags: flags})
	}
	return dst, nil
}

// backingExtents appends the extents of an unallocated range: the
// backing disk's, and a zero hole past its end or without one.
func (d *Disk) backingExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	inside := int64(0)
	if bd := d.cfg.Backing; bd != nil {
		inside = max(0, min(n, bd.Size()-off))
	}
	if inside > 0 {
		ext, err := diskserve.Extents(d.cfg.Backing, nil, off, inside)
		if err != nil {
			return dst, fmt.Errorf("backing file: %w", err)
		}
		for _, e := range ext {
			dst = diskserve.AppendExtent(dst, e)
		}
	}
	if inside < n {
		dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: off + inside, Len: n - inside, Flags: diskserve.ExtentHole | diskserve.ExtentZero})
	}
	return dst, nil
}

// MapHost maps a read that lies in one run of stored blocks, one after
// another in the image file, onto that file (through the file's own
// mapping), so that an exporter sends it with sendfile and the io_uring
// engine reads it itself. Writes are not mapped: the table must see them.
// A stored block never moves, and its place is never given to another, so
// a mapping stays good for its one I/O.
func (d *Disk) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	bs := d.cfg.BlockSize
	i, in := off/bs, off%bs
	b := d.Lookup(i)
	if write || b.State != Data || in+n > bs && d.dataRun(i, b, (in+n+bs-1)/bs)*bs < in+n {
		return diskserve.HostRange{}, false
	}
	return diskserve.MapHost(d.cfg.File, b.Host+in, n, false)
}

// LocateHost locates the run from off: blocks stored one after another in
// the image file, or what the backing disk says of unallocated blocks.
// Zero and special blocks (compressed grains, blocks present in part) are
// in no file, nor is what no layer holds.
func (d *Disk) LocateHost(off, n int64) (diskserve.HostLocation, error) {
	bs := d.cfg.BlockSize
	i, in := off/bs, off%bs
	m := min(n, bs-in)
	if run := d.unallocatedRun(i); run > 1 {
		m = min(n, run*bs-in)
	}
	switch b := d.Lookup(i); b.State {
	case Data:
		k := d.dataRun(i, b, (in+n+bs-1)/bs)
		return diskserve.LocateHost(d.cfg.File, b.Host+in, min(n, k*bs-in))
	case Unallocated:
		if bd := d.cfg.Backing; bd != nil && off < bd.Size() {
			return diskserve.LocateHost(bd, off, min(m, bd.Size()-off))
		}
	}
	return diskserve.HostLocation{Len: m}, nil
}

// AppendDepths reports depth 1 for blocks the image holds (data or
// zeroes), the backing disk's depths plus one below, 0 where no layer
// holds anything (1 with Config.OwnHoles).
func (d *Disk) AppendDepths(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	bs := d.cfg.BlockSize
	for end := off + n; off < end; {
		i := off / bs
		m := min(end-off, bs-off%bs)
		if run := d.unallocatedRun(i); run > 1 {
			m = min(end-off, run*bs-off%bs)
		}
		if d.Lookup(i).State != Unallocated {
			dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: off, Len: m, Flags: 1})
			off += m
			continue
		}
		bd := d.cfg.Backing
		inside := int64(0)
		if bd != nil && off < bd.Size() {
			inside = min(m, bd.Size()-off)
			ext, err := diskserve.AllocationDepths(bd, nil, off, inside)
			if err != nil {
				return dst, err
			}
			for _, e := range ext {
				if e.Flags != 0 {
					e.Flags++
				}
				dst = diskserve.AppendExtent(dst, e)
			}
		}
		if inside < m {
			var own diskserve.ExtentFlags
			if d.cfg.OwnHoles {
				own = 1
			}
			dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: off + inside, Len: m - inside, Flags: own})
		}
		off += m
	}
	return dst, nil
}

// unallocatedRun returns how many blocks from i on the table knows to be
// unallocated, or 0.
func (d *Disk) unallocatedRun(i int64) int64 {
	rr, ok := d.cfg.Table.(RunReporter)
	if !ok {
		return 0
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	return rr.Unallocated(i)
}

// Flush makes every completed write durable: the data, then the entries
// of the blocks allocated since the last flush. The backing disk has
// nothing to flush (it is opened read-only).
func (d *Disk) Flush() error {
	if d.cfg.ReadOnly {
		return nil
	}
	d.allocMu.Lock()
	defer d.allocMu.Unlock()
	return d.record()
}

// Close records the blocks allocated since the last flush, writes back
// what the format keeps, then closes the image file and the backing disk.
func (d *Disk) Close() error {
	var err error
	if !d.cfg.ReadOnly {
		err = d.Flush()
	}
	if d.cfg.Close != nil {
		err = d.cfg.Close()
	}
	err = errors.Join(err, d.cfg.File.Close())
	if d.cfg.Backing != nil {
		err = errors.Join(err, d.cfg.Backing.Close())
	}
	return err
}
