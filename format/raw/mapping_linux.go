package raw

import (
	"os"
	"runtime/debug"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// storeWindow is how much of an image file a store maps: the first 64 GiB,
// whatever the file's size, so that the file can grow without a new
// mapping. Writes beyond it use pwrite. The cap bounds what the mapping
// can cost: the kernel keeps a page-table entry for each page stored to,
// 1/512 of the span touched, so at most 128 MiB.
const storeWindow = 64 << 30

// maxStore is the largest write that may be a store. A store faults on
// each page it touches for the first time since the page was cleaned,
// where a pwrite pays once per folio; only writes of a few pages into
// large folios come out ahead by store (BenchmarkWritePaths, and
// docs/performance.md on 1 MiB writes over NBD).
const maxStore = 16 << 10

var pageSize = int64(os.Getpagesize())

// A writeMapping is a shared mapping of an image file through which
// small writes (maxStore) go into the file's page cache where the pages
// they cover are already cached. Such a write (a "store") is a memory
// copy: no write system call and no inode lock, which on ext4 with large
// folios is what makes small buffered pwrites slow (see
// docs/performance.md). A write to pages that are not cached goes to
// pwrite instead, because a store into a missing page would read it from
// disk before overwriting it.
//
// The kernel reports errors of stores (ENOSPC while allocating a hole's
// block, EIO) as a SIGBUS at the faulting instruction. A store runs with
// [debug.SetPanicOnFault], recovers the fault and leaves the write to
// pwrite, which returns the real errno. Pages stored to are dirty page
// cache like those pwrite leaves, so fdatasync makes them durable.
type writeMapping struct {
	mu  sync.RWMutex // shared by writes, exclusive to unmap
	mem []byte       // nil once unmapped
}

// mapForWrites maps the file open at fd for stores, or returns nil where it
// cannot; writes then all go to pwrite.
func mapForWrites(fd int) *writeMapping {
	mem, err := unix.Mmap(fd, 0, storeWindow, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil
	}
	return &writeMapping{mem: mem}
}

// write stores p at off and reports whether it did; where it did not, the
// caller must write p with pwrite. A nil mapping stores nothing.
func (s *writeMapping) write(p []byte, off int64) bool {
	if s == nil {
		return false
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.covers(off, int64(len(p))) && s.copyIn(p, off)
}

// storable reports whether a write of n bytes at off would be a store
// now.
func (s *writeMapping) storable(off, n int64) bool {
	if s == nil {
		return false
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.covers(off, n)
}

// covers reports whether [off, off+n) lies in the mapping and in the page
// cache; s.mu must be held.
func (s *writeMapping) covers(off, n int64) bool {
	return s.mem != nil && n <= maxStore && off <= storeWindow-n && s.cached(off, n)
}

// cached reports whether every page of [off, off+n) is in the page cache,
// asking mincore(2) 256 pages at a time.
func (s *writeMapping) cached(off, n int64) bool {
	var vec [256]byte
	end := off + n
	for pos := off &^ (pageSize - 1); pos < end; {
		pages := min((end-pos+pageSize-1)/pageSize, int64(len(vec)))
		_, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&s.mem[pos])),
			uintptr(pages*pageSize), uintptr(unsafe.Pointer(&vec[0])))
		if errno != 0 {
			return false
		}
		for _, v := range vec[:pages] {
			if v&1 == 0 {
				return false
			}
		}
		pos += pages * pageSize
	}
	return true
}

// copyIn copies p to off in the mapping and reports false if the copy
// faulted. A fault anywhere else is not its business and panics on.
func (s *writeMapping) copyIn(p []byte, off int64) (ok bool) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if ok {
			return
		}
		if r := recover(); r != nil {
			if f, fault := r.(interface{ Addr() uintptr }); !fault || !s.contains(f.Addr()) {
				panic(r)
			}
		}
	}()
	copy(s.mem[off:], p)
	return true
}

func (s *writeMapping) contains(addr uintptr) bool {
	base := uintptr(unsafe.Pointer(unsafe.SliceData(s.mem)))
	return addr >= base && addr-base < uintptr(len(s.mem))
}

// unmap removes the mapping once the writes in progress are done.
func (s *writeMapping) unmap() {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem != nil {
		unix.Munmap(s.mem)
		s.mem = nil
	}
}
