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
	diskserve.Passthrough
	e    Engine
	reqs sync.Pool // *Request, so a request allocates nothing
}

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
	return &Disk{Passthrough: diskserve.Passthrough{D: d}, e: e, reqs: sync.Pool{New: func() any { return new(Request) }}}
}

// Engine returns the engine the disk uses.
func (d *Disk) Engine() Engine { return d.e }

// MapHost maps reads as the disk beneath does, so that an exporter can
// send cached data from the host file itself (the NBD server uses
// sendfile). Writes are not mapped: they go through the engine, which maps
// them itself.
func (d *Disk) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	if write {
		return diskserve.HostRange{}, false
	}
	return diskserve.MapHost(d.D, off, n, false)
}

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
	if diskserve.CapabilitiesOf(d.D)&diskserve.CanWriteZeroes == 0 {
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
	if diskserve.CapabilitiesOf(d.D)&diskserve.CanPunchHole == 0 {
		return fmt.Errorf("punch hole: %w", errors.ErrUnsupported)
	}
	_, err := d.do(OpPunchHole, nil, off, n, 0)
	return err
}

// Close closes the engine, once every request has completed, then the
// disk beneath.
func (d *Disk) Close() error { return errors.Join(d.e.Close(), d.D.Close()) }
