// Package window shows a part of a disk as a disk of its own: a partition
// of a FUSE-mounted image, the data area of a fixed VHD, a flat VMDK
// extent.
package window

import (
	"github.com/diskserve/diskserve"
)

// A Disk is the range [off, off+n) of another disk. It is a view, not a
// [diskserve.Wrapper]: it moves offsets and has a size of its own, so it
// has only the capabilities that apply to part of a disk (flush, zeroes,
// holes, extents, depths, host mapping and location), each passed on
// through the functions of package diskserve so that the disk's fallbacks
// apply. Resizing, checking or snapshotting a window would act on the
// whole disk, and it has none of them.
type Disk struct {
	d         diskserve.DiskFile
	off, n    int64
	owns      bool
	allocated bool // holes below are allocated zeroes (see Allocated)
}

var (
	_ diskserve.DiskFile     = (*Disk)(nil)
	_ diskserve.Flusher      = (*Disk)(nil)
	_ diskserve.ZeroWriter   = (*Disk)(nil)
	_ diskserve.HolePuncher  = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.DepthMapper  = (*Disk)(nil)
	_ diskserve.HostMapper   = (*Disk)(nil)
	_ diskserve.HostLocator  = (*Disk)(nil)
)

// New returns the window [off, off+n) of d, which must lie inside d.
// With owns, closing the window closes d; otherwise d stays open.
func New(d diskserve.DiskFile, off, n int64, owns bool) *Disk {
	return &Disk{d: d, off: off, n: n, owns: owns}
}

// Allocated makes the window report every byte as allocated: what the
// disk below has as holes it reports as zeroes of its own. A fixed VHD's
// data area and a flat VMDK extent are allocated whole by their format,
// whatever the file system does with their zeroes, and qemu reports them
// so. It returns w.
func (w *Disk) Allocated() *Disk {
	w.allocated = true
	return w
}

// Size returns the window's length.
func (w *Disk) Size() int64 { return w.n }

// ReadOnly reports whether the disk below refuses writes.
func (w *Disk) ReadOnly() bool { return w.d.ReadOnly() }

// Flush flushes the disk below.
func (w *Disk) Flush() error { return diskserve.Flush(w.d) }

// LocateHost locates the range in the disk below: where that stores it is
// where the window does.
func (w *Disk) LocateHost(off, n int64) (diskserve.HostLocation, error) {
	return diskserve.LocateHost(w.d, w.off+off, n)
}

// Close closes the disk below if the window owns it.
func (w *Disk) Close() error {
	if w.owns {
		return w.d.Close()
	}
	return nil
}

// ReadAt reads the window.
func (w *Disk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(w.n, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	n, err := w.d.ReadAt(p, w.off+off)
	if n == len(p) {
		err = eof // the disk's own io.EOF, if the window ends where it does, is ours
	}
	return n, err
}

// WriteAt writes inside the window.
func (w *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := diskserve.CheckWrite(w, off, int64(len(p))); err != nil {
		return 0, err
	}
	return w.d.WriteAt(p, w.off+off)
}

// WriteZeroesAt zeroes inside the window.
func (w *Disk) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	if err := diskserve.CheckWrite(w, off, n); err != nil {
		return err
	}
	return diskserve.WriteZeroes(w.d, w.off+off, n, flags)
}

// PunchHole punches inside the window.
func (w *Disk) PunchHole(off, n int64) error {
	if err := diskserve.CheckWrite(w, off, n); err != nil {
		return err
	}
	return diskserve.PunchHole(w.d, w.off+off, n)
}

// AppendExtents reports the disk's extents, moved to the window's offsets.
func (w *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	dst, start, err := below(dst, func(tail []diskserve.Extent) ([]diskserve.Extent, error) {
		return diskserve.Extents(w.d, tail, w.off+off, n)
	})
	for i := start; i < len(dst); i++ {
		dst[i].Off -= w.off
		if w.allocated {
			dst[i].Flags &^= diskserve.ExtentHole
		}
	}
	return dst, err
}

// below appends to dst what get reports of the disk below, given an empty
// slice over dst's spare capacity so that nothing it appends merges into
// dst's last extent (whose offsets are the window's), and returns where
// the new extents start.
func below(dst []diskserve.Extent, get func([]diskserve.Extent) ([]diskserve.Extent, error)) ([]diskserve.Extent, int, error) {
	start := len(dst)
	ext, err := get(dst[start:])
	return append(dst, ext...), start, err
}

// AppendDepths reports the disk's allocation depths, moved to the
// window's offsets.
func (w *Disk) AppendDepths(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	dst, start, err := below(dst, func(tail []diskserve.Extent) ([]diskserve.Extent, error) {
		return diskserve.AllocationDepths(w.d, tail, w.off+off, n)
	})
	for i := start; i < len(dst); i++ {
		dst[i].Off -= w.off
	}
	return dst, err
}

// MapHost maps what the disk below maps. The window is not the whole
// file, so the mapping never says Whole.
func (w *Disk) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	r, ok := diskserve.MapHost(w.d, w.off+off, n, write)
	r.Whole = false
	return r, ok
}
