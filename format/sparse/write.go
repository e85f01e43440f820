package sparse

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"

	"github.com/diskserve/diskserve"
)

// DefaultBlockSize is the block size Write uses when given 0: libsparse's.
const DefaultBlockSize = 4096

// maxRawChunk bounds one RAW chunk, and so the memory Write holds.
const maxRawChunk = 16 << 20

// An Output is where Write puts an image: written in order, then the
// header is patched at offset 0 once the chunk count is known. *os.File is
// one.
type Output interface {
	io.Writer
	io.WriterAt
}

// Write writes the content of src to out as an Android sparse image of
// blockSize-byte blocks: DONT_CARE for blocks that read as zeroes (holes
// and zero ranges from src's extents, or blocks of zero bytes), FILL for
// blocks of one repeated 32-bit pattern, RAW for the rest. A last partial
// block is padded with zeroes, as img2simg does. progress, if not nil, is
// told how many bytes of src each step covered.
func Write(ctx context.Context, out Output, src diskserve.DiskFile, blockSize int64, progress func(int64)) error {
	if blockSize == 0 {
		blockSize = DefaultBlockSize
	}
	if blockSize%4 != 0 || blockSize < 4 || blockSize > maxBlockSize {
		return fmt.Errorf("block size %d is not a multiple of 4 up to %d", blockSize, maxBlockSize)
	}
	size := src.Size()
	blocks := (size + blockSize - 1) / blockSize
	if blocks > 1<<32-1 {
		return fmt.Errorf("%d blocks of %d bytes do not fit in a sparse image", blocks, blockSize)
	}
	w := &chunkWriter{w: bufio.NewWriterSize(out, 1<<20), bs: blockSize}
	if _, err := w.w.Write(make([]byte, fileHeaderLen)); err != nil { // patched at the end
		return err
	}
	const span = 16 << 20 // read and classified at a time
	buf := make([]byte, span)
	var ext []diskserve.Extent
	for off := int64(0); off < blocks*blockSize; off += span {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(span, blocks*blockSize-off)
		data := buf[:n]
		// What the extents say reads as zero is not read.
		known := min(n, max(0, size-off))
		var err error
		if ext, err = diskserve.Extents(src, ext[:0], off, known); err != nil {
			return err
		}
		clear(data)
		for _, e := range ext {
			if e.Flags&diskserve.ExtentZero != 0 {
				continue
			}
			if got, err := src.ReadAt(data[e.Off-off:e.Off-off+e.Len], e.Off); int64(got) != e.Len {
				return fmt.Errorf("read %d bytes at %d: %w", e.Len, e.Off, err)
			}
		}
		for b := int64(0); b < n; b += blockSize {
			if err := w.block(data[b : b+blockSize]); err != nil {
				return err
			}
		}
		if progress != nil {
			progress(known)
		}
	}
	if err := w.flush(); err != nil {
		return err
	}
	if err := w.w.Flush(); err != nil {
		return err
	}
	var h [fileHeaderLen]byte
	copy(h[:], Magic)
	le.PutUint16(h[4:], 1)
	le.PutUint16(h[8:], fileHeaderLen)
	le.PutUint16(h[10:], chunkHeaderLen)
	le.PutUint32(h[12:], uint32(blockSize))
	le.PutUint32(h[16:], uint32(blocks))
	le.PutUint32(h[20:], w.chunks)
	_, err := out.WriteAt(h[:], 0)
	return err
}

// chunkWriter merges blocks into chunks and writes them.
type chunkWriter struct {
	w      *bufio.Writer
	bs     int64
	chunks uint32
	kind   uint16 // of the chunk being built; 0 for none
	blocks uint32
	fill   [4]byte
	raw    []byte
}

func (c *chunkWriter) block(b []byte) error {
	kind, fill := classify(b)
	if c.kind != kind || kind == chunkFill && fill != c.fill || kind == chunkRaw && len(c.raw)+len(b) > maxRawChunk {
		if err := c.flush(); err != nil {
			return err
		}
		c.kind, c.fill = kind, fill
	}
	c.blocks++
	if kind == chunkRaw {
		c.raw = append(c.raw, b...)
	}
	return nil
}

// classify says how a block is stored: DONT_CARE if all zero, FILL if one
// 32-bit pattern repeats, RAW otherwise.
func classify(b []byte) (uint16, [4]byte) {
	var p [4]byte
	copy(p[:], b)
	for i := 4; i < len(b); i *= 2 { // compare the block with itself shifted: doubling runs
		if !bytes.Equal(b[i:min(len(b), 2*i)], b[:min(len(b), 2*i)-i]) {
			return chunkRaw, p
		}
	}
	if p == [4]byte{} {
		return chunkDontCare, p
	}
	return chunkFill, p
}

// flush writes the chunk being built.
func (c *chunkWriter) flush() error {
	if c.kind == 0 {
		return nil
	}
	if c.chunks == maxChunks {
		return fmt.Errorf("the image would have more than %d chunks, more than diskserve reads back: use a larger block_size", maxChunks)
	}
	var payload []byte
	switch c.kind {
	case chunkFill:
		payload = c.fill[:]
	case chunkRaw:
		payload = c.raw
	}
	var h [chunkHeaderLen]byte
	le.PutUint16(h[0:], c.kind)
	le.PutUint32(h[4:], c.blocks)
	le.PutUint32(h[8:], uint32(chunkHeaderLen+len(payload)))
	if _, err := c.w.Write(h[:]); err != nil {
		return err
	}
	if _, err := c.w.Write(payload); err != nil {
		return err
	}
	c.chunks++
	c.kind, c.blocks, c.raw = 0, 0, c.raw[:0]
	return nil
}

// creator writes images for `diskserve convert`, with the options of -o.
var creator = &diskserve.Creator{
	Options: []diskserve.CreateOption{{Name: "block_size", Default: "4096", Help: "bytes per block, a multiple of 4"}},
	Write: func(ctx context.Context, out *os.File, _ string, src diskserve.DiskFile, o diskserve.CreateOptions, progress func(int64)) error {
		blockSize, err := o.Size("block_size", DefaultBlockSize)
		if err != nil {
			return err
		}
		return Write(ctx, out, src, blockSize, progress)
	},
}
