// Package zstd reads and writes disk images in the Zstandard seekable
// format (contrib/seekable_format/zstd_seekable_compression_format.md in
// the zstd project, v0.1.0): independent zstd frames followed by a seek
// table in a final skippable frame, which lets any offset be read by
// decompressing one frame.
//
// # Supported
//
//   - The seek table with and without per-frame checksums (the low 32 bits
//     of XXH64 of the frame's data), verified on every decompression; the
//     skippable header, its size, the reserved descriptor bits and the
//     frames' sizes adding up to the file are all checked at open.
//   - Frames of up to [MaxFrameSize] decompressed (the format allows
//     1 GiB; an image with a larger frame is refused at open, with the
//     conversion that rewrites it in smaller frames). Decompressed frames
//     are kept in one LRU cache of bounded size shared by every image the
//     process has open, and a read that reaches the end of a frame
//     decompresses the next one ahead.
//   - Extents: frames that decompress to zeroes alone are zero ranges,
//     whether or not they were read before; everything else is data. Only
//     frames that compress to at most 4 KiB and whose checksum is that of
//     zeroes are decompressed to find out, once each.
//   - Writing with [Write], which compresses frames in parallel.
//
// # Memory
//
// What a process holds for seekable images does not depend on what they
// claim, how many there are or how many readers they have: the frame
// cache (cacheBytes, entries charged at least entryCost), plus frames in
// use, each charged its decompressed and compressed size against one
// process-wide budget (useBytes) for as long as a read decompresses or
// copies it, so at most that much of frames outside the cache is alive at
// once. The index takes 20 bytes per frame, and frames are capped at
// maxFrames.
//
// # Not supported
//
//   - Writing in place: opening read-write is refused; convert the image
//     instead.
//   - A plain zstd stream without a seek table is an error that says so,
//     not a raw disk.
//
// # Concurrency
//
// Every method may be called concurrently.
package zstd

import (
	"container/list"
	"context"
	"encoding/binary"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"
	kzstd "github.com/klauspost/compress/zstd"
	"golang.org/x/sync/semaphore"

	"github.com/diskserve/diskserve"
)

// Name is the format's name.
const Name = "zstd"

// Format is the seekable zstd format for the opener. It claims files that
// start with a zstd frame or a skippable frame.
var Format = diskserve.Format{Name: Name, Match: Match, Open: open, ReadOnly: true, Create: creator}

// Match reports whether head starts with a zstd frame (magic 0xFD2FB528)
// or a skippable frame (0x184D2A50 to 0x184D2A5F), both little-endian.
func Match(head []byte) bool {
	if len(head) < 4 {
		return false
	}
	m := le.Uint32(head)
	return m == frameMagic || m&^0xF == skippableMagic&^0xF
}

var le = binary.LittleEndian

// Magic numbers and sizes of the format.
const (
	frameMagic     = 0xFD2FB528
	skippableMagic = 0x184D2A5E // the seek table's skippable frame
	seekableMagic  = 0x8F92EAB1 // the footer's
	footerLen      = 9          // Number_Of_Frames, Seek_Table_Descriptor, Seekable_Magic_Number
	skipHeaderLen  = 8
	checksumFlag   = 1 << 7
	reservedBits   = 0x7C
)

// MaxFrameSize is the largest frame, decompressed, that an image may
// have: what one read at most decompresses and holds. The format allows
// 1 GiB; images with larger frames than this are refused at open, with an
// error that says how to rewrite them.
const MaxFrameSize = 32 << 20

// Limits. maxFrames is below the format's own (0x8000000) so that the
// index of one image stays under 320 MiB: 16 Mi frames of 64 KiB is 1 TiB.
// A frame's compressed size may exceed its decompressed size by zstd's
// block overhead (3 bytes per 128 KiB block) and its frame header and
// checksum; maxFrameOverhead allows for them with room.
const (
	maxFrames        = 1 << 24
	formatMaxFrame   = 1 << 30 // ZSTD_SEEKABLE_MAX_FRAME_DECOMPRESSED_SIZE
	maxFrameOverhead = 64 << 10
)

// The process-wide bounds of memory (see the package doc).
const (
	cacheBytes = 256 << 20 // decompressed frames kept
	useBytes   = 128 << 20 // frames being decompressed or copied
)

// entryCost is the least a cached frame is charged, so that a cache of
// tiny frames is bounded in entries too.
const entryCost = 256

// A Disk is an open seekable zstd image.
type Disk struct {
	c         diskserve.DiskFile
	path      string
	size      int64
	starts    []int64  // decompressed offset of each frame, and the size at the end
	offsets   []int64  // file offset of each frame, and the table's at the end
	checksums []uint32 // nil without the checksum flag

	mu       sync.Mutex        // guards inflight
	inflight map[int]*decoding // frames being decompressed

	zeroes []atomic.Uint32 // 2 bits a frame: unknown, zero or data (see frameKind)

	aheadBusy atomic.Bool    // a read-ahead is running
	ahead     sync.WaitGroup // the read-ahead, which Close waits for

	decoded atomic.Int64 // frames decompressed, for tests of the cache
}

// decoder decompresses the frames of every image: a klauspost decoder is
// safe for concurrent DecodeAll calls, keeps a few internal decoders, and
// refuses a frame whose header claims more than MaxFrameSize.
var decoder = sync.OnceValues(func() (*kzstd.Decoder, error) {
	return kzstd.NewReader(nil, kzstd.WithDecoderConcurrency(0), kzstd.WithDecoderMaxMemory(MaxFrameSize))
})

// inUse is the budget of frame memory outside the cache (useBytes).
// Tests replace it, and frames, while no image is in use.
var inUse = semaphore.NewWeighted(useBytes)

// decoding is a decompression in progress, which other readers of the
// same frame wait for instead of decompressing it again.
type decoding struct {
	done chan struct{}
	data []byte
	err  error
}

var (
	_ diskserve.DiskFile     = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.Describer    = (*Disk)(nil)
	_ diskserve.Checker      = (*Disk)(nil)
)

func corrupt(off int64, msg string, args ...any) error {
	return diskserve.Corrupt(Name, off, msg, args...)
}

func open(c diskserve.DiskFile, oc *diskserve.OpenContext) (diskserve.DiskFile, error) {
	d, err := parse(c)
	if err != nil {
		return nil, err
	}
	d.path = oc.Path()
	return d, nil
}

// parse reads and checks the seek table at the end of c.
func parse(c diskserve.DiskFile) (*Disk, error) {
	fileSize := c.Size()
	if fileSize < skipHeaderLen+footerLen {
		return nil, corrupt(-1, "no seek table: the file has %d bytes (a plain zstd stream cannot be read at an offset; recompress it with diskserve convert -O zstd)", fileSize)
	}
	var foot [footerLen]byte
	if err := readAt(c, foot[:], fileSize-footerLen); err != nil {
		return nil, err
	}
	if le.Uint32(foot[5:]) != seekableMagic {
		return nil, corrupt(fileSize-4, "no seek table at the end of the file (a plain zstd stream cannot be read at an offset; recompress it with diskserve convert -O zstd)")
	}
	n, desc := int64(le.Uint32(foot[0:])), foot[4]
	if desc&reservedBits != 0 {
		return nil, corrupt(fileSize-5, "seek table descriptor %#x has reserved bits set", desc)
	}
	entry := int64(8)
	if desc&checksumFlag != 0 {
		entry = 12
	}
	tableLen := n*entry + footerLen
	switch {
	case n > maxFrames:
		return nil, corrupt(fileSize-footerLen, "%d frames, more than %d", n, maxFrames)
	case tableLen+skipHeaderLen > fileSize:
		return nil, corrupt(fileSize-footerLen, "a seek table of %d frames does not fit in a file of %d bytes", n, fileSize)
	}
	tableOff := fileSize - tableLen - skipHeaderLen
	table := make([]byte, tableLen-footerLen+skipHeaderLen)
	if err := readAt(c, table, tableOff); err != nil {
		return nil, err
	}
	if m, size := le.Uint32(table), int64(le.Uint32(table[4:])); m != skippableMagic || size != tableLen {
		return nil, corrupt(tableOff, "seek table header is magic %#x size %d, want %#x size %d", m, size, skippableMagic, tableLen)
	}
	diskserve.Pin(c, tableOff, fileSize-tableOff)
	d := &Disk{
		c:       c,
		starts:  make([]int64, n+1),
		offsets: make([]int64, n+1),
	}
	if entry == 12 {
		d.checksums = make([]uint32, n)
	}
	var dsize, fsize int64
	for i := range n {
		e := table[skipHeaderLen+i*entry:]
		comp, decomp := int64(le.Uint32(e)), int64(le.Uint32(e[4:]))
		if decomp > formatMaxFrame {
			return nil, corrupt(tableOff+skipHeaderLen+i*entry, "frame %d decompresses to %d bytes, more than %d", i, decomp, formatMaxFrame)
		}
		if decomp > MaxFrameSize {
			return nil, diskserve.Unsupported(Name, tableOff+skipHeaderLen+i*entry, "frame %d decompresses to %d bytes, more than the %d (%d MiB) diskserve reads a frame of; rewrite the image in smaller frames: diskserve convert -O zstd -o frame_size=256K", i, decomp, MaxFrameSize, MaxFrameSize>>20)
		}
		if comp > decomp+maxFrameOverhead {
			return nil, corrupt(tableOff+skipHeaderLen+i*entry, "frame %d: %d compressed bytes for %d decompressed", i, comp, decomp)
		}
		if d.checksums != nil {
			d.checksums[i] = le.Uint32(e[8:])
		}
		d.starts[i], d.offsets[i] = dsize, fsize
		dsize += decomp
		fsize += comp
	}
	d.starts[n], d.offsets[n] = dsize, fsize
	if fsize != tableOff {
		return nil, corrupt(tableOff, "the frames' compressed sizes add up to %d bytes, but the seek table starts at %d", fsize, tableOff)
	}
	d.size = dsize
	if _, err := decoder(); err != nil {
		return nil, err
	}
	d.inflight = map[int]*decoding{}
	d.zeroes = make([]atomic.Uint32, (n+15)/16)
	return d, nil
}

// readAt reads len(p) bytes at off, and names a short read as such.
func readAt(c diskserve.DiskFile, p []byte, off int64) error {
	if err := diskserve.ReadFullAt(c, p, off); err != nil {
		return corrupt(off, "read %d bytes: %v", len(p), err)
	}
	return nil
}

// Size returns the decompressed size.
func (d *Disk) Size() int64 { return d.size }

// ReadOnly is true: seekable images are never written in place.
func (d *Disk) ReadOnly() bool { return true }

// WriteAt fails: the image is read-only.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("write: %w", diskserve.ErrReadOnly)
}

// Close waits for the read-ahead, drops the image's frames from the
// cache and closes the file.
func (d *Disk) Close() error {
	d.ahead.Wait()
	frames.drop(d)
	return d.c.Close()
}

// frameAt returns the frame holding decompressed offset off. Frames that
// decompress to nothing are skipped.
func (d *Disk) frameAt(off int64) int {
	return sort.Search(len(d.starts)-1, func(i int) bool { return d.starts[i+1] > off })
}

// frameSize returns frame i's decompressed size.
func (d *Disk) frameSize(i int) int64 { return d.starts[i+1] - d.starts[i] }

// useCost is what using frame i is charged against the process's budget:
// its decompressed bytes, and its compressed ones while it is decompressed.
func (d *Disk) useCost(i int) int64 {
	return d.frameSize(i) + d.offsets[i+1] - d.offsets[i]
}

// frame returns frame i decompressed: from the cache, from a
// decompression already under way, or by decompressing and verifying it.
// The caller holds useCost(i) of the budget for as long as it uses the
// bytes, so that a frame evicted meanwhile is still paid for.
func (d *Disk) frame(i int) ([]byte, error) {
	if data, ok := frames.get(d, i); ok {
		return data, nil
	}
	d.mu.Lock()
	if dc, ok := d.inflight[i]; ok {
		d.mu.Unlock()
		<-dc.done
		return dc.data, dc.err
	}
	dc := &decoding{done: make(chan struct{})}
	d.inflight[i] = dc
	d.mu.Unlock()
	dc.data, dc.err = d.decompress(i)
	if dc.err == nil {
		frames.put(d, i, dc.data)
	}
	d.mu.Lock()
	delete(d.inflight, i)
	d.mu.Unlock()
	close(dc.done)
	return dc.data, dc.err
}

// compBufs holds buffers for compressed frames, which are needed only
// while a frame is decompressed.
var compBufs = sync.Pool{New: func() any { return new([]byte) }}

// decompress reads frame i, decompresses it and verifies it against the
// seek table. The buffer is the size the table claims, which open has
// bounded by MaxFrameSize and the caller has paid for (useCost) before it
// is allocated; a frame that decompresses to more fails without growing it.
func (d *Disk) decompress(i int) ([]byte, error) {
	d.decoded.Add(1)
	cb := compBufs.Get().(*[]byte)
	defer compBufs.Put(cb)
	n := int(d.offsets[i+1] - d.offsets[i])
	if cap(*cb) < n {
		*cb = make([]byte, n)
	}
	comp := (*cb)[:n]
	if err := readAt(d.c, comp, d.offsets[i]); err != nil {
		return nil, err
	}
	want := d.frameSize(i)
	dec, err := decoder()
	if err != nil {
		return nil, err
	}
	data, err := dec.DecodeAll(comp, make([]byte, 0, want))
	switch {
	case err != nil:
		return nil, corrupt(d.offsets[i], "frame %d: %v", i, err)
	case int64(len(data)) != want:
		return nil, corrupt(d.offsets[i], "frame %d decompresses to %d bytes, the seek table says %d", i, len(data), want)
	case d.checksums != nil && uint32(xxhash.Sum64(data)) != d.checksums[i]:
		return nil, corrupt(d.offsets[i], "frame %d: checksum %#08x, the seek table says %#08x", i, uint32(xxhash.Sum64(data)), d.checksums[i])
	}
	return data, nil
}

// ReadAt reads decompressed bytes across as many frames as it takes. A
// read that ends a frame starts decompressing the next one, so sequential
// readers find it ready.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(d.size, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	done := 0
	i := d.frameAt(off)
	for ; done < len(p); i++ {
		if d.frameSize(i) == 0 {
			continue // an empty frame
		}
		cost := d.useCost(i)
		if err := inUse.Acquire(context.Background(), cost); err != nil {
			return done, err
		}
		data, err := d.frame(i)
		if err == nil {
			done += copy(p[done:], data[off+int64(done)-d.starts[i]:])
		}
		inUse.Release(cost)
		if err != nil {
			return done, err
		}
	}
	if off+int64(done) == d.starts[i] && i < len(d.starts)-1 {
		d.readAhead(i)
	}
	return done, eof
}

// readAhead decompresses frame i into the cache in the background, if no
// read-ahead is running and the budget has room now; an error shows when
// the frame is read.
func (d *Disk) readAhead(i int) {
	cost := d.useCost(i)
	if d.frameSize(i) == 0 || !d.aheadBusy.CompareAndSwap(false, true) {
		return
	}
	if !inUse.TryAcquire(cost) {
		d.aheadBusy.Store(false)
		return
	}
	d.ahead.Go(func() {
		d.frame(i)
		inUse.Release(cost)
		d.aheadBusy.Store(false)
	})
}

// AppendExtents reports data, except for frames that decompress to
// zeroes alone, which are zero ranges (see zeroFrame).
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	end := off + n
	for i := d.frameAt(off); i < len(d.starts)-1 && d.starts[i] < end; i++ {
		e := diskserve.Extent{Off: max(off, d.starts[i])}
		e.Len = min(end, d.starts[i+1]) - e.Off
		if e.Len <= 0 {
			continue
		}
		zero, err := d.zeroFrame(i)
		if err != nil {
			return dst, err
		}
		if zero {
			e.Flags = diskserve.ExtentZero
		}
		dst = diskserve.AppendExtent(dst, e)
	}
	return dst, nil
}

// The kinds of frame zeroFrame remembers, 2 bits a frame in Disk.zeroes.
const (
	kindUnknown = iota
	kindZero
	kindData
)

// maxZeroFrameComp is the largest compressed frame that zeroFrame
// decompresses to look for zeroes: zstd writes 128 KiB of zeroes in a few
// bytes, so a frame of MaxFrameSize of zeroes takes about 1 KiB, and any
// larger frame holds data.
const maxZeroFrameComp = 4096

// zeroFrame reports whether frame i decompresses to zeroes alone, and
// remembers the answer, so that extents depend on the image alone, never
// on what was read before. A frame that compresses to more than
// maxZeroFrameComp, or whose checksum is not that of zeroes, holds data;
// any other is decompressed (through the cache) to find out.
func (d *Disk) zeroFrame(i int) (bool, error) {
	word, shift := &d.zeroes[i/16], uint(i%16)*2
	switch (word.Load() >> shift) & 3 {
	case kindZero:
		return true, nil
	case kindData:
		return false, nil
	}
	kind, err := d.findZeroes(i)
	if err != nil {
		return false, err
	}
	for {
		old := word.Load()
		if word.CompareAndSwap(old, old|kind<<shift) {
			return kind == kindZero, nil
		}
	}
}

// findZeroes is the first zeroFrame of frame i.
func (d *Disk) findZeroes(i int) (uint32, error) {
	size := d.frameSize(i)
	if d.offsets[i+1]-d.offsets[i] > maxZeroFrameComp || d.checksums != nil && d.checksums[i] != zeroChecksum(size) {
		return kindData, nil
	}
	cost := d.useCost(i)
	if err := inUse.Acquire(context.Background(), cost); err != nil {
		return kindUnknown, err
	}
	defer inUse.Release(cost)
	data, err := d.frame(i)
	if err != nil {
		return kindUnknown, err
	}
	if diskserve.IsZero(data) {
		return kindZero, nil
	}
	return kindData, nil
}

// zeroChecksums caches the seek-table checksum of n zero bytes by n.
var zeroChecksums sync.Map // int64 to uint32

// zeroChecksum returns the seek-table checksum of n zero bytes (the low
// 32 bits of their XXH64).
func zeroChecksum(n int64) uint32 {
	if c, ok := zeroChecksums.Load(n); ok {
		return c.(uint32)
	}
	h := xxhash.New()
	for left := n; left > 0; left -= int64(len(zeroBlock)) {
		h.Write(zeroBlock[:min(left, int64(len(zeroBlock)))])
	}
	c := uint32(h.Sum64())
	zeroChecksums.Store(n, c)
	return c
}

var zeroBlock [64 << 10]byte

// Describe reports the frame count and whether frames carry checksums.
func (d *Disk) Describe(info *diskserve.Info) {
	info.Format = Name
	info.Filename = d.path
	info.Specific = map[string]any{"frames": len(d.starts) - 1, "checksums": d.checksums != nil}
}

// Check decompresses every frame, verifying its size and checksum.
func (d *Disk) Check(repair diskserve.Repair) (diskserve.CheckReport, error) {
	var r diskserve.CheckReport
	if repair != diskserve.RepairNone {
		return r, fmt.Errorf("check: seekable zstd images cannot be repaired: %w", diskserve.ErrReadOnly)
	}
	for i := range len(d.starts) - 1 {
		cost := d.useCost(i)
		if err := inUse.Acquire(context.Background(), cost); err != nil {
			return r, err
		}
		_, err := d.decompress(i)
		inUse.Release(cost)
		if err != nil {
			r.Corruptions++
			r.Messages = append(r.Messages, "ERROR "+err.Error())
		}
	}
	r.ImageEndOffset = d.c.Size()
	return r, nil
}

// frames is the process's cache of decompressed frames, shared by every
// open image.
var frames = newFrameCache(cacheBytes)

// frameCache is an LRU cache of decompressed frames, bounded in bytes.
type frameCache struct {
	mu        sync.Mutex
	max, used int64
	byKey     map[frameKey]*list.Element // of *cachedFrame
	recent    list.List
}

type frameKey struct {
	d *Disk
	i int
}

type cachedFrame struct {
	key  frameKey
	data []byte
}

func newFrameCache(max int64) *frameCache {
	return &frameCache{max: max, byKey: map[frameKey]*list.Element{}}
}

// cost is what a frame of n bytes is charged in the cache.
func cost(n int) int64 { return max(int64(n), entryCost) }

func (c *frameCache) get(d *Disk, i int) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.byKey[frameKey{d, i}]
	if !ok {
		return nil, false
	}
	c.recent.MoveToFront(e)
	return e.Value.(*cachedFrame).data, true
}

func (c *frameCache) put(d *Disk, i int, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := frameKey{d, i}
	if _, ok := c.byKey[k]; ok || cost(len(data)) > c.max {
		return
	}
	c.byKey[k] = c.recent.PushFront(&cachedFrame{key: k, data: data})
	c.used += cost(len(data))
	for c.used > c.max {
		c.remove(c.recent.Back())
	}
}

// drop removes every frame of d.
func (c *frameCache) drop(d *Disk) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for e := c.recent.Front(); e != nil; {
		next := e.Next()
		if e.Value.(*cachedFrame).key.d == d {
			c.remove(e)
		}
		e = next
	}
}

// remove drops the entry e. Preconditions: c.mu is held.
func (c *frameCache) remove(e *list.Element) {
	f := c.recent.Remove(e).(*cachedFrame)
	delete(c.byKey, f.key)
	c.used -= cost(len(f.data))
}
