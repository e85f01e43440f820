package vhostuser

import (
	"encoding/binary"
	"fmt"
	"slices"

	"golang.org/x/sys/unix"
)

// The inflight region (qemu's docs/interop/vhost-user.rst, "Inflight I/O
// tracking"): shared memory that the front-end keeps across reconnections,
// in which the back-end records the chains it has taken and not yet
// returned, so that a restarted back-end finishes them. Its layout is the
// back-end's; this package uses the split-ring layout the document
// describes, one region per queue, each 64-byte aligned:
//
//	u64 features, u16 version, u16 desc_num, u16 last_batch_head,
//	u16 used_idx, then desc_num entries of
//	u8 inflight, u8 padding[5], u16 next, u64 counter
const (
	inflightHeader  = 16
	inflightEntry   = 16
	inflightVersion = 1
)

// inflightQueueBytes is the size of one queue's part of the region.
func inflightQueueBytes(size uint16) uint64 {
	return (inflightHeader + inflightEntry*uint64(size) + 63) &^ 63
}

// An inflightRegion is the mapped region of every queue.
type inflightRegion struct {
	data      []byte
	queues    uint16
	queueSize uint16
}

// newInflightRegion makes a region for queues queues of queueSize
// entries in a new memfd, and returns it with the memfd, which the
// front-end keeps.
func newInflightRegion(queues, queueSize uint16) (*inflightRegion, int, error) {
	if queues == 0 || queueSize == 0 || queueSize > maxQueueSize {
		return nil, -1, fmt.Errorf("inflight region for %d queues of %d entries", queues, queueSize)
	}
	size := uint64(queues) * inflightQueueBytes(queueSize)
	fd, err := unix.MemfdCreate("diskserve-inflight", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, -1, fmt.Errorf("inflight region: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, -1, fmt.Errorf("inflight region: %w", err)
	}
	r, err := mapInflight(fd, size, 0, queues, queueSize)
	if err != nil {
		unix.Close(fd)
		return nil, -1, err
	}
	return r, fd, nil
}

// mapInflight maps the region the front-end passed back (without taking
// fd).
func mapInflight(fd int, size, offset uint64, queues, queueSize uint16) (*inflightRegion, error) {
	need := uint64(queues) * inflightQueueBytes(queueSize)
	if queueSize == 0 || queueSize > maxQueueSize || size < need || size > 1<<30 || offset%uint64(unix.Getpagesize()) != 0 {
		return nil, fmt.Errorf("inflight region of %d bytes at offset %d for %d queues of %d entries", size, offset, queues, queueSize)
	}
	data, err := unix.Mmap(fd, int64(offset), int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map inflight region: %w", err)
	}
	return &inflightRegion{data: data, queues: queues, queueSize: queueSize}, nil
}

func (r *inflightRegion) close() {
	if r != nil && r.data != nil {
		unix.Munmap(r.data)
		r.data = nil
	}
}

// queue returns queue i's part, for a ring of size entries.
func (r *inflightRegion) queue(i int, size uint16) (*inflightQueue, error) {
	if i >= int(r.queues) || size > r.queueSize {
		return nil, fmt.Errorf("queue %d of %d entries has no part in the inflight region (%d queues of %d)", i, size, r.queues, r.queueSize)
	}
	n := inflightQueueBytes(r.queueSize)
	b := r.data[uint64(i)*n : uint64(i+1)*n]
	q := &inflightQueue{b: b}
	switch v := binary.LittleEndian.Uint16(b[8:]); v {
	case 0:
		clear(b)
		binary.LittleEndian.PutUint16(b[8:], inflightVersion)
		binary.LittleEndian.PutUint16(b[10:], size)
	case inflightVersion:
		if d := binary.LittleEndian.Uint16(b[10:]); d != size {
			return nil, fmt.Errorf("queue %d: the inflight region tracks %d entries, the ring has %d", i, d, size)
		}
	default:
		return nil, fmt.Errorf("queue %d: inflight region of version %d", i, v)
	}
	q.size = size
	return q, nil
}

// An inflightQueue is one queue's part of the inflight region.
type inflightQueue struct {
	b       []byte
	size    uint16
	counter uint64
}

func (q *inflightQueue) entry(head uint16) []byte {
	off := inflightHeader + inflightEntry*int(head)
	return q.b[off : off+inflightEntry]
}

// begin records that the chain at head was taken.
func (q *inflightQueue) begin(head uint16) {
	e := q.entry(head)
	q.counter++
	binary.LittleEndian.PutUint64(e[8:], q.counter)
	e[0] = 1
}

// end records that the chain at head was returned, the used index now
// being usedIdx (already stored in the used ring): a batch of one.
func (q *inflightQueue) end(head, usedIdx uint16) {
	e := q.entry(head)
	binary.LittleEndian.PutUint16(e[6:], binary.LittleEndian.Uint16(q.b[12:]))
	binary.LittleEndian.PutUint16(q.b[12:], head)
	e[0] = 0
	binary.LittleEndian.PutUint16(q.b[14:], usedIdx)
}

// recover settles the region against the used index of the ring, as a
// restarted back-end must, and returns the heads still in flight in the
// order they were taken.
func (q *inflightQueue) recover(ringUsed uint16) []uint16 {
	if binary.LittleEndian.Uint16(q.b[14:]) != ringUsed {
		// The last batch (one chain) reached the used ring; its entry
		// may not say so yet.
		if h := binary.LittleEndian.Uint16(q.b[12:]); h < q.size {
			q.entry(h)[0] = 0
		}
		binary.LittleEndian.PutUint16(q.b[14:], ringUsed)
	}
	var heads []uint16
	for h := range q.size {
		e := q.entry(h)
		if e[0] == 1 {
			heads = append(heads, h)
		}
		q.counter = max(q.counter, binary.LittleEndian.Uint64(e[8:]))
	}
	slices.SortFunc(heads, func(a, b uint16) int {
		ca, cb := binary.LittleEndian.Uint64(q.entry(a)[8:]), binary.LittleEndian.Uint64(q.entry(b)[8:])
		switch {
		case ca < cb:
			return -1
		case ca > cb:
			return 1
		}
		return 0
	})
	return heads
}
