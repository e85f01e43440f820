// Package async executes disk requests (read, write, flush, write zeroes,
// punch hole) for the exporters, with one of two engines behind one
// interface: io_uring, which moves the data of host-mapped ranges itself,
// and a bounded goroutine pool, which works for every disk.
//
// Exporters serve a disk through [NewDisk], a [diskserve.DiskFile] whose
// data requests go through an engine; [New] picks the engine.
//
// # Two ways to submit
//
// [Engine.Do] runs a request and returns when it is complete; the NBD and
// FUSE exporters use it, through [Disk], because each of their requests
// already has a goroutine of its own (an NBD worker, a go-fuse request
// goroutine), and with data in the page cache running it there is the
// cheapest path. [Engine.Submit] starts a request and calls its Done
// function on completion, without a goroutine waiting for it. No exporter
// uses it yet; it stays because the next ones need it: a vhost-user-blk
// queue is served by one goroutine that must keep many requests in flight,
// and with O_DIRECT on data that is in no cache, deep queues pay only when
// a request does not hold a goroutine until the device answers. Both
// engines implement both calls, and the conformance tests run both.
package async

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/diskserve/diskserve"
)

// An Op is the operation a [Request] asks for.
type Op uint8

// The operations.
const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpWriteZeroes
	OpPunchHole
)

var opNames = [...]string{"read", "write", "flush", "write zeroes", "punch hole"}

func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return fmt.Sprintf("op %d", o)
}

// A Request is one operation on an engine's disk and, once complete, its
// result. The caller owns a Request and its buffer except between
// [Engine.Submit] and the call of its Done function, when the engine does.
type Request struct {
	Op    Op
	Off   int64
	Buf   []byte              // the data of OpRead and OpWrite
	Len   int64               // the length of OpWriteZeroes and OpPunchHole
	Flags diskserve.ZeroFlags // for OpWriteZeroes

	// Done is called exactly once per Submit, on an engine goroutine or
	// before Submit returns, when the request is complete. It must not
	// block: hand the request on and return.
	Done func(*Request)

	// N is how many bytes of Buf a read or write moved.
	N int
	// Err is nil on success. A read that crosses the end of the disk
	// returns the bytes before it and io.EOF, as ReadAt does.
	Err error

	waiting bool          // Do waits on wake instead of a Done call
	wake    chan struct{} // made once per Request, so reuse allocates nothing
	mapped  diskserve.HostRange
}

// complete reports r's completion to whoever waits for it.
func complete(r *Request) {
	if r.waiting {
		r.wake <- struct{}{}
		return
	}
	r.Done(r)
}

// await prepares r for a Do that waits for its completion.
func (r *Request) await() {
	if r.wake == nil {
		r.wake = make(chan struct{}, 1)
	}
	r.waiting = true
}

// wait waits for the completion await prepared.
func (r *Request) wait() {
	<-r.wake
	r.waiting = false
}

// An Engine executes requests against one disk.
type Engine interface {
	// Submit starts r; r.Done is called when it completes. Submit blocks
	// while the engine has as many requests in flight as it takes, which
	// is the submitter's back-pressure. After Close, r completes at once
	// with an error wrapping ErrClosed.
	Submit(r *Request)

	// Do executes r and returns when it is complete, without calling
	// r.Done. A caller that would only wait for Done uses Do: the pool
	// then runs r on the caller's goroutine instead of handing it over and
	// back.
	Do(r *Request)

	// Close waits until every request submitted before it has completed,
	// then releases the engine. It does not close the disk.
	Close() error

	// Name is "uring" or "pool".
	Name() string
}

// ErrClosed is the error of a request submitted to a closed engine.
var ErrClosed = errors.New("I/O engine is closed")

// Mode chooses an engine: "auto", "uring" or "pool".
type Mode string

// The modes.
const (
	// Auto uses the engine the benchmarks found faster (BenchmarkEngine
	// and the bench/ harnesses; see docs/performance.md). For a disk whose
	// host files are open with O_DIRECT that is io_uring: every request
	// waits for the device, and the ring keeps them in flight without a
	// thread blocked in each. For every other disk it is the pool: with
	// data in the page cache a pread on the request's own goroutine costs
	// less than a ring round trip, and the kernel runs buffered ext4
	// writes submitted to a ring on its io-wq workers, one file at a time.
	Auto Mode = "auto"
	// Uring moves the data of host-mapped ranges with io_uring, or, where
	// the kernel refuses io_uring, falls back to the pool and logs why
	// once per process.
	Uring Mode = "uring"
	// Pool uses the goroutine pool.
	Pool Mode = "pool"
)

// Modes are the valid values of a Mode, for flag help.
var Modes = []Mode{Auto, Uring, Pool}

// ParseMode checks s as a mode name.
func ParseMode(s string) (Mode, error) {
	for _, m := range Modes {
		if string(m) == s {
			return m, nil
		}
	}
	return "", fmt.Errorf("unknown I/O engine %q (want auto, uring or pool)", s)
}

// Options configure [New].
type Options struct {
	Mode Mode
	// Workers bounds the pool's goroutines; 0 means 64.
	Workers int
	// Logger hears about a fallback; nil discards.
	Logger *slog.Logger
}

// New returns the engine that opts.Mode asks for, on d.
func New(d diskserve.DiskFile, opts Options) (Engine, error) {
	switch opts.Mode {
	case Auto, "":
		if direct(d) && uringSupported() == nil {
			return NewUring(d, opts.Workers)
		}
		return NewPool(d, opts.Workers), nil
	case Pool:
		return NewPool(d, opts.Workers), nil
	case Uring:
		if err := uringSupported(); err != nil {
			fallbackOnce.Do(func() {
				log := opts.Logger
				if log == nil {
					log = slog.New(slog.DiscardHandler)
				}
				log.Warn("io_uring unavailable, using the goroutine pool", "err", err)
			})
			return NewPool(d, opts.Workers), nil
		}
		return NewUring(d, opts.Workers)
	}
	return nil, fmt.Errorf("unknown I/O engine %q", opts.Mode)
}

// direct reports whether d maps its data onto host files open with
// O_DIRECT: whether its first block does.
func direct(d diskserve.DiskFile) bool {
	r, ok := diskserve.MapHost(d, 0, min(d.Size(), 4096), false)
	r.Done()
	return ok && r.Direct()
}

// exec runs r synchronously on d.
func exec(d diskserve.DiskFile, r *Request) {
	r.N = 0
	switch r.Op {
	case OpRead:
		r.N, r.Err = d.ReadAt(r.Buf, r.Off)
	case OpWrite:
		r.N, r.Err = d.WriteAt(r.Buf, r.Off)
	case OpFlush:
		r.Err = diskserve.Flush(d)
	case OpWriteZeroes:
		r.Err = diskserve.WriteZeroes(d, r.Off, r.Len, r.Flags)
	case OpPunchHole:
		r.Err = diskserve.PunchHole(d, r.Off, r.Len)
	default:
		r.Err = fmt.Errorf("%v: %w", r.Op, errors.ErrUnsupported)
	}
}
