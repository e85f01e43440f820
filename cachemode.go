package diskserve

import (
	"fmt"
	"sync"
)

// A CacheMode says how an image uses the host's page cache and when its
// writes become durable. The names and meanings are qemu's (`-drive
// cache=`, `qemu-nbd --cache`), so that command lines carry over:
//
//	mode          host page cache   a write is durable
//	writeback     used              after a flush
//	none          bypassed          after a flush
//	writethrough  used              before its reply
//	directsync    bypassed          before its reply
//	unsafe        used              never on request (flushes are ignored)
//
// Bypassing the page cache is the file opener's part: it opens every host
// file of the image with O_DIRECT ([CacheMode.Direct]). Durability is
// [WithCache]'s.
type CacheMode string

// The cache modes.
const (
	CacheWriteback    CacheMode = "writeback"
	CacheNone         CacheMode = "none"
	CacheWritethrough CacheMode = "writethrough"
	CacheDirectSync   CacheMode = "directsync"
	CacheUnsafe       CacheMode = "unsafe"
)

// CacheModes lists the cache modes, the default first.
var CacheModes = []CacheMode{CacheWriteback, CacheNone, CacheWritethrough, CacheDirectSync, CacheUnsafe}

// ParseCacheMode returns the cache mode called s; "" is writeback.
func ParseCacheMode(s string) (CacheMode, error) {
	if s == "" {
		return CacheWriteback, nil
	}
	for _, m := range CacheModes {
		if string(m) == s {
			return m, nil
		}
	}
	return "", fmt.Errorf("unknown cache mode %q: want writeback, none, writethrough, directsync or unsafe", s)
}

// Direct reports whether the mode bypasses the host's page cache
// (O_DIRECT): none and directsync.
func (m CacheMode) Direct() bool { return m == CacheNone || m == CacheDirectSync }

// WriteThrough reports whether every write is durable before it
// completes: writethrough and directsync.
func (m CacheMode) WriteThrough() bool { return m == CacheWritethrough || m == CacheDirectSync }

// WithCache returns d with the durability of mode: under writethrough and
// directsync every write (and every other change: zeroes, holes, resize,
// snapshots) is followed by a flush before it returns, concurrent writes
// sharing one; under unsafe, flushes do nothing. For the other modes it
// returns d itself. Closing the result closes d.
//
// The wrapper sees every write: it maps reads to host files for engines
// ([HostMapper]) and, under unsafe, writes too, but never a flush.
func WithCache(d DiskFile, mode CacheMode) DiskFile {
	switch {
	case mode.WriteThrough():
		w := &writeThrough{Passthrough: Passthrough{d}}
		w.cond.L = &w.mu
		return w
	case mode == CacheUnsafe:
		return noFlush{Passthrough{d}}
	}
	return d
}

// writeThrough makes each change durable before it returns.
type writeThrough struct {
	Passthrough
	mu       sync.Mutex
	cond     sync.Cond
	started  uint64 // flushes started
	finished uint64 // the last flush finished
	running  bool
	failed   uint64 // the last flush that failed, and its error
	err      error
}

// durable returns once a flush that started after the call has finished:
// it covers every change completed before the call. One flush runs at a
// time; callers that arrive while one runs share the next.
func (w *writeThrough) durable() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	want := w.started + 1
	for w.finished < want {
		if w.running {
			w.cond.Wait()
			continue
		}
		w.running = true
		w.started++
		n := w.started
		w.mu.Unlock()
		err := Flush(w.D)
		w.mu.Lock()
		w.running, w.finished = false, n
		if err != nil {
			w.failed, w.err = n, err
		}
		w.cond.Broadcast()
	}
	if w.failed >= want {
		return w.err
	}
	return nil
}

func (w *writeThrough) WriteAt(b []byte, off int64) (int, error) {
	n, err := w.D.WriteAt(b, off)
	if err == nil {
		err = w.durable()
	}
	return n, err
}

func (w *writeThrough) WriteZeroesAt(off, n int64, flags ZeroFlags) error {
	return w.then(w.Passthrough.WriteZeroesAt(off, n, flags))
}

func (w *writeThrough) PunchHole(off, n int64) error {
	return w.then(w.Passthrough.PunchHole(off, n))
}

func (w *writeThrough) Resize(size int64) error { return w.then(w.Passthrough.Resize(size)) }

func (w *writeThrough) WriteCompressed(b []byte, off int64) error {
	return w.then(w.Passthrough.WriteCompressed(b, off))
}

func (w *writeThrough) CreateSnapshot(name string) (Snapshot, error) {
	s, err := w.Passthrough.CreateSnapshot(name)
	return s, w.then(err)
}

func (w *writeThrough) ApplySnapshot(name string) error {
	return w.then(w.Passthrough.ApplySnapshot(name))
}

func (w *writeThrough) DeleteSnapshot(name string) error {
	return w.then(w.Passthrough.DeleteSnapshot(name))
}

// then makes a change that succeeded durable.
func (w *writeThrough) then(err error) error {
	if err != nil {
		return err
	}
	return w.durable()
}

// MapHost maps reads only: writes must come through WriteAt.
func (w *writeThrough) MapHost(off, n int64, write bool) (HostRange, bool) {
	if write {
		return HostRange{}, false
	}
	return MapHost(w.D, off, n, false)
}

// noFlush ignores flushes.
type noFlush struct{ Passthrough }

// Flush does nothing.
func (noFlush) Flush() error { return nil }

// MapHost maps what D maps, but not as its whole self: an engine would
// flush the file itself.
func (u noFlush) MapHost(off, n int64, write bool) (HostRange, bool) {
	r, ok := MapHost(u.D, off, n, write)
	r.Whole = false
	return r, ok
}
