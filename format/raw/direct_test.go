package raw_test

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/internal/disktest"
)

func openDirect(t *testing.T, path string, readOnly bool) diskserve.DiskFile {
	t.Helper()
	d, err := raw.OpenFileDirect(path, readOnly)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// emptyFile makes a file of size bytes, all a hole.
func emptyFile(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestConformanceDirect runs the conformance suite with O_DIRECT on a file
// whose size is not a multiple of any block size: its last partial block
// takes the buffered path.
func TestConformanceDirect(t *testing.T) {
	path, want := makeImage(t, t.TempDir(), 4<<20+700)
	disktest.CheckWith(t, openDirect(t, path, false), want, disktest.Options{ByteReads: 8 << 10})
}

// TestDirectModel writes and reads every length from 1 byte to a few
// blocks, and longer ones up to 1 MiB, at offsets of every class against
// the block size (aligned, one past, the middle, one before a boundary),
// from buffers that are aligned in memory and buffers that are not, and
// compares each with a model.
func TestDirectModel(t *testing.T) {
	const size = 8<<20 + 1234
	path := emptyFile(t, size)
	d := openDirect(t, path, false)
	model := make([]byte, size)
	rnd := rand.New(rand.NewPCG(5, 6))
	var lengths []int64
	for n := int64(1); n <= 2*4096+1; n++ {
		lengths = append(lengths, n)
	}
	lengths = append(lengths, 65535, 65536, 65537, 256<<10+3, 1<<20-1, 1<<20)
	classes := []int64{0, 1, 256, 511, 4095}
	buf := make([]byte, 1<<20+4096+1)
	for i, n := range lengths {
		base := rnd.Int64N(size-2<<20) &^ 4095
		off := base + classes[i%len(classes)]
		if i%7 == 0 { // near the partial last block
			off = size - n - int64(i%3)
		}
		p := buf[i%2 : i%2+int(n)] // every other buffer at an odd address
		for j := range p {
			p[j] = byte(rnd.Uint32())
		}
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatalf("WriteAt(%d bytes at %d): %v", n, off, err)
		}
		copy(model[off:], p)
		// Read back a range around it, of another length and alignment.
		lo := max(0, off-int64(i%5)*3)
		hi := min(size, off+n+int64(i%3)*5)
		q := buf[(i+1)%2 : (i+1)%2+int(hi-lo)]
		if _, err := d.ReadAt(q, lo); err != nil {
			t.Fatalf("ReadAt(%d bytes at %d): %v", hi-lo, lo, err)
		}
		if !bytes.Equal(q, model[lo:hi]) {
			t.Fatalf("after WriteAt(%d bytes at %d), ReadAt(%d bytes at %d) differs from the model", n, off, hi-lo, lo)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, model) {
		t.Fatalf("the file differs from the model (%v)", err)
	}
}

// TestDirectSharedBlocks has writers change neighbouring bytes of the same
// blocks at once, each its own few bytes, some by zeroing them every other
// round (fallocate, the last round included), with aligned writes of other
// blocks among them: a read-modify-write that did not exclude the others
// would write back stale bytes over a neighbour's.
func TestDirectSharedBlocks(t *testing.T) {
	const size = 64 << 10
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, size), 0o644); err != nil {
		t.Fatal(err)
	}
	d := openDirect(t, path, false)
	const writers, stride, rounds = 8, 24, 20
	want := make([]byte, size)
	var wg sync.WaitGroup
	for g := range writers {
		wg.Go(func() {
			p := make([]byte, stride)
			for r := range rounds {
				for i := range p {
					p[i] = byte(g*31 + r + 1)
				}
				// Writer g owns bytes [k*writers*stride + g*stride, +stride)
				// of the first half; the second half takes aligned writes.
				zero := g%2 == 1 && r%2 == 1
				for k := int64(0); k < size/2/(writers*stride); k++ {
					off := k*writers*stride + int64(g)*stride
					var err error
					if zero {
						err = diskserve.WriteZeroes(d, off, stride, 0)
					} else {
						_, err = d.WriteAt(p, off)
					}
					if err != nil {
						t.Error(err)
						return
					}
				}
				if zero {
					clear(p)
				}
				q := make([]byte, 4096)
				for i := range q {
					q[i] = p[0]
				}
				if _, err := d.WriteAt(q, size/2+int64(g)*4096); err != nil {
					t.Error(err)
					return
				}
			}
			for k := int64(0); k < size/2/(writers*stride); k++ {
				off := k*writers*stride + int64(g)*stride
				copy(want[off:off+stride], p)
			}
			copy(want[size/2+int64(g)*4096:], bytes.Repeat(p[:1], 4096))
		})
	}
	wg.Wait()
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("byte %d is %d, want %d: a write was undone", i, got[i], want[i])
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestDirectBypassesPageCache writes and reads a file through a direct
// disk and finds none of its pages in the page cache.
func TestDirectBypassesPageCache(t *testing.T) {
	const size = 4 << 20
	path := emptyFile(t, size)
	d := openDirect(t, path, false)
	p := bytes.Repeat([]byte{7}, 1<<20)
	for off := int64(0); off < size; off += int64(len(p)) {
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		if _, err := d.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, size/os.Getpagesize())
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), size, uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	cached := 0
	for _, v := range vec {
		cached += int(v & 1)
	}
	if cached > 0 {
		t.Errorf("%d of %d pages are in the page cache", cached, len(vec))
	}
}
