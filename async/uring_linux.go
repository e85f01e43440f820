package async

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve"
)

// The io_uring ABI (include/uapi/linux/io_uring.h), as far as it is used.
const (
	opFsync     = 3
	opFallocate = 17
	opRead      = 22
	opWrite     = 23

	fsyncDatasync = 1 << 0

	setupSubmitAll = 1 << 7
	featSingleMmap = 1 << 0
	featNoDrop     = 1 << 1
	featRWCurPos   = 1 << 3 // since 5.6, with IORING_OP_READ, WRITE and FALLOCATE

	enterGetEvents  = 1 << 0
	registerEventfd = 4

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000
)

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

type sqe struct {
	opcode      uint8
	flags       uint8
	ioprio      uint16
	fd          int32
	off         uint64
	addr        uint64
	len         uint32
	opFlags     uint32
	userData    uint64
	bufIndex    uint16
	personality uint16
	spliceFDIn  int32
	addr3       uint64
	pad         uint64
}

type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

const (
	ringEntries = 128 // requests in flight per ring
)

// uringProbe sets up one ring, once per process, and says why io_uring
// cannot be used, or nil. Tests replace it to force the fallback.
var uringProbe = sync.OnceValue(func() error {
	r, err := newRing(4)
	if err != nil {
		return err
	}
	r.close()
	return nil
})

// uringSupported reports why io_uring cannot be used, or nil.
func uringSupported() error { return uringProbe() }

// fallbackOnce logs the fallback from io_uring to the pool once per process.
var fallbackOnce sync.Once

// UringEngine moves the data of reads and writes that the disk maps onto a
// host file ([diskserve.HostMapper]) with io_uring, and flushes, punches
// and zeroes raw files with it; everything else (holes, compressed data,
// metadata, formats that map nothing) goes to a [PoolEngine]. It has one
// ring per CPU, so that reads served inline from the page cache, which
// the kernel runs under the ring's lock, still run in parallel.
type UringEngine struct {
	d     diskserve.DiskFile
	whole int // the descriptor of a disk that is one host file, or -1
	rings []*ring
	next  atomic.Uint32
	pool  *PoolEngine

	mu       sync.RWMutex // held shared by Submit and Do, exclusive by Close
	shut     bool
	inflight sync.WaitGroup // requests in the rings
}

// NewUring sets up rings on d; workers bounds its fallback pool as in
// [NewPool]. It fails if the kernel refuses io_uring.
func NewUring(d diskserve.DiskFile, workers int) (*UringEngine, error) {
	if err := uringSupported(); err != nil {
		return nil, err
	}
	e := &UringEngine{d: d, whole: -1, pool: NewPool(d, workers)}
	if d.Size() > 0 {
		if hr, ok := diskserve.MapHost(d, 0, 1, false); ok && hr.Whole {
			e.whole = hr.FD
		}
	}
	for range runtime.GOMAXPROCS(0) {
		r, err := newRing(ringEntries)
		if err != nil {
			e.Close()
			return nil, err
		}
		r.finish = e.finish
		e.rings = append(e.rings, r)
	}
	return e, nil
}

// Name returns "uring".
func (e *UringEngine) Name() string { return string(Uring) }

// Submit starts r on a ring, or on the pool if no ring can serve it.
func (e *UringEngine) Submit(r *Request) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.shut {
		closed(r)
		complete(r)
		return
	}
	if !e.start(r) {
		e.pool.Submit(r)
	}
}

// Do runs r on a ring and waits, or runs it on the calling goroutine if no
// ring can serve it.
func (e *UringEngine) Do(r *Request) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.shut {
		closed(r)
		return
	}
	r.await()
	if !e.start(r) {
		r.waiting = false
		e.pool.Do(r)
		return
	}
	r.wait()
}

// Close waits for the requests in flight and releases the rings.
func (e *UringEngine) Close() error {
	e.mu.Lock()
	e.shut = true
	e.mu.Unlock()
	e.inflight.Wait()
	e.pool.Close()
	for _, r := range e.rings {
		r.close()
	}
	e.rings = nil
	return nil
}

// start puts r on a ring if one can serve it.
func (e *UringEngine) start(r *Request) bool {
	var s sqe
	switch r.Op {
	case OpRead, OpWrite:
		write := r.Op == OpWrite
		if len(r.Buf) == 0 {
			return false
		}
		hr, ok := diskserve.MapHost(e.d, r.Off, int64(len(r.Buf)), write)
		if !ok {
			return false
		}
		if !hr.Admits(r.Buf) {
			hr.Done()
			return false
		}
		r.mapped = hr
		s = sqe{opcode: opRead, fd: int32(hr.FD), off: uint64(hr.Off),
			addr: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(r.Buf)))), len: uint32(len(r.Buf))}
		if write {
			s.opcode = opWrite
		}
	case OpFlush:
		if e.whole < 0 {
			return false
		}
		s = sqe{opcode: opFsync, fd: int32(e.whole), opFlags: fsyncDatasync}
	case OpPunchHole, OpWriteZeroes:
		if e.whole < 0 || diskserve.CheckWrite(e.d, r.Off, r.Len) != nil || r.Len == 0 {
			return false
		}
		mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
		if r.Op == OpWriteZeroes && r.Flags&diskserve.ZeroMayUnmap == 0 {
			mode = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
		}
		s = sqe{opcode: opFallocate, fd: int32(e.whole), off: uint64(r.Off), addr: uint64(r.Len), len: mode}
	default:
		return false
	}
	e.inflight.Add(1)
	ring := e.rings[int(e.next.Add(1))%len(e.rings)]
	ring.submit(&s, r)
	return true
}

// finish completes a request from its ring result. A short transfer, and
// a fallocate mode the file system lacks, are finished by the pool through
// the disk's own methods, which hold the fallbacks.
func (e *UringEngine) finish(r *Request, res int32) {
	defer e.inflight.Done()
	r.mapped.Done() // before a fallback, which the disk may order after it
	r.mapped = diskserve.HostRange{}
	if res < 0 {
		errno := syscall.Errno(-res)
		if (r.Op == OpWriteZeroes || r.Op == OpPunchHole) && (errno == unix.EOPNOTSUPP || errno == unix.EINVAL) {
			e.pool.Submit(r)
			return
		}
		r.N, r.Err = 0, fmt.Errorf("%v of %d bytes at %d: %w", r.Op, len(r.Buf), r.Off, errno)
		complete(r)
		return
	}
	r.N, r.Err = int(res), nil
	if (r.Op == OpRead || r.Op == OpWrite) && r.N < len(r.Buf) {
		e.pool.Submit(&Request{Op: r.Op, Off: r.Off + int64(r.N), Buf: r.Buf[r.N:], Done: func(rest *Request) {
			r.N += rest.N
			r.Err = rest.Err
			if r.Err == nil && r.N < len(r.Buf) {
				r.Err = io.ErrUnexpectedEOF
			}
			complete(r)
		}})
		return
	}
	complete(r)
}

// A ring is one io_uring instance. Submitters fill entries under mu and
// submit; completions are reaped by whoever finds them, under cqMu: the
// submitter right after its io_uring_enter (reads from the page cache
// complete inline), or the reaper goroutine, which an eventfd wakes.
type ring struct {
	fd                     int
	mem, sqeMem            []byte // the rings (one mapping: IORING_FEAT_SINGLE_MMAP) and the entries
	sqTail, sqMask         *uint32
	sqArray                []uint32
	sqes                   []sqe
	cqHead, cqTail, cqMask *uint32
	cqes                   []cqe
	events                 *os.File // eventfd signalled on every completion

	mu     sync.Mutex // submission
	cqMu   sync.Mutex // reaping
	free   chan uint64
	slots  []atomic.Pointer[Request] // by user_data, while the kernel has them; atomic so the race detector sees the hand-over
	finish func(*Request, int32)
	quit   chan struct{}
}

func newRing(entries uint32) (_ *ring, err error) {
	var p params
	p.flags = setupSubmitAll
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno == unix.EINVAL { // before 5.18
		p = params{}
		fd, _, errno = unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	}
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &ring{fd: int(fd), quit: make(chan struct{})}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	const need = featSingleMmap | featNoDrop | featRWCurPos
	if p.features&need != need {
		return nil, fmt.Errorf("io_uring: kernel too old (features %#x, need %#x)", p.features, need)
	}
	sqSize := int(p.sqOff.array + p.sqEntries*4)
	cqSize := int(p.cqOff.cqes + p.cqEntries*uint32(unsafe.Sizeof(cqe{})))
	size := max(sqSize, cqSize)
	if r.mem, err = unix.Mmap(r.fd, offSQRing, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("io_uring mmap: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(p.sqEntries)*int(unsafe.Sizeof(sqe{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("io_uring mmap: %w", err)
	}
	u32 := func(mem []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&mem[off])) }
	r.sqTail = u32(r.mem, p.sqOff.tail)
	r.sqMask = u32(r.mem, p.sqOff.ringMask)
	r.sqArray = unsafe.Slice(u32(r.mem, p.sqOff.array), p.sqEntries)
	r.sqes = unsafe.Slice((*sqe)(unsafe.Pointer(&r.sqeMem[0])), p.sqEntries)
	r.cqHead = u32(r.mem, p.cqOff.head)
	r.cqTail = u32(r.mem, p.cqOff.tail)
	r.cqMask = u32(r.mem, p.cqOff.ringMask)
	r.cqes = unsafe.Slice((*cqe)(unsafe.Pointer(&r.mem[p.cqOff.cqes])), p.cqEntries)

	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	r.events = os.NewFile(uintptr(efd), "io_uring-eventfd") // nonblocking: read through the netpoller
	if _, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerEventfd, uintptr(unsafe.Pointer(&efd)), 1, 0, 0); errno != 0 {
		return nil, fmt.Errorf("io_uring register eventfd: %w", errno)
	}
	// In flight at most as many as the submission queue holds; the
	// completion queue is twice that, so it never overflows.
	r.free = make(chan uint64, p.sqEntries)
	r.slots = make([]atomic.Pointer[Request], p.sqEntries)
	for i := range p.sqEntries {
		r.free <- uint64(i)
	}
	go r.reapLoop()
	return r, nil
}

// submit queues s for r and enters the kernel; rg.finish is called with
// the result.
func (rg *ring) submit(s *sqe, r *Request) {
	id := <-rg.free
	rg.slots[id].Store(r)
	s.userData = id
	rg.mu.Lock()
	tail := *rg.sqTail // only submitters move the tail
	i := tail & *rg.sqMask
	rg.sqes[i] = *s
	rg.sqArray[i] = i
	atomic.StoreUint32(rg.sqTail, tail+1)
	rg.mu.Unlock()
	// Submit everything queued (the kernel caps the count at what is
	// there), so an entry another submitter queued is never left behind.
	for {
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(rg.fd), ringEntries, 0, 0, 0, 0)
		if errno == 0 || errno != unix.EINTR && errno != unix.EAGAIN && errno != unix.EBUSY {
			break
		}
		runtime.Gosched()
	}
	rg.reap()
}

// reap completes every request the completion queue holds.
func (rg *ring) reap() {
	rg.cqMu.Lock()
	head := *rg.cqHead
	tail := atomic.LoadUint32(rg.cqTail)
	if head == tail {
		rg.cqMu.Unlock()
		return
	}
	var done [ringEntries]*Request
	var res [ringEntries]int32
	n := 0
	for ; head != tail; head++ {
		c := rg.cqes[head&*rg.cqMask]
		done[n], res[n] = rg.slots[c.userData].Swap(nil), c.res
		rg.free <- c.userData
		n++
	}
	atomic.StoreUint32(rg.cqHead, head)
	rg.cqMu.Unlock()
	for i := range n {
		rg.finish(done[i], res[i])
	}
}

// reapLoop reaps completions that arrive while no submitter is looking,
// until the ring is closed.
func (rg *ring) reapLoop() {
	var b [8]byte
	for {
		if _, err := rg.events.Read(b[:]); err != nil && !errors.Is(err, syscall.EAGAIN) {
			close(rg.quit)
			return
		}
		rg.reap()
	}
}

// close releases the ring. Nothing may be in flight.
func (rg *ring) close() {
	if rg.events != nil {
		rg.events.Close()
		<-rg.quit
	}
	if rg.sqeMem != nil {
		unix.Munmap(rg.sqeMem)
	}
	if rg.mem != nil {
		unix.Munmap(rg.mem)
	}
	unix.Close(rg.fd)
}
