package async

import (
	"errors"
	"fmt"
	"sync"

	"github.com/diskserve/diskserve"
)

// A Disk is a [diskserve.DiskFile] whose reads, writes, flushes, zeroes and
// punches go through an [Engine]; everything else (size, extents,
// describe, check, resize) goes straight to the disk beneath. Exporters
// serve it in place of the disk they opened.
type Disk struct {
	d    diskserve.DiskFile
	e    Engine
	reqs sync.Pool // *Request, so a request allocates nothing
}

var (
	_ diskserve.Flusher      = (*Disk)(nil)
	_ diskserve.ZeroWriter   = (*Disk)(nil)
	_ diskserve.HolePuncher  = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.Resizer      = (*Disk)(nil)
	_ diskserve.Describer    = (*Disk)(nil)
	_ diskserve.Checker      = (*Disk)(nil)
	_ diskserve.Wrapper      = (*Disk)(nil)
)

// Wrap starts the engine opts asks for on d and returns d served through
// it. Closing the Disk closes the engine, then d.
func Wrap(d diskserve.DiskFile, opts Options) (*Disk, error) {
	e, err := New(d, opts)
	if err != nil {
		return nil, err
	}
	return NewDisk(e, d), nil
}

// NewDisk returns d served through e, which must be an engine on d.
func NewDisk(e Engine, d diskserve.DiskFile) *Disk {
	return &Disk{d: d, e: e, reqs: sync.Pool{New: func() any { return new(Request) }}}
}

// Engine returns the engine the disk uses.
func (d *Disk) Engine() Engine { return d.e }

// Unwrap returns the disk beneath.
func (d *Disk) Unwrap() diskserve.DiskFile { return d.d }

// Size returns the size of the disk beneath.
func (d *Disk) Size() int64 { return d.d.Size() }

// ReadOnly reports whether the disk beneath is read-only.
func (d *Disk) ReadOnly() bool { return d.d.ReadOnly() }

// do runs one request through the engine.
func (d *Disk) do(op Op, p []byte, off, n int64, flags diskserve.ZeroFlags) (int, error) {
	r := d.reqs.Get().(*Request)
	r.Op, r.Off, r.Buf, r.Len, r.Flags = op, off, p, n, flags
	d.e.Do(r)
	got, err := r.N, r.Err
	r.Buf, r.Err = nil, nil
	d.reqs.Put(r)
	return got, err
}

// ReadAt reads through the engine.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) { return d.do(OpRead, p, off, 0, 0) }

// WriteAt writes through the engine.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) { return d.do(OpWrite, p, off, 0, 0) }

// Flush flushes through the engine.
func (d *Disk) Flush() error {
	_, err := d.do(OpFlush, nil, 0, 0, 0)
	return err
}

// WriteZeroesAt zeroes through the engine, or reports
// [errors.ErrUnsupported] if the disk beneath has no [diskserve.ZeroWriter],
// so that [diskserve.WriteZeroes] writes zeroes through the engine instead.
func (d *Disk) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	if err := diskserve.CheckWrite(d, off, n); err != nil {
		return fmt.Errorf("write zeroes: %w", err)
	}
	if diskserve.CapabilitiesOf(d.d)&diskserve.CanWriteZeroes == 0 {
		return fmt.Errorf("write zeroes: %w", errors.ErrUnsupported)
	}
	_, err := d.do(OpWriteZeroes, nil, off, n, flags)
	return err
}

// PunchHole punches through the engine, or reports [errors.ErrUnsupported]
// if the disk beneath has no [diskserve.HolePuncher].
func (d *Disk) PunchHole(off, n int64) error {
	if err := diskserve.CheckWrite(d, off, n); err != nil {
		return fmt.Errorf("punch hole: %w", err)
	}
	if diskserve.CapabilitiesOf(d.d)&diskserve.CanPunchHole == 0 {
		return fmt.Errorf("punch hole: %w", errors.ErrUnsupported)
	}
	_, err := d.do(OpPunchHole, nil, off, n, 0)
	return err
}

// AppendExtents asks the disk beneath.
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	return diskserve.Extents(d.d, dst, off, n)
}

// Resize resizes the disk beneath.
func (d *Disk) Resize(size int64) error { return diskserve.Resize(d.d, size) }

// Describe describes the disk beneath.
func (d *Disk) Describe(info *diskserve.Info) { *info = diskserve.Describe(d.d) }

// Check checks the disk beneath.
func (d *Disk) Check(repair diskserve.Repair) (diskserve.CheckReport, error) {
	return diskserve.Check(d.d, repair)
}

// Close closes the engine, once every request has completed, then the
// disk beneath.
func (d *Disk) Close() error { return errors.Join(d.e.Close(), d.d.Close()) }
