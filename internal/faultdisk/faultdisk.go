// Package faultdisk is a disk wrapper that fails reads, writes or flushes
// on command, for tests of what errors do to exporters and formats.
package faultdisk

import (
	"sync/atomic"

	"github.com/diskserve/diskserve"
)

// An Op is a kind of request that can be made to fail.
type Op int

// The operations. Writes cover WriteAt, WriteZeroesAt and PunchHole.
const (
	Read Op = iota
	Write
	Flush
	numOps
)

// A Disk passes requests to the disk it wraps until told to fail them.
type Disk struct {
	diskserve.Passthrough
	faults [numOps]fault
}

type fault struct {
	err   atomic.Pointer[error]
	after atomic.Int64 // requests that still succeed before err applies
	hits  atomic.Int64 // requests failed so far
}

// New wraps d; nothing fails until [Disk.Fail].
func New(d diskserve.DiskFile) *Disk { return &Disk{Passthrough: diskserve.Passthrough{D: d}} }

// Fail makes requests of kind op fail with err after the next after of
// them have succeeded; a nil err heals.
func (d *Disk) Fail(op Op, err error, after int64) {
	f := &d.faults[op]
	f.after.Store(after)
	if err == nil {
		f.err.Store(nil)
		return
	}
	f.err.Store(&err)
}

// Hits returns how many requests of kind op have been failed.
func (d *Disk) Hits(op Op) int64 { return d.faults[op].hits.Load() }

// check returns the error op must fail with now, or nil.
func (d *Disk) check(op Op) error {
	f := &d.faults[op]
	e := f.err.Load()
	if e == nil || f.after.Add(-1) >= 0 {
		return nil
	}
	f.hits.Add(1)
	return *e
}

// ReadAt fails or reads.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(Read); err != nil {
		return 0, err
	}
	return d.D.ReadAt(p, off)
}

// WriteAt fails or writes.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(Write); err != nil {
		return 0, err
	}
	return d.D.WriteAt(p, off)
}

// WriteZeroesAt fails or zeroes.
func (d *Disk) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	if err := d.check(Write); err != nil {
		return err
	}
	return d.Passthrough.WriteZeroesAt(off, n, flags)
}

// PunchHole fails or punches.
func (d *Disk) PunchHole(off, n int64) error {
	if err := d.check(Write); err != nil {
		return err
	}
	return d.Passthrough.PunchHole(off, n)
}

// Flush fails or flushes.
func (d *Disk) Flush() error {
	if err := d.check(Flush); err != nil {
		return err
	}
	return d.Passthrough.Flush()
}
