package fuse

import (
	"encoding/binary"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/gpt"
)

// A partition is a byte range of the disk.
type partition struct{ off, n int64 }

// readPartitions reads the partitions of d from its GPT, or else from its
// MBR. A disk with neither, or with a table that does not check out, has
// none. Partitions that do not fit in the disk are left out.
func readPartitions(d diskserve.DiskFile) []partition {
	size := d.Size()
	head := make([]byte, 2*gpt.SectorSize)
	if size < int64(len(head)) || diskserve.ReadFullAt(d, head, 0) != nil {
		return nil
	}
	if ps, ok := parseGPT(d, head[gpt.SectorSize:], size); ok {
		return ps
	}
	return parseMBR(head[:gpt.SectorSize], size)
}

// parseGPT reads the entries that the primary GPT header h points to.
func parseGPT(d diskserve.DiskFile, sector []byte, size int64) ([]partition, bool) {
	h, err := gpt.ParseHeader(sector)
	if err != nil || h.EntriesLBA > uint64(size/gpt.SectorSize) {
		return nil, false
	}
	entries := make([]byte, h.EntriesLen())
	if diskserve.ReadFullAt(d, entries, int64(h.EntriesLBA)*gpt.SectorSize) != nil {
		return nil, false
	}
	table, err := gpt.ParseEntries(h, entries)
	if err != nil {
		return nil, false
	}
	var ps []partition
	for _, e := range table {
		if p, ok := fit(e.First, e.Last, size); ok {
			ps = append(ps, p)
		}
	}
	return ps, true
}

// parseMBR reads the four primary partitions of a DOS partition table.
func parseMBR(b []byte, size int64) []partition {
	if b[510] != 0x55 || b[511] != 0xAA {
		return nil
	}
	le := binary.LittleEndian
	var ps []partition
	for i := range 4 {
		e := b[446+16*i:]
		typ, start, count := e[4], uint64(le.Uint32(e[8:])), uint64(le.Uint32(e[12:]))
		if typ == 0 || typ == gpt.MBRTypeProtective || count == 0 {
			continue // unused, or the protective entry of a GPT that did not check out
		}
		if p, ok := fit(start, start+count-1, size); ok {
			ps = append(ps, p)
		}
	}
	return ps
}

// fit returns the partition of sectors [first, last] if it lies inside a
// disk of size bytes.
func fit(first, last uint64, size int64) (partition, bool) {
	sectors := uint64(size / 512)
	if first == 0 || last < first || last >= sectors {
		return partition{}, false
	}
	return partition{off: int64(first) * gpt.SectorSize, n: int64(last-first+1) * gpt.SectorSize}, true
}

// A window is a part of a disk shown as a disk of its own. It is a view,
// not a [diskserve.Wrapper]: it moves offsets and has a size of its own,
// so it has only the capabilities that apply to part of a disk (flush,
// zeroes, holes, extents), each passed on through the functions of package
// diskserve so that the disk's fallbacks apply. Resizing, checking or
// snapshotting a partition would act on the whole disk, and it has none of
// them.
type window struct {
	d      diskserve.DiskFile
	off, n int64
}

var (
	_ diskserve.DiskFile     = (*window)(nil)
	_ diskserve.Flusher      = (*window)(nil)
	_ diskserve.ZeroWriter   = (*window)(nil)
	_ diskserve.HolePuncher  = (*window)(nil)
	_ diskserve.ExtentMapper = (*window)(nil)
)

func (w *window) Size() int64    { return w.n }
func (w *window) ReadOnly() bool { return w.d.ReadOnly() }
func (w *window) Close() error   { return nil } // the disk belongs to the mount
func (w *window) Flush() error   { return diskserve.Flush(w.d) }

func (w *window) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(w.n, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	n, err := w.d.ReadAt(p, w.off+off)
	if n == len(p) {
		err = eof // the disk's own io.EOF, if the window ends where it does, is ours
	}
	return n, err
}

func (w *window) WriteAt(p []byte, off int64) (int, error) {
	if err := diskserve.CheckWrite(w, off, int64(len(p))); err != nil {
		return 0, err
	}
	return w.d.WriteAt(p, w.off+off)
}

func (w *window) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	if err := diskserve.CheckWrite(w, off, n); err != nil {
		return err
	}
	return diskserve.WriteZeroes(w.d, w.off+off, n, flags)
}

func (w *window) PunchHole(off, n int64) error {
	if err := diskserve.CheckWrite(w, off, n); err != nil {
		return err
	}
	return diskserve.PunchHole(w.d, w.off+off, n)
}

func (w *window) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	start := len(dst)
	dst, err := diskserve.Extents(w.d, dst, w.off+off, n)
	for i := start; i < len(dst); i++ {
		dst[i].Off -= w.off
	}
	return dst, err
}
