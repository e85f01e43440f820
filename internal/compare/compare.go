// Package compare finds the first place where two disks differ, as
// `qemu-img compare` does: it walks both disks' extents, reads only what
// either disk holds as data (never a range both report as zeroes), and
// reads and compares on several goroutines at once.
package compare

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/diskserve/diskserve"
)

// What a difference is.
type What int

const (
	// Same: the disks read the same (and, strictly, are allocated alike).
	Same What = iota
	// Content: the disks read differently from Result.Off on.
	Content
	// Status: strictly, the disks' allocation differs at Result.Off.
	Status
	// Size: strictly, the disks differ in size.
	Size
)

// A Result is the outcome of [Disks].
type Result struct {
	What What
	Off  int64 // of the first differing 512-byte sector, or of the range whose allocation differs

	// SizesDiffer is set when the disks differ in size (not strictly:
	// then the larger one's tail was compared with zeroes).
	SizesDiffer bool
}

// Options tune [Disks].
type Options struct {
	// Strict also fails on differing sizes and on ranges whose extent
	// flags differ (data, zero, allocated).
	Strict bool

	// Workers is how many pieces are read and compared at once; 0
	// means 4.
	Workers int

	// Progress, if set, is told the bytes of the larger disk covered, as
	// they are.
	Progress func(n int64)
}

// An Error is a failure to learn a disk's extents or to read it.
type Error struct {
	Disk int    // 0 for the first disk, 1 for the second
	Op   string // "block status" or "read"
	Off  int64
	Err  error
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s at offset %d: %v", e.Op, e.Off, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

const (
	sector = 512
	piece  = 2 << 20   // the most one job covers
	step   = 256 << 10 // the most read at once from one disk
	window = 1 << 30   // the extents asked for at once
)

// Disks compares a and b: over the smaller size, then (if the sizes
// differ) the larger disk's tail against zeroes.
func Disks(ctx context.Context, a, b diskserve.DiskFile, opts Options) (Result, error) {
	if opts.Workers <= 0 {
		opts.Workers = 4
	}
	sa, sb := a.Size(), b.Size()
	if opts.Strict && sa != sb {
		return Result{What: Size}, nil
	}
	c := &comparison{disks: [2]diskserve.DiskFile{a, b}, opts: opts, first: -1}
	g, gctx := errgroup.WithContext(ctx)
	jobs := make(chan job, opts.Workers)
	for range opts.Workers {
		g.Go(func() error {
			bufs := [2][]byte{make([]byte, step), make([]byte, step)}
			for j := range jobs {
				if err := c.run(j, bufs); err != nil {
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		defer close(jobs)
		return c.plan(gctx, min(sa, sb), max(sa, sb), jobs)
	})
	if err := g.Wait(); err != nil {
		return Result{}, err
	}
	r := Result{SizesDiffer: sa != sb}
	if c.first >= 0 {
		r.What, r.Off = c.what, c.first
	}
	return r, nil
}

// A job is one piece of the disks to read: from the disks whose read
// flag is set; a disk not read holds zeroes there.
type job struct {
	off, n int64
	read   [2]bool
}

// comparison is the state of one [Disks] call.
type comparison struct {
	disks [2]diskserve.DiskFile
	opts  Options

	mu    sync.Mutex
	first int64 // the lowest difference found, or -1
	what  What
}

// found records a difference at off.
func (c *comparison) found(off int64, w What) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.first < 0 || off < c.first || off == c.first && w == Status {
		c.first, c.what = off, w
	}
}

// before reports whether a difference was found before off: work past it
// can be skipped.
func (c *comparison) before(off int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.first >= 0 && c.first < off
}

// plan walks the extents of both disks over [0, common) and of the larger
// one over [common, total), and sends the pieces to read.
func (c *comparison) plan(ctx context.Context, common, total int64, jobs chan<- job) error {
	var ext [2][]diskserve.Extent
	send := func(j job) error {
		for o := j.off; o < j.off+j.n; o += piece {
			if c.before(o) {
				return nil
			}
			select {
			case jobs <- job{off: o, n: min(piece, j.off+j.n-o), read: j.read}:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	for pos := int64(0); pos < common; pos += window {
		n := min(window, common-pos)
		for k, d := range c.disks {
			var err error
			if ext[k], err = diskserve.Extents(d, ext[k][:0], pos, n); err != nil {
				return &Error{Disk: k, Op: "block status", Off: pos, Err: err}
			}
		}
		for i, j := 0, 0; i < len(ext[0]) && j < len(ext[1]); {
			ea, eb := ext[0][i], ext[1][j]
			lo := max(ea.Off, eb.Off)
			hi := min(ea.Off+ea.Len, eb.Off+eb.Len)
			if c.before(lo) {
				return nil
			}
			if c.opts.Strict && ea.Flags != eb.Flags {
				c.found(lo, Status)
				return nil
			}
			za, zb := ea.Flags&diskserve.ExtentZero != 0, eb.Flags&diskserve.ExtentZero != 0
			if !za || !zb {
				if err := send(job{off: lo, n: hi - lo, read: [2]bool{!za, !zb}}); err != nil {
					return err
				}
			}
			if c.opts.Progress != nil {
				c.opts.Progress(hi - lo)
			}
			if hi == ea.Off+ea.Len {
				i++
			}
			if hi == eb.Off+eb.Len {
				j++
			}
		}
	}
	if common == total {
		return nil
	}
	k := 0
	if c.disks[1].Size() > common {
		k = 1
	}
	var read [2]bool
	read[k] = true
	return diskserve.WalkExtents(c.disks[k], common, total-common, func(e diskserve.Extent) bool {
		if e.Flags&diskserve.ExtentZero == 0 {
			if err := send(job{off: e.Off, n: e.Len, read: read}); err != nil {
				return false
			}
		}
		if c.opts.Progress != nil {
			c.opts.Progress(e.Len)
		}
		return !c.before(e.Off + e.Len)
	})
}

// run reads and compares one piece, a step of each disk at a time, so
// that what was read is compared while the CPU's cache still holds it.
func (c *comparison) run(j job, bufs [2][]byte) error {
	if c.before(j.off) {
		return nil
	}
	for o := j.off; o < j.off+j.n; o += step {
		m := min(step, j.off+j.n-o)
		for k, d := range c.disks {
			p := bufs[k][:m]
			if !j.read[k] {
				clear(p)
				continue
			}
			if err := diskserve.ReadFullAt(d, p, o); err != nil {
				return &Error{Disk: k, Op: "read", Off: o, Err: err}
			}
		}
		a, b := bufs[0][:m], bufs[1][:m]
		if bytes.Equal(a, b) {
			continue
		}
		i := 0
		for a[i] == b[i] {
			i++
		}
		c.found(max(o, (o+int64(i))/sector*sector), Content)
		return nil
	}
	return nil
}

// IsStatus reports whether err is a failure to learn a disk's extents
// (rather than to read it).
func IsStatus(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Op == "block status"
}
