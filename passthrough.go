package diskserve

import (
	"errors"
	"fmt"
)

// Passthrough is a [Wrapper] that passes every call to the disk D: the
// base that wrappers embed, overriding only the methods they change. It
// implements every capability of [Forwarded]; its capability methods
// report [errors.ErrUnsupported] where D lacks the capability, so that the
// package functions fall back exactly as they would for D itself (writing
// zeroes through the wrapper's WriteAt, say).
//
// It does not implement [HostMapper]: a disk that embeds it sees every
// request, because no engine or exporter can move data past it. A wrapper
// that may be bypassed (one that only observes reads, say) opts in by
// defining MapHost itself.
type Passthrough struct {
	D DiskFile
}

var (
	_ Wrapper          = Passthrough{}
	_ Flusher          = Passthrough{}
	_ ZeroWriter       = Passthrough{}
	_ HolePuncher      = Passthrough{}
	_ ExtentMapper     = Passthrough{}
	_ Resizer          = Passthrough{}
	_ Describer        = Passthrough{}
	_ Checker          = Passthrough{}
	_ Snapshotter      = Passthrough{}
	_ CompressedWriter = Passthrough{}
	_ BitmapKeeper     = Passthrough{}
	_ DepthMapper      = Passthrough{}
	_ Emptier          = Passthrough{}
	_ BackingChanger   = Passthrough{}
	_ HostLocator      = Passthrough{}
)

// Unwrap returns D.
func (p Passthrough) Unwrap() DiskFile { return p.D }

// ReadAt reads from D.
func (p Passthrough) ReadAt(b []byte, off int64) (int, error) { return p.D.ReadAt(b, off) }

// WriteAt writes to D.
func (p Passthrough) WriteAt(b []byte, off int64) (int, error) { return p.D.WriteAt(b, off) }

// Size returns D's size.
func (p Passthrough) Size() int64 { return p.D.Size() }

// ReadOnly reports whether D is read-only.
func (p Passthrough) ReadOnly() bool { return p.D.ReadOnly() }

// Close closes D.
func (p Passthrough) Close() error { return p.D.Close() }

// Flush flushes D.
func (p Passthrough) Flush() error { return Flush(p.D) }

// WriteZeroesAt zeroes through D's ZeroWriter.
func (p Passthrough) WriteZeroesAt(off, n int64, flags ZeroFlags) error {
	if err := CheckWrite(p, off, n); err != nil {
		return fmt.Errorf("write zeroes: %w", err)
	}
	z, ok := p.D.(ZeroWriter)
	if !ok {
		return fmt.Errorf("write zeroes: %w", errors.ErrUnsupported)
	}
	return z.WriteZeroesAt(off, n, flags)
}

// PunchHole punches through D's HolePuncher.
func (p Passthrough) PunchHole(off, n int64) error {
	if err := CheckWrite(p, off, n); err != nil {
		return fmt.Errorf("punch hole: %w", err)
	}
	h, ok := p.D.(HolePuncher)
	if !ok {
		return fmt.Errorf("punch hole: %w", errors.ErrUnsupported)
	}
	return h.PunchHole(off, n)
}

// AppendExtents reports D's extents.
func (p Passthrough) AppendExtents(dst []Extent, off, n int64) ([]Extent, error) {
	return Extents(p.D, dst, off, n)
}

// Resize resizes D.
func (p Passthrough) Resize(size int64) error { return Resize(p.D, size) }

// MakeEmpty empties D.
func (p Passthrough) MakeEmpty() error { return MakeEmpty(p.D) }

// SetBacking changes D's backing file.
func (p Passthrough) SetBacking(name, fmtName string) error { return SetBacking(p.D, name, fmtName) }

// LocateHost locates D's runs in host files.
func (p Passthrough) LocateHost(off, n int64) (HostLocation, error) { return LocateHost(p.D, off, n) }

// Describe describes D.
func (p Passthrough) Describe(info *Info) { *info = Describe(p.D) }

// Check checks D.
func (p Passthrough) Check(repair Repair) (CheckReport, error) { return Check(p.D, repair) }

// CreateSnapshot creates a snapshot of D.
func (p Passthrough) CreateSnapshot(name string) (Snapshot, error) { return CreateSnapshot(p.D, name) }

// DirtyBitmap returns a dirty bitmap of D.
func (p Passthrough) DirtyBitmap(name string) (DirtyBitmap, error) { return FindDirtyBitmap(p.D, name) }

// AppendDepths reports D's allocation depths.
func (p Passthrough) AppendDepths(dst []Extent, off, n int64) ([]Extent, error) {
	return AllocationDepths(p.D, dst, off, n)
}

// Bitmaps lists the dirty bitmaps of D.
func (p Passthrough) Bitmaps() []BitmapInfo { return ListBitmaps(p.D) }

// ApplySnapshot applies a snapshot of D.
func (p Passthrough) ApplySnapshot(name string) error { return ApplySnapshot(p.D, name) }

// DeleteSnapshot deletes a snapshot of D.
func (p Passthrough) DeleteSnapshot(name string) error { return DeleteSnapshot(p.D, name) }

// WriteCompressed stores compressed data through D's CompressedWriter.
func (p Passthrough) WriteCompressed(b []byte, off int64) error {
	return WriteCompressed(p.D, b, off)
}
