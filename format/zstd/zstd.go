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
//   - Frames of any size up to the format's 1 GiB; decompressed frames are
//     kept in an LRU cache of bounded size shared by all readers, and a
//     read that reaches the end of a frame decompresses the next one ahead.
//   - Extents: frames that decompress to nothing but zeroes are reported
//     as zero ranges once they have been read; everything else is data.
//   - Writing with [Write], which compresses frames in parallel.
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
	"encoding/binary"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"
	kzstd "github.com/klauspost/compress/zstd"

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

// Limits. maxFrames is below the format's own (0x8000000) so that the
// index of one image stays under 320 MiB: 16 Mi frames of 64 KiB is 1 TiB.
const (
	maxFrames    = 1 << 24
	maxFrameSize = 1 << 30 // ZSTD_SEEKABLE_MAX_FRAME_DECOMPRESSED_SIZE
	cacheBytes   = 256 << 20
)

// A Disk is an open seekable zstd image.
type Disk struct {
	c         diskserve.DiskFile
	path      string
	size      int64
	starts    []int64  // decompressed offset of each frame, and the size at the end
	offsets   []int64  // file offset of each frame, and the table's at the end
	checksums []uint32 // nil without the checksum flag
	dec       *kzstd.Decoder

	mu       sync.Mutex // guards the cache and inflight
	cache    *frameCache
	inflight map[int]*decoding // frames being decompressed

	decoded atomic.Int64 // frames decompressed, for tests of the cache
}

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
		if decomp > maxFrameSize {
			return nil, corrupt(tableOff+skipHeaderLen+i*entry, "frame %d decompresses to %d bytes, more than %d", i, decomp, maxFrameSize)
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
	var err error
	if d.dec, err = kzstd.NewReader(nil, kzstd.WithDecoderConcurrency(0), kzstd.WithDecoderMaxMemory(2*maxFrameSize)); err != nil {
		return nil, err
	}
	d.cache = newFrameCache(cacheBytes)
	d.inflight = map[int]*decoding{}
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

// Close releases the decoder and closes the file.
func (d *Disk) Close() error {
	d.dec.Close()
	return d.c.Close()
}

// frameAt returns the frame holding decompressed offset off. Frames that
// decompress to nothing are skipped.
func (d *Disk) frameAt(off int64) int {
	return sort.Search(len(d.starts)-1, func(i int) bool { return d.starts[i+1] > off })
}

// frame returns frame i decompressed: from the cache, from a
// decompression already under way, or by decompressing and verifying it.
func (d *Disk) frame(i int) ([]byte, error) {
	d.mu.Lock()
	if data, ok := d.cache.get(i); ok {
		d.mu.Unlock()
		return data, nil
	}
	if dc, ok := d.inflight[i]; ok {
		d.mu.Unlock()
		<-dc.done
		return dc.data, dc.err
	}
	dc := &decoding{done: make(chan struct{})}
	d.inflight[i] = dc
	d.mu.Unlock()
	dc.data, dc.err = d.decompress(i)
	d.mu.Lock()
	delete(d.inflight, i)
	if dc.err == nil {
		d.cache.put(i, dc.data)
	}
	d.mu.Unlock()
	close(dc.done)
	return dc.data, dc.err
}

// compBufs holds buffers for compressed frames, which are needed only
// while a frame is decompressed.
var compBufs = sync.Pool{New: func() any { return new([]byte) }}

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
	want := d.starts[i+1] - d.starts[i]
	data, err := d.dec.DecodeAll(comp, make([]byte, 0, want))
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
		if d.starts[i+1] == d.starts[i] {
			continue // an empty frame
		}
		data, err := d.frame(i)
		if err != nil {
			return done, err
		}
		done += copy(p[done:], data[off+int64(done)-d.starts[i]:])
	}
	if off+int64(done) == d.starts[i] && i < len(d.starts)-1 {
		go d.frame(i) // read ahead; an error shows when the frame is read
	}
	return done, eof
}

// AppendExtents reports data, except for frames already found to hold
// only zeroes.
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	end := off + n
	for i := d.frameAt(off); i < len(d.starts)-1 && d.starts[i] < end; i++ {
		e := diskserve.Extent{Off: max(off, d.starts[i])}
		e.Len = min(end, d.starts[i+1]) - e.Off
		if e.Len <= 0 {
			continue
		}
		d.mu.Lock()
		if d.cache.zero(i) {
			e.Flags = diskserve.ExtentZero
		}
		d.mu.Unlock()
		dst = diskserve.AppendExtent(dst, e)
	}
	return dst, nil
}

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
		if _, err := d.decompress(i); err != nil {
			r.Corruptions++
			r.Messages = append(r.Messages, "ERROR "+err.Error())
		}
	}
	r.ImageEndOffset = d.c.Size()
	return r, nil
}

// frameCache is an LRU cache of decompressed frames, bounded in bytes. It
// also remembers which frames were all zeroes.
//
// Preconditions: Disk.mu is held for every method.
type frameCache struct {
	max, used int64
	byIndex   map[int]*list.Element // of *cachedFrame
	recent    list.List
	zeroes    map[int]bool
}

type cachedFrame struct {
	index int
	data  []byte
}

func newFrameCache(max int64) *frameCache {
	return &frameCache{max: max, byIndex: map[int]*list.Element{}, zeroes: map[int]bool{}}
}

func (c *frameCache) get(i int) ([]byte, bool) {
	e, ok := c.byIndex[i]
	if !ok {
		return nil, false
	}
	c.recent.MoveToFront(e)
	return e.Value.(*cachedFrame).data, true
}

func (c *frameCache) put(i int, data []byte) {
	if _, ok := c.byIndex[i]; ok || int64(len(data)) > c.max {
		return
	}
	if allZero(data) {
		c.zeroes[i] = true
	}
	c.byIndex[i] = c.recent.PushFront(&cachedFrame{index: i, data: data})
	c.used += int64(len(data))
	for c.used > c.max {
		last := c.recent.Back()
		f := last.Value.(*cachedFrame)
		c.recent.Remove(last)
		delete(c.byIndex, f.index)
		c.used -= int64(len(f.data))
	}
}

func (c *frameCache) zero(i int) bool { return c.zeroes[i] }

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
