package formatbench

import (
	"fmt"
	"math/rand/v2"

	"github.com/diskserve/diskserve"
)

// generated is the content benchmarks use when no source image is given:
// 1 MiB blocks in a cycle of four, random data (which does not compress),
// text (which does), zeroes (a hole) and random data again, so that every
// format stores a mix of what disks hold. It is computed on each read.
type generated struct{ size int64 }

// blockSize is the size of a block of generated content.
const blockSize = 1 << 20

// Generated returns a read-only disk of size bytes of that content.
func Generated(size int64) diskserve.DiskFile { return generated{size} }

func (g generated) Size() int64    { return g.size }
func (g generated) ReadOnly() bool { return true }
func (g generated) Close() error   { return nil }

func (g generated) WriteAt([]byte, int64) (int, error) { return 0, diskserve.ErrReadOnly }

func (g generated) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(g.size, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	block := make([]byte, blockSize)
	for done := 0; done < len(p); {
		at := off + int64(done)
		bi := at / blockSize
		g.block(block, bi)
		done += copy(p[done:], block[at-bi*blockSize:])
	}
	return len(p), eof
}

// block fills b with block bi.
func (generated) block(b []byte, bi int64) {
	switch bi % 4 {
	case 0, 3:
		rand.NewChaCha8([32]byte{byte(bi), byte(bi >> 8), byte(bi >> 16), byte(bi >> 24)}).Read(b)
	case 1:
		line := []byte(fmt.Sprintf("block %d of the benchmark disk: text compresses well. ", bi))
		for i := 0; i < len(b); i += copy(b[i:], line) {
		}
	case 2:
		clear(b)
	}
}

// AppendExtents reports the zero blocks as holes, so that image writers
// skip them without reading.
func (g generated) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	for pos, end := off, off+n; pos < end; {
		bi := pos / blockSize
		next := min((bi+1)*blockSize, end)
		var fl diskserve.ExtentFlags
		if bi%4 == 2 {
			fl = diskserve.ExtentHole | diskserve.ExtentZero
		}
		dst = append(dst, diskserve.Extent{Off: pos, Len: next - pos, Flags: fl})
		pos = next
	}
	return dst, nil
}
