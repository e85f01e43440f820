package raw

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve/internal/aligned"
)

// directIO does the I/O of a raw disk whose file is open with O_DIRECT
// (the cache modes none and directsync).
//
// The kernel takes only direct requests whose file offset, length and
// buffer address are multiples of the file's alignment (statx
// STATX_DIOALIGN, or the device's logical block size). Others go through
// an aligned bounce buffer, and a write that covers part of a block reads
// that block, changes its part and writes the whole block back. While such
// a read-modify-write runs, no other write of its blocks does: it waits for
// those in flight and holds back those that arrive, so neither undoes the
// other. Writes that share no block run in parallel.
//
// A file whose size is not a multiple of the alignment ends in a partial
// block that no direct write can cover without growing the file. Writes
// there go through a second, buffered descriptor; the kernel keeps the two
// coherent (a direct read writes the dirty pages of its range back first).
type directIO struct {
	fd       int
	align    int64   // file offsets and lengths
	memAlign uintptr // buffer addresses
	mu       sync.Mutex
	writes   []*span // the writes in flight

	bufferedOnce sync.Once
	buffered     *os.File // opened on the first write of a partial last block
	bufferedErr  error
}

// errNoDirect is the cause given when the file system refuses O_DIRECT.
var errNoDirect = errors.New("the file system does not support direct I/O (O_DIRECT), which the cache modes none and directsync need: use writeback or writethrough")

// A span is a write in flight over the blocks [lo, hi).
type span struct {
	lo, hi int64
	rmw    bool // a read-modify-write: it excludes every write of its blocks
	done   chan struct{}
}

// openDirect sets up direct I/O on f, opened with O_DIRECT.
func openDirect(f *os.File, blockDev bool) (*directIO, error) {
	x := &directIO{fd: int(f.Fd())}
	var st unix.Statx_t
	err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &st)
	switch {
	case err == nil && st.Mask&unix.STATX_DIOALIGN != 0 && st.Dio_offset_align == 0:
		return nil, errNoDirect
	case err == nil && st.Mask&unix.STATX_DIOALIGN != 0:
		x.align, x.memAlign = int64(st.Dio_offset_align), uintptr(st.Dio_mem_align)
	case blockDev:
		size, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
		if err != nil {
			return nil, fmt.Errorf("logical block size: %w", err)
		}
		x.align, x.memAlign = int64(size), uintptr(size)
	default: // the kernel does not say: the largest alignment in use
		x.align, x.memAlign = 4096, 4096
	}
	x.memAlign = max(x.memAlign, 1)
	if x.memAlign > aligned.Align || x.align <= 0 {
		return nil, fmt.Errorf("direct I/O alignment of %d bytes in memory, %d in the file: not supported", x.memAlign, x.align)
	}
	return x, nil
}

// writeTail writes p at off, in the partial last block, through a
// buffered descriptor of the same file.
func (x *directIO) writeTail(p []byte, off int64) (int, error) {
	x.bufferedOnce.Do(func() {
		// The open file itself, not its path, which may name another
		// file by now.
		x.buffered, x.bufferedErr = os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", x.fd), os.O_RDWR, 0)
	})
	if x.bufferedErr != nil {
		return 0, x.bufferedErr
	}
	done := 0
	for done < len(p) {
		n, err := unix.Pwrite(int(x.buffered.Fd()), p[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

func (x *directIO) close() {
	if x.buffered != nil {
		x.buffered.Close()
	}
}

func (x *directIO) down(off int64) int64 { return off / x.align * x.align }
func (x *directIO) up(off int64) int64   { return x.down(off + x.align - 1) }

// aligned reports whether p at off can go to the kernel as it is.
func (x *directIO) aligned(p []byte, off int64) bool {
	return off%x.align == 0 && int64(len(p))%x.align == 0 && uintptr(unsafe.Pointer(unsafe.SliceData(p)))%x.memAlign == 0
}

// bounceSize is the size of the pooled bounce buffers; larger requests
// allocate their own.
const bounceSize = 256 << 10

var bounces = sync.Pool{New: func() any { b := aligned.Bytes(bounceSize); return &b }}

// bounce returns an aligned buffer of n bytes and the function that
// gives it back.
func bounce(n int64) ([]byte, func()) {
	if n > bounceSize {
		return aligned.Bytes(int(n)), func() {}
	}
	b := bounces.Get().(*[]byte)
	return (*b)[:n], func() { bounces.Put(b) }
}

// readAt reads p at off, which the caller clipped to the disk.
func (x *directIO) readAt(p []byte, off int64) (int, error) {
	if x.aligned(p, off) {
		return x.pread(p, off)
	}
	lo, hi := x.down(off), x.up(off+int64(len(p)))
	buf, release := bounce(hi - lo)
	defer release()
	n, err := x.pread(buf, lo)
	got := max(0, min(int64(n)-(off-lo), int64(len(p))))
	copy(p, buf[off-lo:off-lo+got])
	switch {
	case got == int64(len(p)):
		err = nil
	case err == nil:
		err = io.EOF
	}
	return int(got), err
}

// pread fills p from off, aligned, up to the end of the file.
func (x *directIO) pread(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := unix.Pread(x.fd, p[done:], off+int64(done))
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return done, err
		case n == 0:
			return done, io.EOF
		}
		done += n
		if (off+int64(done))%x.align != 0 { // the end of the file
			return done, io.EOF
		}
	}
	return done, nil
}

// writeAt writes p at off, below the partial last block.
func (x *directIO) writeAt(p []byte, off int64) error {
	end := off + int64(len(p))
	if x.aligned(p, off) {
		s := x.begin(off, end, false)
		defer x.end(s)
		return x.pwrite(p, off)
	}
	lo, hi := x.down(off), x.up(end)
	rmw := off != lo || end != hi
	s := x.begin(lo, hi, rmw)
	defer x.end(s)
	buf, release := bounce(hi - lo)
	defer release()
	if off != lo {
		if _, err := x.pread(buf[:x.align], lo); err != nil {
			return err
		}
	}
	if end != hi && (hi-x.align > lo || off == lo) {
		if _, err := x.pread(buf[hi-lo-x.align:], hi-x.align); err != nil {
			return err
		}
	}
	copy(buf[off-lo:], p)
	return x.pwrite(buf, lo)
}

func (x *directIO) pwrite(p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(x.fd, p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// begin enters a write of [lo, hi) in flight, once no write it conflicts
// with runs: a read-modify-write conflicts with every write of its blocks.
func (x *directIO) begin(lo, hi int64, rmw bool) *span {
	x.mu.Lock()
	defer x.mu.Unlock()
	for {
		var wait chan struct{}
		for _, o := range x.writes {
			if o.lo < hi && lo < o.hi && (o.rmw || rmw) {
				wait = o.done
				break
			}
		}
		if wait == nil {
			break
		}
		x.mu.Unlock()
		<-wait
		x.mu.Lock()
	}
	s := &span{lo: lo, hi: hi, rmw: rmw, done: make(chan struct{})}
	x.writes = append(x.writes, s)
	return s
}

func (x *directIO) end(s *span) {
	x.mu.Lock()
	for i, o := range x.writes {
		if o == s {
			x.writes[i] = x.writes[len(x.writes)-1]
			x.writes = x.writes[:len(x.writes)-1]
			break
		}
	}
	x.mu.Unlock()
	close(s.done)
}

// exclusive runs fn, a change of [off, off+n) that may zero parts of
// blocks (fallocate), as a read-modify-write: no write of those blocks
// runs meanwhile, so none writes back what fn changed.
func (x *directIO) exclusive(off, n int64, fn func() error) error {
	s := x.begin(x.down(off), x.up(off+n), true)
	defer x.end(s)
	return fn()
}
