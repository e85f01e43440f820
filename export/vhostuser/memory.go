package vhostuser

import (
	"encoding/binary"
	"fmt"
	"math"

	"golang.org/x/sys/unix"
)

// A region is one range of guest memory, mapped from the descriptor the
// front-end passed.
type region struct {
	guest, size, user, offset uint64
	data                      []byte // the mapping: data[0] is guest address guest
	mapped                    []byte // what to unmap: data from the page it starts in
}

// Memory is the guest memory a front-end shares: the regions of its
// memory table. Every address from the guest or the front-end is checked
// against the regions before use; an address or length outside them is an
// error, never an access.
type Memory struct {
	regions []*region
}

// parseRegion decodes a memory region description.
func parseRegion(b []byte) (guest, size, user, offset uint64) {
	return binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint64(b[8:]),
		binary.LittleEndian.Uint64(b[16:]), binary.LittleEndian.Uint64(b[24:])
}

// mapRegion maps size bytes of fd from offset on, and closes fd.
func mapRegion(fd int, guest, size, user, offset uint64) (*region, error) {
	defer unix.Close(fd)
	switch {
	case size == 0:
		return nil, fmt.Errorf("memory region at guest address %#x: size 0", guest)
	case guest+size < guest || user+size < user || offset+size < offset:
		return nil, fmt.Errorf("memory region at guest address %#x: %d bytes wrap around", guest, size)
	case offset+size > math.MaxInt:
		return nil, fmt.Errorf("memory region at guest address %#x: %d bytes at offset %d are too many", guest, size, offset)
	}
	// A mapping past the end of its file faults when touched (SIGBUS),
	// which would bring the whole process down.
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("memory region at guest address %#x: %w", guest, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && offset+size > uint64(st.Size) {
		return nil, fmt.Errorf("memory region at guest address %#x: %d bytes at offset %d of a file of %d", guest, size, offset, st.Size)
	}
	// mmap needs a page-aligned offset, which the region's need not be.
	skip := offset % uint64(unix.Getpagesize())
	mapped, err := unix.Mmap(fd, int64(offset-skip), int(skip+size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map memory region at guest address %#x (%d bytes at offset %d): %w", guest, size, offset, err)
	}
	return &region{guest: guest, size: size, user: user, offset: offset, data: mapped[skip : skip+size : skip+size], mapped: mapped}, nil
}

func (r *region) unmap() {
	if r.mapped != nil {
		unix.Munmap(r.mapped)
		r.mapped, r.data = nil, nil
	}
}

// close unmaps every region.
func (m *Memory) close() {
	for _, r := range m.regions {
		r.unmap()
	}
	m.regions = nil
}

// add adds a region, refusing one that overlaps another in guest or user
// addresses.
func (m *Memory) add(r *region) error {
	if len(m.regions) >= maxSlots {
		return fmt.Errorf("more than %d memory regions", maxSlots)
	}
	for _, o := range m.regions {
		if r.guest < o.guest+o.size && o.guest < r.guest+r.size {
			return fmt.Errorf("memory region at guest address %#x (%d bytes) overlaps the one at %#x", r.guest, r.size, o.guest)
		}
	}
	m.regions = append(m.regions, r)
	return nil
}

// remove unmaps the region with these addresses and size.
func (m *Memory) remove(guest, size, user uint64) error {
	for i, r := range m.regions {
		if r.guest == guest && r.size == size && r.user == user {
			r.unmap()
			m.regions = append(m.regions[:i], m.regions[i+1:]...)
			return nil
		}
	}
	return fmt.Errorf("no memory region at guest address %#x of %d bytes to remove", guest, size)
}

// Guest returns the n bytes of guest memory at guest physical address
// addr, which must lie in one region.
func (m *Memory) Guest(addr, n uint64) ([]byte, error) { return m.slice("guest", addr, n) }

// slice returns the n bytes at addr, a guest or a user address, which
// must lie in one region.
func (m *Memory) slice(kind string, addr, n uint64) ([]byte, error) {
	for _, r := range m.regions {
		base := r.guest
		if kind == "user" {
			base = r.user
		}
		if addr >= base && addr-base < r.size {
			off := addr - base
			if n > r.size-off {
				return nil, fmt.Errorf("%s range %#x+%d crosses the end of its memory region", kind, addr, n)
			}
			return r.data[off : off+n : off+n], nil
		}
	}
	return nil, fmt.Errorf("%s address %#x is in no memory region", kind, addr)
}

// AppendGuest appends to dst the slices of guest memory that hold the n
// bytes at addr, which may cross from one region into the next.
func (m *Memory) AppendGuest(dst [][]byte, addr, n uint64) ([][]byte, error) {
	for n > 0 {
		r := m.find(addr)
		if r == nil {
			return dst, fmt.Errorf("guest address %#x is in no memory region", addr)
		}
		off := addr - r.guest
		k := min(n, r.size-off)
		dst = append(dst, r.data[off:off+k:off+k])
		addr += k
		n -= k
	}
	return dst, nil
}

func (m *Memory) find(addr uint64) *region {
	for _, r := range m.regions {
		if addr >= r.guest && addr-r.guest < r.size {
			return r
		}
	}
	return nil
}

// user returns the n bytes at the front-end's user address addr, which
// must lie in one region: the addresses of SET_VRING_ADDR.
func (m *Memory) user(addr, n uint64) ([]byte, error) { return m.slice("user", addr, n) }
