package qcow2

import (
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A tableSlab holds the data of cached metadata tables in memory mapped
// outside the Go heap. The cache is most of what a large image costs (32
// MiB of L2 tables); on the heap, the collector would let the heap grow to
// twice what is live before it ran, and the tables a workload cycles
// through would be garbage, so the process would peak near twice the
// cache. A slot is reused once its table is evicted, and the mapping's
// pages become resident only when a table first uses them. Where the slab
// is full (dirty tables may outnumber the cache's bound until a flush) or
// could not be mapped, tables live on the heap.
type tableSlab struct {
	size int64 // of a slot: the cluster size

	mu   sync.Mutex
	mem  []byte // nil once closed, or if the mapping failed
	free []int32
}

func newTableSlab(n int, size int64) *tableSlab {
	s := &tableSlab{size: size}
	mem, err := unix.Mmap(-1, 0, n*int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return s
	}
	s.mem = mem
	s.free = make([]int32, n)
	for i := range s.free {
		s.free[i] = int32(n - 1 - i)
	}
	return s
}

// get returns a zeroed slot, or heap memory if no slot is free.
func (s *tableSlab) get() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.free) == 0 {
		return make([]byte, s.size)
	}
	i := int64(s.free[len(s.free)-1])
	s.free = s.free[:len(s.free)-1]
	b := s.mem[i*s.size : (i+1)*s.size : (i+1)*s.size]
	clear(b)
	return b
}

// put frees the slot that b is, if it is one.
func (s *tableSlab) put(b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem == nil || len(b) == 0 {
		return
	}
	off := uintptr(unsafe.Pointer(unsafe.SliceData(b))) - uintptr(unsafe.Pointer(unsafe.SliceData(s.mem)))
	if off < uintptr(len(s.mem)) {
		s.free = append(s.free, int32(int64(off)/s.size))
	}
}

// close unmaps the slab.
func (s *tableSlab) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem != nil {
		unix.Munmap(s.mem)
		s.mem, s.free = nil, nil
	}
}
