package fuse

import (
	"encoding/binary"
	"hash/crc32"

	"github.com/diskserve/diskserve"
)

// A partition is a byte range of the disk.
type partition struct{ off, n int64 }

// Limits for reading partition tables from a disk, which a guest controls.
const (
	maxGPTEntries   = 1024
	maxGPTEntrySize = 4096
)

// readPartitions reads the partitions of d from its GPT, or else from its
// MBR. A disk with neither, or with a table that does not check out, has
// none. Partitions that do not fit in the disk are left out.
func readPartitions(d diskserve.DiskFile) []partition {
	size := d.Size()
	head := make([]byte, 1024)
	if size < int64(len(head)) || diskserve.ReadFullAt(d, head, 0) != nil {
		return nil
	}
	if ps, ok := parseGPT(d, head[512:], size); ok {
		return ps
	}
	return parseMBR(head[:512], size)
}

// parseGPT reads the entries that the primary GPT header h points to.
func parseGPT(d diskserve.DiskFile, h []byte, size int64) ([]partition, bool) {
	le := binary.LittleEndian
	if string(h[:8]) != "EFI PART" {
		return nil, false
	}
	hsize := le.Uint32(h[12:])
	if hsize < 92 || hsize > 512 {
		return nil, false
	}
	hdr := append([]byte(nil), h[:hsize]...)
	crc := le.Uint32(hdr[16:])
	le.PutUint32(hdr[16:], 0)
	if crc32.ChecksumIEEE(hdr) != crc {
		return nil, false
	}
	entriesLBA, n, esize := le.Uint64(h[72:]), int64(le.Uint32(h[80:])), int64(le.Uint32(h[84:]))
	if n > maxGPTEntries || esize < 128 || esize > maxGPTEntrySize || entriesLBA > uint64(size/512) {
		return nil, false
	}
	entries := make([]byte, n*esize)
	if diskserve.ReadFullAt(d, entries, int64(entriesLBA)*512) != nil || crc32.ChecksumIEEE(entries) != le.Uint32(h[88:]) {
		return nil, false
	}
	var ps []partition
	for i := range n {
		e := entries[i*esize:]
		if allZero(e[:16]) { // an unused entry
			continue
		}
		first, last := le.Uint64(e[32:]), le.Uint64(e[40:])
		if p, ok := fit(first, last, size); ok {
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
		if typ == 0 || typ == 0xEE || count == 0 {
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
	return partition{off: int64(first) * 512, n: int64(last-first+1) * 512}, true
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// A window is a part of a disk shown as a disk of its own. It forwards
// every capability through the functions of package diskserve, so the
// underlying disk's fallbacks apply.
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
