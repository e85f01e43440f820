package diskserve

import (
	"bytes"
	"errors"
	"fmt"
	"io"
)

// The functions in this file are how callers use a disk's optional
// capabilities. Each one type-asserts the capability and holds the fallback
// for disks that lack it, as io.Copy does for io.WriterTo; exporters and
// wrappers call them instead of asserting, so the fallbacks live in one
// place.

// Flush makes every completed write to d durable, using d's [Flusher]. A
// disk that is not a Flusher has nothing to flush, and Flush returns nil.
func Flush(d DiskFile) error {
	if f, ok := d.(Flusher); ok {
		return f.Flush()
	}
	return nil
}

// WriteZeroes makes [off, off+n) of d read as zeroes. It uses d's
// [ZeroWriter] if it has one, and falls back to writing zeroes from a shared
// buffer when d has none or its ZeroWriter reports [errors.ErrUnsupported].
// With [ZeroFast] it never falls back: it returns an error wrapping
// errors.ErrUnsupported instead.
func WriteZeroes(d DiskFile, off, n int64, flags ZeroFlags) error {
	if err := CheckWrite(d, off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if z, ok := d.(ZeroWriter); ok {
		err := z.WriteZeroesAt(off, n, flags)
		if !errors.Is(err, errors.ErrUnsupported) {
			return err
		}
	}
	if flags&ZeroFast != 0 {
		return fmt.Errorf("fast zero of %d bytes at %d: %w", n, off, errors.ErrUnsupported)
	}
	return WriteZeroBytes(d, off, n)
}

// WriteZeroBytes zeroes [off, off+n) of d by writing zeroes with its
// WriteAt, from a shared buffer: the fallback of [WriteZeroes], for formats
// that must fall back themselves for part of a request.
func WriteZeroBytes(d DiskFile, off, n int64) error {
	for n > 0 {
		c := min(n, int64(len(zeroes)))
		if _, err := d.WriteAt(zeroes[:c], off); err != nil {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}

// zeroes is the source of fallback zero writes, and what IsZero compares
// against. It is never written to.
var zeroes [256 << 10]byte

// PunchHole deallocates [off, off+n) of d where it can, and makes the whole
// range read as zeroes. It uses d's [HolePuncher] if it has one, and falls
// back to [WriteZeroes] with [ZeroMayUnmap] when d has none or its
// HolePuncher reports [errors.ErrUnsupported].
func PunchHole(d DiskFile, off, n int64) error {
	if err := CheckWrite(d, off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if p, ok := d.(HolePuncher); ok {
		err := p.PunchHole(off, n)
		if !errors.Is(err, errors.ErrUnsupported) {
			return err
		}
	}
	return WriteZeroes(d, off, n, ZeroMayUnmap)
}

// Extents appends to dst the allocation extents of [off, off+n) of d, which
// must lie inside the disk, and returns the extended slice. It uses d's
// [ExtentMapper] if it has one; otherwise the whole range is one extent of
// data, which is always a safe answer.
func Extents(d DiskFile, dst []Extent, off, n int64) ([]Extent, error) {
	if err := CheckRange(d.Size(), off, n); err != nil {
		return dst, fmt.Errorf("extents: %w", err)
	}
	if n == 0 {
		return dst, nil
	}
	if m, ok := d.(ExtentMapper); ok {
		return m.AppendExtents(dst, off, n)
	}
	return append(dst, Extent{Off: off, Len: n}), nil
}

// Resize sets the virtual size of d to size bytes, using d's [Resizer]. A
// disk that is not a Resizer cannot change size, and Resize returns an error
// wrapping [errors.ErrUnsupported].
func Resize(d DiskFile, size int64) error {
	if d.ReadOnly() {
		return fmt.Errorf("resize: %w", ErrReadOnly)
	}
	if size < 0 {
		return fmt.Errorf("resize to %d bytes: %w", size, ErrOutOfRange)
	}
	if r, ok := d.(Resizer); ok {
		return r.Resize(size)
	}
	return fmt.Errorf("resize: %w", errors.ErrUnsupported)
}

// MakeEmpty drops what d's top layer holds with d's [Emptier]; a disk
// that is not an Emptier fails with an error wrapping
// [errors.ErrUnsupported].
func MakeEmpty(d DiskFile) error {
	if d.ReadOnly() {
		return fmt.Errorf("make empty: %w", ErrReadOnly)
	}
	if e, ok := d.(Emptier); ok {
		return e.MakeEmpty()
	}
	return fmt.Errorf("make empty: %w", errors.ErrUnsupported)
}

// SetBacking records name (of format fmtName) as d's backing file, or
// none, with d's [BackingChanger]; a disk that is not one fails with an
// error wrapping [errors.ErrUnsupported].
func SetBacking(d DiskFile, name, fmtName string) error {
	if d.ReadOnly() {
		return fmt.Errorf("set the backing file: %w", ErrReadOnly)
	}
	if b, ok := d.(BackingChanger); ok {
		return b.SetBacking(name, fmtName)
	}
	return fmt.Errorf("set the backing file: %w", errors.ErrUnsupported)
}

// Check verifies d's metadata with its [Checker], repairing what repair
// allows. A disk that is not a Checker has nothing it can check, and Check
// returns an error wrapping [errors.ErrUnsupported].
func Check(d DiskFile, repair Repair) (CheckReport, error) {
	if c, ok := d.(Checker); ok {
		return c.Check(repair)
	}
	return CheckReport{}, fmt.Errorf("check: %w", errors.ErrUnsupported)
}

// CreateSnapshot records d's current content as a new internal snapshot
// called name, with d's [Snapshotter].
func CreateSnapshot(d DiskFile, name string) (Snapshot, error) {
	s, err := snapshotter(d, "create snapshot")
	if err != nil {
		return Snapshot{}, err
	}
	return s.CreateSnapshot(name)
}

// ApplySnapshot reverts d to its internal snapshot name (an ID or a name),
// with d's [Snapshotter].
func ApplySnapshot(d DiskFile, name string) error {
	s, err := snapshotter(d, "apply snapshot")
	if err != nil {
		return err
	}
	return s.ApplySnapshot(name)
}

// DeleteSnapshot deletes d's internal snapshot name (an ID or a name), with
// d's [Snapshotter].
func DeleteSnapshot(d DiskFile, name string) error {
	s, err := snapshotter(d, "delete snapshot")
	if err != nil {
		return err
	}
	return s.DeleteSnapshot(name)
}

// FindDirtyBitmap returns the dirty bitmap called name that d's
// [BitmapKeeper] keeps.
func FindDirtyBitmap(d DiskFile, name string) (DirtyBitmap, error) {
	k, ok := d.(BitmapKeeper)
	if !ok {
		return nil, fmt.Errorf("bitmap %q: the disk keeps no dirty bitmaps: %w", name, errors.ErrUnsupported)
	}
	return k.DirtyBitmap(name)
}

// AllocationDepths appends to dst the extents of [off, off+n) of d with
// the depth of the layer holding each in Flags, from d's [DepthMapper].
func AllocationDepths(d DiskFile, dst []Extent, off, n int64) ([]Extent, error) {
	if err := CheckRange(d.Size(), off, n); err != nil {
		return dst, fmt.Errorf("allocation depths: %w", err)
	}
	if n == 0 {
		return dst, nil
	}
	if m, ok := d.(DepthMapper); ok {
		return m.AppendDepths(dst, off, n)
	}
	return append(dst, Extent{Off: off, Len: n, Flags: 1}), nil
}

// ListBitmaps lists the dirty bitmaps d's [BitmapKeeper] keeps; none if
// d has no BitmapKeeper.
func ListBitmaps(d DiskFile) []BitmapInfo {
	if k, ok := d.(BitmapKeeper); ok {
		return k.Bitmaps()
	}
	return nil
}

// snapshotter returns d's Snapshotter, or the error the snapshot functions
// return for a disk that has none or is read-only.
func snapshotter(d DiskFile, op string) (Snapshotter, error) {
	s, ok := d.(Snapshotter)
	switch {
	case !ok:
		return nil, fmt.Errorf("%s: the disk has no internal snapshots: %w", op, errors.ErrUnsupported)
	case d.ReadOnly():
		return nil, fmt.Errorf("%s: %w", op, ErrReadOnly)
	}
	return s, nil
}

// Describe returns what is known about d's image: its size and read-only
// state, and whatever d's [Describer] adds.
func Describe(d DiskFile) Info {
	info := Info{VirtualSize: d.Size(), ReadOnly: d.ReadOnly()}
	if de, ok := d.(Describer); ok {
		de.Describe(&info)
	}
	return info
}

// ReadFullAt reads exactly len(p) bytes at off, as [io.ReadFull] does for
// a stream: a short read, even one that ends at io.EOF, is an error
// ([io.ErrUnexpectedEOF] if r gave none).
func ReadFullAt(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// ClipRead applies the bounds of [io.ReaderAt] to a read of p at off on a
// disk of size bytes. It returns the part of p that lies inside the disk,
// and the error the read must end with once that part is read: nil, or
// [io.EOF] when p crosses the end. When nothing can be read the part is
// empty and the error says why: io.EOF at or past the end, an error
// wrapping [ErrOutOfRange] for a negative offset. Formats begin ReadAt
// with it:
//
//	p, eof := diskserve.ClipRead(d.size, off, p)
//	if len(p) == 0 {
//		return 0, eof
//	}
func ClipRead(size, off int64, p []byte) ([]byte, error) {
	switch {
	case off < 0:
		return p[:0], fmt.Errorf("read at %d: %w", off, ErrOutOfRange)
	case off >= size:
		return p[:0], io.EOF
	case int64(len(p)) > size-off:
		return p[:size-off], io.EOF
	}
	return p, nil
}

// CheckRange returns an error wrapping [ErrOutOfRange] unless off and n are
// non-negative and [off, off+n) lies inside a disk of the given size.
func CheckRange(size, off, n int64) error {
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%d bytes at offset %d on a disk of %d bytes: %w", n, off, size, ErrOutOfRange)
	}
	return nil
}

// CheckWrite returns the error that a write, zero or punch of [off, off+n)
// on d must fail with, or nil: [ErrReadOnly] on a read-only disk,
// [ErrOutOfRange] for a range outside it. Formats call it at the top of
// every mutating method.
func CheckWrite(d DiskFile, off, n int64) error {
	if d.ReadOnly() {
		return ErrReadOnly
	}
	return CheckRange(d.Size(), off, n)
}

// IsZero reports whether p holds only zero bytes.
func IsZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeroes))
		if !bytes.Equal(p[:n], zeroes[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}
