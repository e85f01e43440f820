package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Split virtqueue layout (virtio 1.2, 2.7).
const (
	descSize          = 16
	descFNext         = 1
	descFWrite        = 2
	descFIndirect     = 4
	availFNoInterrupt = 1
	maxQueueSize      = 32768
	maxIndirect       = 1024 // descriptors in one indirect table
)

// A Queue is one split virtqueue of a started ring. Pop and the
// notification state belong to the queue's goroutine; Complete may be
// called from any goroutine.
type Queue struct {
	// Index is the queue's number.
	Index int

	mem      *Memory
	size     uint16
	desc     []byte
	avail    []byte
	used     []byte
	eventIdx bool
	indirect bool

	lastAvail uint16 // the next avail ring entry to take

	mu        sync.Mutex // the used ring and the call descriptor
	usedIdx   uint16
	signalled uint16 // usedIdx at the last call
	draining  bool   // the queue's goroutine is taking chains: calls wait for its end (see drain)
	call      int    // eventfd to signal, or -1
	inflight  *inflightQueue
	pending   sync.WaitGroup // chains popped and not yet completed
}

// A Chain is one request: the guest buffers of a descriptor chain, split
// into those the device reads (Out) and those it writes (In).
type Chain struct {
	Head uint16
	Out  [][]byte
	In   [][]byte
	// Alone says that no other chain was available when this one was
	// taken: the device may serve it on the queue's goroutine, saving the
	// hand-offs to and from another one, with nothing waiting behind it.
	Alone bool
}

func (c *Chain) reset() {
	c.Out, c.In = c.Out[:0], c.In[:0]
}

// word returns the aligned 32-bit word of b that holds the 16-bit value
// at b[off], and the value's shift in it; nil if that word is not all in
// b (then the value is accessed on its own, which a 2-byte aligned value
// allows on every platform Go runs on, without the ordering guarantee).
func word(b []byte, off int) (*uint32, uint) {
	p := unsafe.Pointer(&b[off])
	lead := int(uintptr(p) & 3)
	if off-lead < 0 || off-lead+4 > len(b) {
		return nil, 0
	}
	return (*uint32)(unsafe.Add(p, -lead)), uint(lead) * 8
}

// fenceWord is what fence operates on.
var fenceWord atomic.Uint32

// fence orders every memory access before it before every access after
// it (a locked instruction on amd64, a load-acquire store-release pair on
// arm64).
func fence() { fenceWord.Add(0) }

// load16 reads the little-endian 16-bit value at b[off] atomically, with
// acquire order.
func load16(b []byte, off int) uint16 {
	w, shift := word(b, off)
	if w == nil {
		return binary.LittleEndian.Uint16(b[off:])
	}
	return uint16(atomic.LoadUint32(w) >> shift)
}

// store16 writes v at b[off] atomically, leaving the other half of the
// aligned word that holds it as it is, and then fences: a load after it
// (the driver's index or event field) is not ordered before it.
func store16(b []byte, off int, v uint16) {
	w, shift := word(b, off)
	if w == nil {
		binary.LittleEndian.PutUint16(b[off:], v)
		fence()
		return
	}
	for {
		old := atomic.LoadUint32(w)
		next := old&^(0xffff<<shift) | uint32(v)<<shift
		if atomic.CompareAndSwapUint32(w, old, next) {
			return
		}
	}
}

// ringBytes returns how many bytes the parts of a ring of size entries
// take, with the event fields at their ends.
func ringBytes(size uint16) (desc, avail, used uint64) {
	n := uint64(size)
	return n * descSize, 6 + 2*n, 6 + 8*n
}

// availIdx returns the driver's avail index.
func (q *Queue) availIdx() uint16 { return load16(q.avail, 2) }

// Pop takes the next available chain into c. It reports false when the
// driver has made none available. An error is a chain that breaks the
// rules (an address outside guest memory, a loop, a readable buffer after
// a writable one): the driver is broken or hostile.
func (q *Queue) Pop(c *Chain) (bool, error) {
	idx := q.availIdx()
	if idx == q.lastAvail {
		return false, nil
	}
	if uint16(idx-q.lastAvail) > q.size {
		return false, fmt.Errorf("queue %d: the driver made %d buffers available on a ring of %d", q.Index, uint16(idx-q.lastAvail), q.size)
	}
	head := binary.LittleEndian.Uint16(q.avail[4+2*int(q.lastAvail%q.size):])
	q.lastAvail++
	if err := q.readChain(c, head); err != nil {
		return false, err
	}
	q.pending.Add(1)
	if q.inflight != nil {
		q.inflight.begin(head)
	}
	return true, nil
}

// readChain reads the descriptor chain that starts at head into c.
func (q *Queue) readChain(c *Chain, head uint16) error {
	c.reset()
	c.Head = head
	if head >= q.size {
		return fmt.Errorf("queue %d: chain head %d on a ring of %d", q.Index, head, q.size)
	}
	table, n := q.desc, uint32(q.size)
	i, seen, indirect := uint32(head), uint32(0), false
	for {
		if seen++; seen > n {
			return fmt.Errorf("queue %d: the chain at %d loops or is longer than its table", q.Index, head)
		}
		d := table[i*descSize : (i+1)*descSize]
		addr := binary.LittleEndian.Uint64(d)
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&descFIndirect != 0 {
			switch {
			case !q.indirect:
				return fmt.Errorf("queue %d: indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC", q.Index)
			case indirect:
				return fmt.Errorf("queue %d: an indirect table inside an indirect table", q.Index)
			case flags&descFNext != 0:
				return fmt.Errorf("queue %d: an indirect descriptor with NEXT set", q.Index)
			case length == 0 || length%descSize != 0 || length/descSize > maxIndirect:
				return fmt.Errorf("queue %d: an indirect table of %d bytes", q.Index, length)
			}
			t, err := q.mem.Guest(addr, uint64(length))
			if err != nil {
				return fmt.Errorf("queue %d: indirect table: %w", q.Index, err)
			}
			// A copy: the driver may change guest memory while we read it.
			table, n, i, seen, indirect = append([]byte(nil), t...), length/descSize, 0, 0, true
			continue
		}
		var err error
		if flags&descFWrite != 0 {
			c.In, err = q.mem.AppendGuest(c.In, addr, uint64(length))
		} else {
			if len(c.In) > 0 {
				return fmt.Errorf("queue %d: a buffer the device reads after one it writes, in the chain at %d", q.Index, head)
			}
			c.Out, err = q.mem.AppendGuest(c.Out, addr, uint64(length))
		}
		if err != nil {
			return fmt.Errorf("queue %d: descriptor %d: %w", q.Index, i, err)
		}
		if flags&descFNext == 0 {
			return nil
		}
		if uint32(next) >= n {
			return fmt.Errorf("queue %d: descriptor %d points to %d, past its table of %d", q.Index, i, next, n)
		}
		i = uint32(next)
	}
}

// Complete returns the chain with this head to the driver, with written
// bytes written into its buffers, and signals the driver unless it asked
// not to be.
func (q *Queue) Complete(head uint16, written uint32) {
	q.mu.Lock()
	slot := 4 + 8*int(q.usedIdx%q.size)
	binary.LittleEndian.PutUint32(q.used[slot:], uint32(head))
	binary.LittleEndian.PutUint32(q.used[slot+4:], written)
	q.usedIdx++
	store16(q.used, 2, q.usedIdx)
	if q.inflight != nil {
		q.inflight.end(head, q.usedIdx)
	}
	if !q.draining {
		q.notifyLocked()
	}
	q.mu.Unlock()
	q.pending.Done()
}

// drain marks the start (true) or the end (false) of a pass of the
// queue's goroutine over the chains available: completions during it
// signal the driver once, at its end, where each would interrupt the
// guest.
func (q *Queue) drain(on bool) {
	q.mu.Lock()
	q.draining = on
	if !on {
		q.notifyLocked()
	}
	q.mu.Unlock()
}

// notifyLocked signals the call eventfd if the driver wants to know of
// the used buffers since the last signal.
//
// Preconditions: q.mu is held.
func (q *Queue) notifyLocked() {
	if q.call < 0 {
		return
	}
	// The store of the used index above fences, so the driver's event
	// field read here is no older than it.
	if q.eventIdx {
		event := load16(q.avail, 4+2*int(q.size))
		old := q.signalled
		if uint16(q.usedIdx-event-1) >= uint16(q.usedIdx-old) {
			return
		}
	} else if load16(q.avail, 0)&availFNoInterrupt != 0 {
		return
	}
	q.signalled = q.usedIdx
	signal(q.call)
}

// signal writes 1 to the eventfd fd.
func signal(fd int) {
	var one [8]byte
	one[0] = 1
	for {
		if _, err := unix.Write(fd, one[:]); !errors.Is(err, unix.EINTR) {
			return
		}
	}
}

// wantKicks tells the driver to kick once it makes an entry available
// past the ones taken so far, and reports whether it made more available
// meanwhile.
func (q *Queue) wantKicks() bool {
	if q.eventIdx {
		store16(q.used, 4+8*int(q.size), q.lastAvail)
	} else {
		store16(q.used, 0, 0)
	}
	return q.availIdx() != q.lastAvail
}

// setCall replaces the call eventfd, closing the one before.
func (q *Queue) setCall(fd int) {
	q.mu.Lock()
	old := q.call
	q.call = fd
	q.mu.Unlock()
	if old >= 0 {
		unix.Close(old)
	}
}
