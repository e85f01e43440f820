// Package control is the control side of `diskserve serve`: exports whose
// disk can be swapped for a qcow2 overlay while clients stay attached
// (live overlays), Prometheus metrics of each export's requests, and the
// HTTP/JSON API on a Unix socket that `diskserve control` talks to.
package control

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/internal/commit"
)

// A Live disk passes every request to its current disk, which Overlay
// replaces with a new qcow2 overlay on it and Commit with the image
// beneath. Requests hold a read lock; Overlay and Commit take the write
// lock, so new requests wait while requests in flight finish, and none
// fails or sees half a switch. It forwards every capability of
// [diskserve.Forwarded] and maps no host range, so that nothing reaches
// the disk past the lock.
type Live struct {
	mu   sync.RWMutex
	d    diskserve.DiskFile
	opts diskserve.Options // how images are opened
}

var _ diskserve.Wrapper = (*Live)(nil)

// NewLive serves d, which was opened with opts; Overlay opens overlays
// with the same options.
func NewLive(d diskserve.DiskFile, opts diskserve.Options) *Live {
	return &Live{d: d, opts: opts}
}

// current returns the current disk as a Passthrough, with the read lock
// held until release is called.
func (l *Live) current() (p diskserve.Passthrough, release func()) {
	l.mu.RLock()
	return diskserve.Passthrough{D: l.d}, l.mu.RUnlock
}

// Unwrap returns the current disk.
func (l *Live) Unwrap() diskserve.DiskFile {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.d
}

// Size returns the current disk's size.
func (l *Live) Size() int64 {
	p, release := l.current()
	defer release()
	return p.Size()
}

// ReadOnly reports whether the current disk is read-only.
func (l *Live) ReadOnly() bool {
	p, release := l.current()
	defer release()
	return p.ReadOnly()
}

// ReadAt reads the current disk.
func (l *Live) ReadAt(b []byte, off int64) (int, error) {
	p, release := l.current()
	defer release()
	return p.ReadAt(b, off)
}

// WriteAt writes the current disk.
func (l *Live) WriteAt(b []byte, off int64) (int, error) {
	p, release := l.current()
	defer release()
	return p.WriteAt(b, off)
}

// Flush flushes the current disk.
func (l *Live) Flush() error {
	p, release := l.current()
	defer release()
	return p.Flush()
}

// WriteZeroesAt zeroes on the current disk.
func (l *Live) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	p, release := l.current()
	defer release()
	return p.WriteZeroesAt(off, n, flags)
}

// PunchHole punches the current disk.
func (l *Live) PunchHole(off, n int64) error {
	p, release := l.current()
	defer release()
	return p.PunchHole(off, n)
}

// WriteCompressed writes compressed data to the current disk.
func (l *Live) WriteCompressed(b []byte, off int64) error {
	p, release := l.current()
	defer release()
	return p.WriteCompressed(b, off)
}

// AppendExtents reports the current disk's extents.
func (l *Live) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	p, release := l.current()
	defer release()
	return p.AppendExtents(dst, off, n)
}

// AppendDepths reports the current disk's allocation depths.
func (l *Live) AppendDepths(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	p, release := l.current()
	defer release()
	return p.AppendDepths(dst, off, n)
}

// DirtyBitmap returns a dirty bitmap of the current disk. It stays the
// bitmap of that disk after an overlay or a commit replaces it.
func (l *Live) DirtyBitmap(name string) (diskserve.DirtyBitmap, error) {
	p, release := l.current()
	defer release()
	return p.DirtyBitmap(name)
}

// Bitmaps lists the dirty bitmaps of the current disk.
func (l *Live) Bitmaps() []diskserve.BitmapInfo {
	p, release := l.current()
	defer release()
	return p.Bitmaps()
}

// Describe describes the current disk and its chain.
func (l *Live) Describe(info *diskserve.Info) {
	p, release := l.current()
	defer release()
	p.Describe(info)
}

// Resize resizes the current disk.
func (l *Live) Resize(size int64) error {
	p, release := l.current()
	defer release()
	return p.Resize(size)
}

// MakeEmpty empties the current disk.
func (l *Live) MakeEmpty() error {
	p, release := l.current()
	defer release()
	return p.MakeEmpty()
}

// SetBacking changes the backing file the current disk records.
func (l *Live) SetBacking(name, fmtName string) error {
	p, release := l.current()
	defer release()
	return p.SetBacking(name, fmtName)
}

// LocateHost locates the current disk's runs in host files.
func (l *Live) LocateHost(off, n int64) (diskserve.HostLocation, error) {
	p, release := l.current()
	defer release()
	return p.LocateHost(off, n)
}

// Check checks the current disk.
func (l *Live) Check(repair diskserve.Repair) (diskserve.CheckReport, error) {
	p, release := l.current()
	defer release()
	return p.Check(repair)
}

// CreateSnapshot creates an internal snapshot of the current disk.
func (l *Live) CreateSnapshot(name string) (diskserve.Snapshot, error) {
	p, release := l.current()
	defer release()
	return p.CreateSnapshot(name)
}

// ApplySnapshot applies an internal snapshot of the current disk.
func (l *Live) ApplySnapshot(name string) error {
	p, release := l.current()
	defer release()
	return p.ApplySnapshot(name)
}

// DeleteSnapshot deletes an internal snapshot of the current disk.
func (l *Live) DeleteSnapshot(name string) error {
	p, release := l.current()
	defer release()
	return p.DeleteSnapshot(name)
}

// Close closes the current disk.
func (l *Live) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.d.Close()
}

// Overlay makes the current image a stable point in time: it waits for
// the requests in flight, flushes, creates a qcow2 overlay at path whose
// backing file is the current top image (recorded by its absolute path),
// and serves the overlay from then on. The old image is not written again
// and can be copied or saved while the export goes on. On failure the
// export goes on with the image it had.
func (l *Live) Overlay(path string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.d.ReadOnly() {
		return fmt.Errorf("overlay: %w", diskserve.ErrReadOnly)
	}
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("overlay: %s exists", path)
	}
	if err := diskserve.Flush(l.d); err != nil {
		return fmt.Errorf("overlay: flush: %w", err)
	}
	info := diskserve.Describe(l.d)
	size := l.d.Size()
	top, err := filepath.Abs(info.Filename)
	if err != nil {
		return err
	}
	if err := qcow2.Create(path, qcow2.CreateOptions{Size: size, BackingFile: top, BackingFormat: info.Format}); err != nil {
		return fmt.Errorf("overlay: %w", err)
	}
	// The top image is locked for writing while it is open; the overlay
	// opens it again, read-only, as its backing file.
	if err := l.d.Close(); err != nil {
		os.Remove(path)
		return l.reopen(top, info.Format, size, fmt.Errorf("overlay: close %s: %w", top, err))
	}
	opts := l.opts
	opts.Format, opts.ReadOnly = qcow2.Format.Name, false
	d, err := format.Open(path, opts)
	if err != nil {
		os.Remove(path)
		return l.reopen(top, info.Format, size, fmt.Errorf("overlay: open the overlay: %w", err))
	}
	l.d = d
	return nil
}

// Commit merges the top overlay into its backing image and drops it,
// while clients stay attached: it waits for the requests in flight,
// flushes, opens the backing image for writing, copies every range the
// overlay holds (data, and zeroes where it has zero clusters), flushes the
// backing image, serves it from then on and deletes the overlay. The
// export must be a qcow2 overlay with a backing file. On failure before
// the switch, the export goes on with the overlay; the backing image may
// then hold part of the overlay's data, which the overlay still hides.
func (l *Live) Commit() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	info := diskserve.Describe(l.d)
	if info.Format != qcow2.Format.Name || info.Backing == nil || l.d.ReadOnly() {
		return fmt.Errorf("commit: the export is not a writable qcow2 overlay")
	}
	if err := diskserve.Flush(l.d); err != nil {
		return fmt.Errorf("commit: flush: %w", err)
	}
	top, base := info.Filename, info.Backing
	size := l.d.Size()
	if err := l.d.Close(); err != nil {
		return l.reopen(top, qcow2.Format.Name, size, fmt.Errorf("commit: close %s: %w", top, err))
	}
	opts := l.opts
	opts.Format, opts.ReadOnly = base.Format, false
	backing, err := format.Open(base.Filename, opts)
	if err != nil {
		return l.reopen(top, qcow2.Format.Name, size, fmt.Errorf("commit: open %s for writing: %w", base.Filename, err))
	}
	// The overlay opens its backing file read-only and without the lock,
	// which the writable open above holds. Copying reads only what the
	// overlay holds itself (allocation depth 1), never through to the
	// backing image being written.
	ovOpts := format.Options(l.opts)
	ovOpts.Format, ovOpts.ReadOnly = qcow2.Format.Name, true
	openFile := ovOpts.OpenFile
	ovOpts.OpenFile = func(path string, readOnly bool) (diskserve.DiskFile, error) {
		if path == base.Filename {
			return commit.OpenUnlocked(path)
		}
		return openFile(path, readOnly)
	}
	ov, err := format.Open(top, ovOpts)
	if err == nil {
		err = commit.Copy(context.Background(), backing, ov, 1, nil)
		err = errors.Join(err, ov.Close())
	}
	if err == nil {
		err = diskserve.Flush(backing)
	}
	if err != nil {
		backing.Close()
		return l.reopen(top, qcow2.Format.Name, size, fmt.Errorf("commit: %w", err))
	}
	l.d = backing
	if err := os.Remove(top); err != nil {
		return fmt.Errorf("commit: done, but the overlay stays: %w", err)
	}
	return nil
}

// reopen opens the image the export had again after a failed overlay or
// commit,
// and returns cause (joined with the reopen's error, if that fails too,
// in which case every request fails until the next overlay).
func (l *Live) reopen(path, formatName string, size int64, cause error) error {
	opts := l.opts
	opts.Format, opts.ReadOnly = formatName, false
	d, err := format.Open(path, opts)
	if err != nil {
		l.d = broken{size: size, err: err}
		return errors.Join(cause, err)
	}
	l.d = d
	return cause
}

// broken is what an export serves when its image could not be reopened.
type broken struct {
	size int64
	err  error
}

func (b broken) Size() int64                        { return b.size }
func (b broken) ReadOnly() bool                     { return false }
func (b broken) Close() error                       { return nil }
func (b broken) ReadAt([]byte, int64) (int, error)  { return 0, b.err }
func (b broken) WriteAt([]byte, int64) (int, error) { return 0, b.err }
