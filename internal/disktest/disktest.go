// Package disktest checks that a [diskserve.DiskFile] keeps its contract, in
// the spirit of testing/fstest. Every format, wrapper and async engine runs
// [Check].
package disktest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"testing/iotest"

	"github.com/diskserve/diskserve"
)

// Check runs the DiskFile contract against d, whose content must equal
// want. On a writable disk it also writes, zeroes, punches, flushes and
// resizes, and leaves different content behind (and, if the disk is a
// Resizer, possibly a different size); it does not close d.
func Check(t *testing.T, d diskserve.DiskFile, want []byte) {
	t.Helper()
	CheckWith(t, d, want, Options{})
}

// Options adjust [CheckWith] to a disk.
type Options struct {
	// ByteReads is the length of the two windows, at the start and at
	// the end of the disk, that iotest.TestReader reads in pieces down to
	// single bytes; 0 means 64 KiB. Disks on which every read is a device
	// I/O (O_DIRECT) take 8 KiB, which still covers every offset within a
	// 4 KiB block and a boundary between two.
	ByteReads int64
}

// CheckWith is [Check] with options.
func CheckWith(t *testing.T, d diskserve.DiskFile, want []byte, o Options) {
	t.Helper()
	if o.ByteReads == 0 {
		o.ByteReads = 64 << 10
	}
	c := &checker{d: d, want: bytes.Clone(want), rnd: rand.New(rand.NewPCG(1, 2)), window: o.ByteReads}
	t.Run("Size", c.size)
	t.Run("ReadAll", c.readAll)
	t.Run("ReadAt", c.readAt)
	t.Run("ConcurrentReads", c.concurrentReads)
	t.Run("Extents", c.extents)
	t.Run("Locations", c.locations)
	if d.ReadOnly() {
		t.Run("ReadOnly", c.readOnly)
		return
	}
	t.Run("Flusher", c.flusher)
	t.Run("WriteAt", c.writeAt)
	t.Run("WriteOutOfRange", c.writeOutOfRange)
	t.Run("ConcurrentWrites", c.concurrentWrites)
	t.Run("WriteZeroes", c.writeZeroes)
	t.Run("PunchHole", c.punchHole)
	t.Run("Extents/AfterWrites", c.extents)
	t.Run("Locations/AfterWrites", c.locations)
	t.Run("Resize", c.resize)
	t.Run("ReadAll/AfterWrites", c.readAll)
}

type checker struct {
	d      diskserve.DiskFile
	want   []byte // what d holds
	rnd    *rand.Rand
	window int64 // Options.ByteReads
}

func (c *checker) size(t *testing.T) {
	if got := c.d.Size(); got != int64(len(c.want)) {
		t.Fatalf("Size() = %d, want %d", got, len(c.want))
	}
}

// readAll compares the whole disk with want in large reads, and runs
// iotest.TestReader (which reads in small pieces, and slowly under -race
// or with O_DIRECT) over a window at the start and one that ends at the
// end of the disk.
func (c *checker) readAll(t *testing.T) {
	c.compareAll(t)
	size := int64(len(c.want))
	for _, off := range []int64{0, max(0, size-c.window)} {
		n := min(c.window, size-off)
		if err := iotest.TestReader(io.NewSectionReader(c.d, off, n), c.want[off:off+n]); err != nil {
			t.Fatalf("window [%d, %d): %v", off, off+n, err)
		}
	}
}

// compareAll compares the whole disk with want in large reads.
func (c *checker) compareAll(t *testing.T) {
	size := int64(len(c.want))
	p := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(p)) {
		c.checkReadInto(t, p, off, min(int64(len(p)), size-off))
	}
}

// randRange returns a range inside the disk whose offset and length are
// often unaligned and often cross a power-of-two boundary.
func (c *checker) randRange(maxLen int) (off, n int64) {
	size := int64(len(c.want))
	if size == 0 {
		return 0, 0
	}
	switch c.rnd.IntN(4) {
	case 0: // across a 64 KiB boundary, where clusters and frames end
		b := c.rnd.Int64N(size/(64<<10)+1) * (64 << 10)
		off = max(0, b-c.rnd.Int64N(4096)-1)
	case 1: // aligned to a sector
		off = c.rnd.Int64N(size) &^ 511
	default:
		off = c.rnd.Int64N(size)
	}
	off = min(off, size-1)
	n = min(c.rnd.Int64N(int64(maxLen))+1, size-off)
	return off, n
}

func (c *checker) readAt(t *testing.T) {
	size := int64(len(c.want))
	for range 200 {
		off, n := c.randRange(256 << 10)
		c.checkRead(t, off, n)
	}
	// At and around the end.
	for _, tc := range []struct{ off, n int64 }{
		{0, 1}, {size - 1, 1}, {size - 1, 2}, {size - 4097, 8192}, {size, 1}, {size + 4096, 10}, {0, size + 1},
	} {
		if tc.off < 0 {
			continue
		}
		p := make([]byte, tc.n)
		n, err := c.d.ReadAt(p, tc.off)
		wantN := max(0, min(tc.n, size-tc.off))
		if int64(n) != wantN {
			t.Errorf("ReadAt(%d bytes at %d) = %d bytes, want %d (size %d)", tc.n, tc.off, n, wantN, size)
		}
		if wantN < tc.n && err != io.EOF {
			t.Errorf("ReadAt(%d bytes at %d) short, error %v, want io.EOF", tc.n, tc.off, err)
		}
		if wantN == tc.n && err != nil && err != io.EOF {
			t.Errorf("ReadAt(%d bytes at %d): %v", tc.n, tc.off, err)
		}
		if int64(n) == wantN && wantN > 0 && !bytes.Equal(p[:n], c.want[tc.off:tc.off+wantN]) {
			t.Errorf("ReadAt(%d bytes at %d): wrong data", tc.n, tc.off)
		}
	}
	if n, err := c.d.ReadAt(make([]byte, 1), -1); err == nil || n != 0 {
		t.Errorf("ReadAt at offset -1 = %d, %v; want 0 and an error", n, err)
	}
}

// checkRead reads [off, off+n), which lies inside the disk, and compares it
// with want.
func (c *checker) checkRead(t *testing.T, off, n int64) {
	t.Helper()
	c.checkReadInto(t, make([]byte, n), off, n)
}

func (c *checker) checkReadInto(t *testing.T, buf []byte, off, n int64) {
	t.Helper()
	p := buf[:n]
	got, err := c.d.ReadAt(p, off)
	if int64(got) != n || (err != nil && !(err == io.EOF && off+n == int64(len(c.want)))) {
		t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", n, off, got, err)
	}
	if i := firstDiff(p, c.want[off:off+n]); i >= 0 {
		t.Fatalf("ReadAt(%d bytes at %d): byte %d (disk offset %d) is %#x, want %#x", n, off, i, off+int64(i), p[i], c.want[off+int64(i)])
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

func firstNonZero(p []byte) int {
	for i, b := range p {
		if b != 0 {
			return i
		}
	}
	return -1
}

func (c *checker) concurrentReads(t *testing.T) {
	var wg sync.WaitGroup
	for g := range 8 {
		rnd := rand.New(rand.NewPCG(uint64(g), 7))
		wg.Go(func() {
			p := make([]byte, 128<<10)
			for range 50 {
				off := rnd.Int64N(int64(len(c.want)) + 1)
				n := min(rnd.Int64N(int64(len(p)))+1, int64(len(c.want))-off)
				if n <= 0 {
					continue
				}
				got, err := c.d.ReadAt(p[:n], off)
				if int64(got) != n || (err != nil && err != io.EOF) {
					t.Errorf("ReadAt(%d bytes at %d) = %d, %v", n, off, got, err)
					return
				}
				if !bytes.Equal(p[:n], c.want[off:off+n]) {
					t.Errorf("concurrent ReadAt(%d bytes at %d): wrong data", n, off)
					return
				}
			}
		})
	}
	wg.Wait()
}

func (c *checker) extents(t *testing.T) {
	size := int64(len(c.want))
	c.checkExtents(t, 0, size)
	for range 20 {
		off, n := c.randRange(1 << 20)
		c.checkExtents(t, off, n)
	}
}

// locations walks the disk's host locations ([diskserve.LocateHost]),
// which must tile it, and reads each located run from its file: it must
// hold the disk's bytes, but where the disk reads zeroes (a zero cluster
// that keeps its space may hold old bytes). The disk is flushed first, so
// that the file holds what was written.
func (c *checker) locations(t *testing.T) {
	if err := diskserve.Flush(c.d); err != nil {
		t.Fatal(err)
	}
	files := map[string]*os.File{}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	size := int64(len(c.want))
	for pos := int64(0); pos < size; {
		n := min(size-pos, 1<<20)
		loc, err := diskserve.LocateHost(c.d, pos, n)
		if err != nil {
			t.Fatalf("LocateHost(%d, %d): %v", pos, n, err)
		}
		if loc.Len <= 0 || loc.Len > n {
			t.Fatalf("LocateHost(%d, %d) = %+v: not a run inside the range", pos, n, loc)
		}
		if loc.File != "" {
			f := files[loc.File]
			if f == nil {
				if f, err = os.Open(loc.File); err != nil {
					t.Fatalf("LocateHost(%d, %d) = %+v: %v", pos, n, loc, err)
				}
				files[loc.File] = f
			}
			got := make([]byte, loc.Len)
			if _, err := f.ReadAt(got, loc.Off); err != nil {
				t.Fatalf("LocateHost(%d, %d) = %+v: %v", pos, n, loc, err)
			}
			for i, b := range got {
				if want := c.want[pos+int64(i)]; b != want && want != 0 {
					t.Fatalf("LocateHost(%d, %d) = %+v: byte %d of the file is %#x, the disk's %#x", pos, n, loc, loc.Off+int64(i), b, want)
				}
			}
		}
		pos += loc.Len
	}
}

// checkExtents asks the disk for the extents of [off, off+n) and checks them.
func (c *checker) checkExtents(t *testing.T, off, n int64) {
	t.Helper()
	ext, err := diskserve.Extents(c.d, nil, off, n)
	if err != nil {
		t.Fatalf("Extents(%d, %d): %v", off, n, err)
	}
	CheckExtents(t, ext, c.want, off, n)
}

// CheckExtents checks that ext, the extents reported for [off, off+n) of a
// disk whose whole content is want, tile the range, carry no unknown flags,
// and that every extent claimed to read as zeroes does.
func CheckExtents(t *testing.T, ext []diskserve.Extent, want []byte, off, n int64) {
	t.Helper()
	pos := off
	for _, e := range ext {
		if e.Off != pos || e.Len <= 0 {
			t.Fatalf("Extents(%d, %d): extent %+v does not start at %d or is empty: %+v", off, n, e, pos, ext)
		}
		if e.Flags&^(diskserve.ExtentHole|diskserve.ExtentZero) != 0 {
			t.Fatalf("Extents(%d, %d): extent %+v has unknown flags", off, n, e)
		}
		if e.Flags&diskserve.ExtentZero != 0 {
			if i := firstNonZero(want[e.Off : e.Off+e.Len]); i >= 0 {
				t.Fatalf("Extents: %+v claims zeroes, but offset %d holds data", e, e.Off+int64(i))
			}
		}
		pos += e.Len
	}
	if pos != off+n {
		t.Fatalf("Extents(%d, %d) end at %d: %+v", off, n, pos, ext)
	}
}

func (c *checker) readOnly(t *testing.T) {
	size := c.d.Size()
	if _, err := c.d.WriteAt([]byte{1}, 0); !errors.Is(err, diskserve.ErrReadOnly) {
		t.Errorf("WriteAt on a read-only disk: %v, want ErrReadOnly", err)
	}
	if err := diskserve.WriteZeroes(c.d, 0, min(size, 4096), 0); !errors.Is(err, diskserve.ErrReadOnly) {
		t.Errorf("WriteZeroes on a read-only disk: %v, want ErrReadOnly", err)
	}
	if err := diskserve.PunchHole(c.d, 0, min(size, 4096)); !errors.Is(err, diskserve.ErrReadOnly) {
		t.Errorf("PunchHole on a read-only disk: %v, want ErrReadOnly", err)
	}
	if err := diskserve.Resize(c.d, size+4096); !errors.Is(err, diskserve.ErrReadOnly) {
		t.Errorf("Resize on a read-only disk: %v, want ErrReadOnly", err)
	}
	// Formats check read-only themselves too, not only the helpers.
	if z, ok := c.d.(diskserve.ZeroWriter); ok {
		if err := z.WriteZeroesAt(0, min(size, 4096), 0); !errors.Is(err, diskserve.ErrReadOnly) {
			t.Errorf("WriteZeroesAt on a read-only disk: %v, want ErrReadOnly", err)
		}
	}
	if p, ok := c.d.(diskserve.HolePuncher); ok {
		if err := p.PunchHole(0, min(size, 4096)); !errors.Is(err, diskserve.ErrReadOnly) {
			t.Errorf("PunchHole method on a read-only disk: %v, want ErrReadOnly", err)
		}
	}
	c.compareAll(t)
}

func (c *checker) flusher(t *testing.T) {
	if _, ok := c.d.(diskserve.Flusher); !ok {
		t.Fatalf("%T is writable but not a diskserve.Flusher", c.d)
	}
	if err := diskserve.Flush(c.d); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// write writes p at off and records it in want.
func (c *checker) write(t *testing.T, p []byte, off int64) {
	t.Helper()
	if n, err := c.d.WriteAt(p, off); n != len(p) || err != nil {
		t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", len(p), off, n, err)
	}
	copy(c.want[off:], p)
}

func (c *checker) randBytes(n int64) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(c.rnd.Uint32() | 1) // never zero, so zeroes show up
	}
	return p
}

func (c *checker) writeAt(t *testing.T) {
	for range 100 {
		off, n := c.randRange(128 << 10)
		c.write(t, c.randBytes(n), off)
		off, n = c.randRange(128 << 10)
		c.checkRead(t, off, n)
	}
	size := int64(len(c.want))
	c.write(t, c.randBytes(min(size, 4097)), size-min(size, 4097)) // ends exactly at the end
	c.write(t, c.randBytes(1), 0)
	c.compareAll(t)
	if err := diskserve.Flush(c.d); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

func (c *checker) writeOutOfRange(t *testing.T) {
	size := int64(len(c.want))
	for _, tc := range []struct{ off, n int64 }{{size - 1, 2}, {size, 1}, {size + 4096, 512}, {-1, 1}} {
		n, err := c.d.WriteAt(c.randBytes(tc.n), tc.off)
		if n != 0 || !errors.Is(err, diskserve.ErrOutOfRange) {
			t.Errorf("WriteAt(%d bytes at %d) on a disk of %d bytes = %d, %v; want 0, ErrOutOfRange", tc.n, tc.off, size, n, err)
		}
		if err := diskserve.WriteZeroes(c.d, tc.off, tc.n, 0); !errors.Is(err, diskserve.ErrOutOfRange) {
			t.Errorf("WriteZeroes(%d, %d) on a disk of %d bytes: %v, want ErrOutOfRange", tc.off, tc.n, size, err)
		}
		if err := diskserve.PunchHole(c.d, tc.off, tc.n); !errors.Is(err, diskserve.ErrOutOfRange) {
			t.Errorf("PunchHole(%d, %d) on a disk of %d bytes: %v, want ErrOutOfRange", tc.off, tc.n, size, err)
		}
	}
	if got := c.d.Size(); got != size {
		t.Fatalf("Size() = %d after refused writes, want %d", got, size)
	}
	c.compareAll(t) // nothing was written
}

// concurrentWrites writes interleaved stripes from several goroutines while
// others read the stripes nobody writes.
func (c *checker) concurrentWrites(t *testing.T) {
	const stripe = 12 << 10 // not a power of two: stripes straddle clusters
	size := int64(len(c.want))
	writers := 4
	data := make([][]byte, writers)
	for g := range writers {
		data[g] = c.randBytes(stripe)
		for off := int64(g) * stripe; off+stripe <= size; off += int64(writers+1) * stripe {
			copy(c.want[off:], data[g])
		}
	}
	var wg sync.WaitGroup
	for g := range writers {
		wg.Go(func() {
			for off := int64(g) * stripe; off+stripe <= size; off += int64(writers+1) * stripe {
				if n, err := c.d.WriteAt(data[g], off); n != stripe || err != nil {
					t.Errorf("concurrent WriteAt(%d bytes at %d) = %d, %v", stripe, off, n, err)
					return
				}
			}
		})
	}
	// The last stripe of each period is read, never written.
	wg.Go(func() {
		p := make([]byte, stripe)
		for off := int64(writers) * stripe; off+stripe <= size; off += int64(writers+1) * stripe {
			if n, err := c.d.ReadAt(p, off); n != stripe || (err != nil && err != io.EOF) {
				t.Errorf("ReadAt during writes (%d bytes at %d) = %d, %v", stripe, off, n, err)
				return
			}
			if !bytes.Equal(p, c.want[off:off+stripe]) {
				t.Errorf("ReadAt during writes at %d: wrong data", off)
				return
			}
		}
	})
	wg.Wait()
	c.compareAll(t)
}

// zeroCases are ranges to zero: unaligned, sector-aligned and cluster-sized.
func (c *checker) zeroCases() [][2]int64 {
	size := int64(len(c.want))
	cases := [][2]int64{{0, min(size, 1)}, {size - min(size, 3), min(size, 3)}}
	if size >= 4<<20 {
		cases = append(cases, [2]int64{1 << 20, 2 << 20}, [2]int64{65536 - 7, 65536 + 14})
	}
	for range 10 {
		off, n := c.randRange(300 << 10)
		cases = append(cases, [2]int64{off, n})
	}
	return cases
}

func (c *checker) writeZeroes(t *testing.T) {
	for _, flags := range []diskserve.ZeroFlags{0, diskserve.ZeroMayUnmap, diskserve.ZeroFast, diskserve.ZeroFast | diskserve.ZeroMayUnmap} {
		t.Run(fmt.Sprintf("flags=%d", flags), func(t *testing.T) {
			for _, r := range c.zeroCases() {
				off, n := r[0], r[1]
				c.write(t, c.randBytes(n), off)
				err := diskserve.WriteZeroes(c.d, off, n, flags)
				if flags&diskserve.ZeroFast != 0 && errors.Is(err, diskserve.ErrUnsupported) {
					c.checkRead(t, off, n) // refused: untouched
					continue
				}
				if err != nil {
					t.Fatalf("WriteZeroes(%d, %d, %d): %v", off, n, flags, err)
				}
				clear(c.want[off : off+n])
				c.checkRead(t, max(0, off-100), min(n+200, int64(len(c.want))-max(0, off-100)))
			}
		})
	}
}

func (c *checker) punchHole(t *testing.T) {
	for _, r := range c.zeroCases() {
		off, n := r[0], r[1]
		c.write(t, c.randBytes(n), off)
		if err := diskserve.PunchHole(c.d, off, n); err != nil {
			t.Fatalf("PunchHole(%d, %d): %v", off, n, err)
		}
		clear(c.want[off : off+n])
		c.checkRead(t, max(0, off-100), min(n+200, int64(len(c.want))-max(0, off-100)))
	}
	if err := diskserve.Flush(c.d); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// resize grows the disk, checks that the new tail reads as zeroes, and
// shrinks it back where the disk can shrink.
func (c *checker) resize(t *testing.T) {
	if _, ok := c.d.(diskserve.Resizer); !ok {
		if err := diskserve.Resize(c.d, c.d.Size()+4096); !errors.Is(err, diskserve.ErrUnsupported) {
			t.Fatalf("Resize on a disk that is not a Resizer: %v, want ErrUnsupported", err)
		}
		return
	}
	size := int64(len(c.want))
	grown := size + 64<<10 + 512
	if err := diskserve.Resize(c.d, grown); err != nil {
		if errors.Is(err, diskserve.ErrUnsupported) {
			t.Skipf("Resize to %d: %v", grown, err)
		}
		t.Fatalf("Resize to %d: %v", grown, err)
	}
	c.want = append(c.want, make([]byte, grown-size)...)
	c.size(t)
	c.checkRead(t, size-10, grown-size+10)
	c.write(t, c.randBytes(100), grown-100)
	err := diskserve.Resize(c.d, size)
	switch {
	case err == nil:
		c.want = c.want[:size]
	case !errors.Is(err, diskserve.ErrUnsupported):
		t.Fatalf("Resize back to %d: %v", size, err)
	}
	c.size(t)
}
