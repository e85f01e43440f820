// Package sparse reads Android sparse images, the format of Android's build
// and flashing tools (system.img, vendor.img), as libsparse defines it
// (system/core/libsparse/sparse_format.h in AOSP).
//
// # Supported
//
//   - Major version 1, any minor version; file and chunk headers larger
//     than the standard 28 and 12 bytes (the extra bytes are skipped).
//   - RAW, FILL (a 4-byte pattern at any alignment), DONT_CARE (reads as
//     zeroes) and CRC32 chunks, the latter anywhere in the file.
//   - Extents: DONT_CARE is a hole, FILL of zero reads as zero, RAW and
//     other FILLs are data.
//   - Check verifies CRC32 chunks and, when set, the image checksum; so does
//     the opener with [diskserve.Options.Verify].
//
// # Not supported
//
//   - Writing: the image's layout cannot take writes in place. Opening
//     read-write is refused; convert the image first.
//
// # Concurrency
//
// Every method may be called concurrently: the chunk index is built at
// open and never changes.
package sparse

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"sort"
	"strings"

	"github.com/diskserve/diskserve"
)

// Magic is the first four bytes of an Android sparse image (0xED26FF3A,
// little-endian).
const Magic = "\x3a\xff\x26\xed"

// Name is the format's name.
const Name = "android-sparse"

// Format is the Android sparse format for the opener.
var Format = diskserve.Format{Name: Name, Magic: Magic, Open: open, ReadOnly: true, Create: creator}

var le = binary.LittleEndian

// Chunk types.
const (
	chunkRaw      = 0xCAC1
	chunkFill     = 0xCAC2
	chunkDontCare = 0xCAC3
	chunkCRC32    = 0xCAC4
)

// Sizes and limits.
const (
	fileHeaderLen  = 28
	chunkHeaderLen = 12
	maxHeaderLen   = 4096     // larger file or chunk headers than this are refused
	maxBlockSize   = 64 << 20 // libsparse uses 4 KiB; 64 KiB is the largest seen in practice
	maxSize        = 1 << 62

	// maxChunks bounds the index, 32 bytes a chunk: 128 MiB at most.
	// img2simg writes a few chunks per run of data or zeroes, so real
	// images have thousands; only a file crafted to alternate tiny chunks
	// comes near it.
	maxChunks = 4 << 20
)

// chunk is one entry of the index: the expanded bytes [start, start+n).
// Its fields are ordered to take 32 bytes.
type chunk struct {
	start, n int64
	file     int64   // chunkRaw: offset of the data in the file
	fill     [4]byte // chunkFill: the pattern
	kind     uint16
}

// crcMark is a CRC32 chunk: the CRC of the expanded data before end.
type crcMark struct {
	index int // chunk number, for messages
	end   int64
	crc   uint32
}

// A Disk is an open Android sparse image.
type Disk struct {
	c        diskserve.DiskFile
	path     string
	size     int64
	blkSz    int64
	minor    uint16
	checksum uint32 // image_checksum; 0 when unset, as libsparse leaves it
	chunks   []chunk
	crcs     []crcMark
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
	if oc.Verify() {
		r, err := d.Check(diskserve.RepairNone)
		if err != nil {
			return nil, err
		}
		if r.Corruptions > 0 {
			return nil, corrupt(-1, "checksum verification failed: %s", strings.TrimPrefix(r.Messages[0], "ERROR "))
		}
	}
	return d, nil
}

// parse reads the header and every chunk header of the image in c and
// builds the chunk index.
func parse(c diskserve.DiskFile) (*Disk, error) {
	fileSize := c.Size()
	var h [fileHeaderLen]byte
	if err := diskserve.ReadFullAt(c, h[:], 0); err != nil {
		return nil, corrupt(0, "header truncated: %v", err)
	}
	major, minor := le.Uint16(h[4:]), le.Uint16(h[6:])
	fileHdr, chunkHdr := int64(le.Uint16(h[8:])), int64(le.Uint16(h[10:]))
	blkSz, totalBlks, totalChunks := int64(le.Uint32(h[12:])), int64(le.Uint32(h[16:])), int64(le.Uint32(h[20:]))
	switch {
	case major != 1:
		return nil, diskserve.Unsupported(Name, 4, "major version %d is not supported (only 1)", major)
	case fileHdr < fileHeaderLen || fileHdr > maxHeaderLen:
		return nil, corrupt(8, "file header size %d outside %d..%d", fileHdr, fileHeaderLen, maxHeaderLen)
	case chunkHdr < chunkHeaderLen || chunkHdr > maxHeaderLen:
		return nil, corrupt(10, "chunk header size %d outside %d..%d", chunkHdr, chunkHeaderLen, maxHeaderLen)
	case blkSz == 0 || blkSz%4 != 0 || blkSz > maxBlockSize:
		return nil, corrupt(12, "block size %d is not a multiple of 4 up to %d", blkSz, maxBlockSize)
	case totalBlks*blkSz > maxSize:
		return nil, corrupt(16, "%d blocks of %d bytes is too large", totalBlks, blkSz)
	case totalChunks > fileSize/chunkHdr:
		// Each chunk takes at least a header: this bounds the index.
		return nil, corrupt(20, "%d chunks cannot fit in a file of %d bytes", totalChunks, fileSize)
	case totalChunks > maxChunks:
		return nil, diskserve.Unsupported(Name, 20, "%d chunks, more than the %d diskserve indexes; rewrite the image with larger blocks: diskserve convert -O android-sparse -o block_size=4096", totalChunks, maxChunks)
	}
	d := &Disk{c: c, size: totalBlks * blkSz, blkSz: blkSz, minor: minor, checksum: le.Uint32(h[24:])}
	d.chunks = make([]chunk, 0, totalChunks) // allocated once: the claim is bounded above
	hdr := make([]byte, chunkHdr)
	pos, out := fileHdr, int64(0)
	for i := range int(totalChunks) {
		if err := diskserve.ReadFullAt(c, hdr, pos); err != nil {
			return nil, corrupt(pos, "chunk %d: header truncated: %v", i, err)
		}
		typ, blocks, total := le.Uint16(hdr[0:]), int64(le.Uint32(hdr[4:])), int64(le.Uint32(hdr[8:]))
		if total < chunkHdr || total > fileSize-pos {
			return nil, corrupt(pos, "chunk %d: total size %d outside %d..%d (the rest of the file)", i, total, chunkHdr, fileSize-pos)
		}
		data, n := total-chunkHdr, blocks*blkSz
		ch := chunk{start: out, n: n, kind: typ}
		switch typ {
		case chunkRaw:
			if data != n {
				return nil, corrupt(pos, "chunk %d: RAW chunk of %d blocks holds %d bytes, not %d", i, blocks, data, n)
			}
			ch.file = pos + chunkHdr
		case chunkFill:
			if data != 4 {
				return nil, corrupt(pos, "chunk %d: FILL chunk holds %d bytes, not 4", i, data)
			}
			if err := diskserve.ReadFullAt(c, ch.fill[:], pos+chunkHdr); err != nil {
				return nil, corrupt(pos, "chunk %d: %v", i, err)
			}
		case chunkDontCare:
			if data != 0 {
				return nil, corrupt(pos, "chunk %d: DONT_CARE chunk holds %d bytes, not 0", i, data)
			}
		case chunkCRC32:
			if data != 4 {
				return nil, corrupt(pos, "chunk %d: CRC32 chunk holds %d bytes, not 4", i, data)
			}
			var b [4]byte
			if err := diskserve.ReadFullAt(c, b[:], pos+chunkHdr); err != nil {
				return nil, corrupt(pos, "chunk %d: %v", i, err)
			}
			d.crcs = append(d.crcs, crcMark{index: i, end: out, crc: le.Uint32(b[:])})
			pos += total
			continue // takes no room in the expanded image
		default:
			return nil, corrupt(pos, "chunk %d: unknown chunk type %#x", i, typ)
		}
		if out+n > d.size {
			return nil, corrupt(pos, "chunk %d: chunks expand past the %d blocks of the header", i, totalBlks)
		}
		if n > 0 {
			d.chunks = append(d.chunks, ch)
		}
		pos += total
		out += n
	}
	if out != d.size {
		return nil, corrupt(16, "chunks expand to %d blocks, the header says %d", out/blkSz, totalBlks)
	}
	return d, nil
}

// Size returns the expanded size.
func (d *Disk) Size() int64 { return d.size }

// ReadOnly is true: sparse images are never written.
func (d *Disk) ReadOnly() bool { return true }

// WriteAt fails: the image is read-only.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("write: %w", diskserve.ErrReadOnly)
}

// Close closes the image file.
func (d *Disk) Close() error { return d.c.Close() }

// find returns the index of the chunk holding expanded offset off.
func (d *Disk) find(off int64) int {
	return sort.Search(len(d.chunks), func(i int) bool { return d.chunks[i].start+d.chunks[i].n > off }) // chunks tile [0, size)
}

// ReadAt reads expanded bytes, across as many chunks as it takes.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(d.size, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	done := 0
	for i := d.find(off); done < len(p); i++ {
		ch := &d.chunks[i]
		in := off + int64(done) - ch.start
		dst := p[done:min(len(p), done+int(ch.n-in))]
		switch ch.kind {
		case chunkRaw:
			if err := diskserve.ReadFullAt(d.c, dst, ch.file+in); err != nil {
				return done, fmt.Errorf("read RAW data at %#x: %w", ch.file+in, err)
			}
		case chunkFill:
			for k := range dst {
				dst[k] = ch.fill[(in+int64(k))%4]
			}
		case chunkDontCare:
			clear(dst)
		}
		done += len(dst)
	}
	return done, eof
}

// AppendExtents reports DONT_CARE as holes, FILL of zero as zeroes, and
// everything else as data.
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	end := off + n
	for i := d.find(off); i < len(d.chunks) && d.chunks[i].start < end; i++ {
		ch := d.chunks[i]
		e := diskserve.Extent{Off: max(off, ch.start), Flags: flags(ch)}
		e.Len = min(end, ch.start+ch.n) - e.Off
		dst = diskserve.AppendExtent(dst, e)
	}
	return dst, nil
}

func flags(ch chunk) diskserve.ExtentFlags {
	switch {
	case ch.kind == chunkDontCare:
		return diskserve.ExtentHole | diskserve.ExtentZero
	case ch.kind == chunkFill && ch.fill == [4]byte{}:
		return diskserve.ExtentZero
	}
	return 0
}

// Describe reports the block size and the chunk count.
func (d *Disk) Describe(info *diskserve.Info) {
	info.Format = Name
	info.Filename = d.path
	info.Specific = map[string]any{"block-size": d.blkSz, "chunks": len(d.chunks) + len(d.crcs), "minor-version": d.minor, "crc32-chunks": len(d.crcs)}
}

// Check verifies every CRC32 chunk against the expanded data before it,
// and the image checksum when the image sets one.
func (d *Disk) Check(repair diskserve.Repair) (diskserve.CheckReport, error) {
	var r diskserve.CheckReport
	if repair != diskserve.RepairNone {
		return r, fmt.Errorf("check: Android sparse images cannot be repaired: %w", diskserve.ErrReadOnly)
	}
	crc := uint32(0)
	buf := make([]byte, 1<<20)
	pos := int64(0)
	verify := func(want uint32, what string) {
		if crc != want {
			r.Corruptions++
			r.Messages = append(r.Messages, fmt.Sprintf("ERROR %s: CRC32 %#08x, the data before it gives %#08x", what, want, crc))
		}
	}
	for _, m := range d.crcs {
		for pos < m.end {
			n := min(int64(len(buf)), m.end-pos)
			if _, err := d.ReadAt(buf[:n], pos); err != nil && err != io.EOF {
				return r, err
			}
			crc = crc32.Update(crc, crc32.IEEETable, buf[:n])
			pos += n
		}
		verify(m.crc, fmt.Sprintf("chunk %d", m.index))
	}
	if d.checksum != 0 {
		for pos < d.size {
			n := min(int64(len(buf)), d.size-pos)
			if _, err := d.ReadAt(buf[:n], pos); err != nil && err != io.EOF {
				return r, err
			}
			crc = crc32.Update(crc, crc32.IEEETable, buf[:n])
			pos += n
		}
		verify(d.checksum, "image checksum")
	}
	r.ImageEndOffset = d.c.Size()
	return r, nil
}
