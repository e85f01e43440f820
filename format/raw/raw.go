// Package raw implements raw disk images: regular files and block devices
// whose bytes are the guest's bytes.
//
// # Supported
//
//   - Regular files and block devices, read-only or read-write.
//   - Write zeroes with fallocate(FALLOC_FL_ZERO_RANGE), or
//     FALLOC_FL_PUNCH_HOLE when the caller allows unmapping, falling back
//     to writes (in [diskserve.WriteZeroes]) where the file system refuses.
//   - Punch hole with fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE), on
//     block devices too: there the kernel zeroes the range and unmaps what
//     it can, which keeps the promise that a punched range reads as zeroes.
//     BLKDISCARD does not make that promise, so it is not used.
//   - Allocation extents from lseek(SEEK_DATA/SEEK_HOLE); block devices
//     report all data.
//   - Flush with fdatasync; resize of regular files with ftruncate.
//   - An advisory flock(2) lock, shared for read-only opens and exclusive
//     for read-write ones, so that two diskserve processes cannot write one
//     image. qemu uses byte-range locks instead, which this lock does not
//     interlock with.
//
// # Concurrency
//
// Every method may be called concurrently, as [diskserve.DiskFile] requires;
// reads are single pread calls. A write of up to 16 KiB to a regular file
// into pages in the page cache is a memory copy into a shared mapping of
// the file or a pwrite, whichever has been faster in its region of the
// file lately (see wayChooser); other writes are single pwrite calls.
// Resize must not race with I/O at the offsets it removes.
//
// # Direct I/O
//
// [OpenFileDirect] opens the file with O_DIRECT, bypassing the page cache
// (the cache modes none and directsync). Requests of any offset and length
// still work: unaligned ones go through a bounce buffer, and partial
// blocks are read, modified and written back, excluding the other writes
// of those blocks meanwhile.
package raw

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync/atomic"
	"time"

	"github.com/diskserve/diskserve"
	"golang.org/x/sys/unix"
)

// Format is the raw format. It matches every file, so it goes last in an
// opener's list; opening returns the image file itself.
var Format = diskserve.Format{
	Name: "raw",
	Open: func(c diskserve.DiskFile, _ *diskserve.OpenContext) (diskserve.DiskFile, error) { return c, nil },
	Create: &diskserve.Creator{
		Options: []diskserve.CreateOption{
			{Name: "preallocation", Default: "off", Help: "off (a sparse file), falloc (its space allocated) or full (zeroes written)"},
		},
		New:         create,
		Measure:     measure,
		Preallocate: preallocate,
	},
}

// preallocate allocates [off, off+n) of d: its space (falloc) or zeroes
// written into it (full).
func preallocate(d diskserve.DiskFile, off, n int64, mode string) error {
	switch mode {
	case "off":
		return nil
	case "falloc":
		return diskserve.WriteZeroes(d, off, n, 0)
	case "full":
		return diskserve.WriteZeroBytes(d, off, n)
	}
	return fmt.Errorf("preallocation must be off, falloc or full for raw images, not %q", mode)
}

// measure: a raw image is as large as its disk, its source's or size
// bytes rounded up to a sector, allocated or not (as qemu-img measure).
func measure(_ diskserve.CreateOptions, size int64, src diskserve.DiskFile) (diskserve.Measurement, error) {
	n := (size + 511) / 512 * 512
	if src != nil {
		n = src.Size()
	}
	return diskserve.Measurement{Required: n, FullyAllocated: n}, nil
}

// create makes out a file of a.Size bytes: sparse, or with its space
// allocated (preallocation=falloc) or filled with zeroes (full).
func create(out *os.File, a diskserve.CreateArgs) error {
	if err := out.Truncate(a.Size); err != nil {
		return err
	}
	switch p := a.Options.String("preallocation", "off"); p {
	case "off":
	case "falloc":
		if a.Size > 0 {
			if err := unix.Fallocate(int(out.Fd()), 0, 0, a.Size); err != nil {
				return fmt.Errorf("create %s: preallocation=falloc: %w", a.Path, err)
			}
		}
	case "full":
		zero := make([]byte, 1<<20)
		for off := int64(0); off < a.Size; off += int64(len(zero)) {
			if _, err := out.WriteAt(zero[:min(int64(len(zero)), a.Size-off)], off); err != nil {
				return fmt.Errorf("create %s: preallocation=full: %w", a.Path, err)
			}
		}
	default:
		return fmt.Errorf("create %s: preallocation must be off, falloc or full, not %q", a.Path, p)
	}
	return nil
}

// A Disk is an open raw image.
type Disk struct {
	f        *os.File
	fd       int
	path     string
	blockDev bool
	readOnly bool
	size     atomic.Int64
	mapping  *writeMapping // nil for block devices, read-only and direct disks
	ways     *wayChooser   // with mapping: store or pwrite, per region
	dio      *directIO     // with O_DIRECT

	writeBehind atomic.Bool  // see SetWriteBehind
	unstarted   atomic.Int64 // bytes written since writeback was last started
}

// writeBehindStep is how many bytes a disk set to write behind gathers
// before it starts their writeback.
const writeBehindStep = 8 << 20

// SetWriteBehind has d start writing back what it has written every few
// MiB (sync_file_range without waiting), rather than leave it to the
// kernel's background writeback or the next flush. It is for the commands
// that copy much data and flush once at the end (convert, commit,
// rebase): the disk writes while they copy, instead of sitting idle until
// the final flush and then writing everything. A server does without it:
// guests rewrite the same blocks, and writing them back early would
// write them more often. It does nothing under O_DIRECT.
func (d *Disk) SetWriteBehind() {
	if d.dio == nil && !d.readOnly {
		d.writeBehind.Store(true)
	}
}

var (
	_ diskserve.DiskFile     = (*Disk)(nil)
	_ diskserve.Flusher      = (*Disk)(nil)
	_ diskserve.ZeroWriter   = (*Disk)(nil)
	_ diskserve.HolePuncher  = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.Resizer      = (*Disk)(nil)
	_ diskserve.Describer    = (*Disk)(nil)
	_ diskserve.HostMapper   = (*Disk)(nil)
)

// Size returns the size of the file or device.
func (d *Disk) Size() int64 { return d.size.Load() }

// ReadOnly reports whether the disk was opened read-only.
func (d *Disk) ReadOnly() bool { return d.readOnly }

// Path returns the path the disk was opened from.
func (d *Disk) Path() string { return d.path }

// ReadAt reads len(p) bytes at off, or up to the end of the disk and
// [io.EOF].
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(d.size.Load(), off, p)
	if len(p) == 0 {
		return 0, eof
	}
	var (
		n   int
		err error
	)
	if d.dio != nil {
		if n, err = d.dio.readAt(p, off); err != nil && err != io.EOF {
			err = &fs.PathError{Op: "read", Path: d.path, Err: err}
		}
	} else {
		n, err = d.f.ReadAt(p, off)
	}
	if err == nil {
		err = eof
	}
	return n, err
}

// WriteAt writes p at off; the whole of p must fit inside the disk.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := diskserve.CheckWrite(d, off, int64(len(p))); err != nil {
		return 0, fmt.Errorf("write: %w", err)
	}
	if d.dio != nil {
		return d.writeDirect(p, off)
	}
	if d.mapping != nil && int64(len(p)) <= maxStore && off <= storeWindow-int64(len(p)) {
		return d.writeSmall(p, off)
	}
	n, err := d.f.WriteAt(p, off)
	d.wrote(n)
	return n, err
}

// writeSmall writes p, at most maxStore bytes inside the store window, by
// store or by pwrite: the way d.ways picks, timed for it. A store the
// mapping refuses (pages not cached) is a pwrite, and not timed.
func (d *Disk) writeSmall(p []byte, off int64) (int, error) {
	r := d.ways.region(off)
	w := r.pick()
	start := time.Now()
	if w == byStore && d.mapping.write(p, off) {
		r.record(byStore, time.Since(start))
		d.wrote(len(p))
		return len(p), nil
	}
	n, err := d.f.WriteAt(p, off)
	if err == nil && w == byPwrite {
		r.record(byPwrite, time.Since(start))
	}
	d.wrote(n)
	return n, err
}

// wrote counts n bytes written, and under SetWriteBehind starts the
// writeback of the file's dirty pages once enough have gathered. That is
// advice: an error (a file system without it) changes nothing that
// Flush does not catch.
func (d *Disk) wrote(n int) {
	if !d.writeBehind.Load() || d.unstarted.Add(int64(n)) < writeBehindStep {
		return
	}
	d.unstarted.Store(0)
	_ = unix.SyncFileRange(d.fd, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
}

// writeDirect writes p at off with O_DIRECT, except for a partial last
// block (see [directIO]).
func (d *Disk) writeDirect(p []byte, off int64) (int, error) {
	end := off + int64(len(p))
	tail := d.dio.down(d.size.Load())
	if off < tail {
		if err := d.dio.writeAt(p[:min(end, tail)-off], off); err != nil {
			return 0, &fs.PathError{Op: "write", Path: d.path, Err: err}
		}
	}
	if end <= tail {
		return len(p), nil
	}
	from := max(off, tail)
	if n, err := d.dio.writeTail(p[from-off:], from); err != nil {
		return int(from-off) + n, &fs.PathError{Op: "write", Path: d.path, Err: err}
	}
	return len(p), nil
}

// MapHost maps the range onto the file itself. It maps no write that
// WriteAt would store into cached pages, which is cheaper than any pwrite
// an engine could issue.
//
// With O_DIRECT it maps aligned ranges only, and a write mapping keeps
// WriteAt's read-modify-writes off its blocks until it is released.
func (d *Disk) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	if write && d.readOnly || diskserve.CheckRange(d.size.Load(), off, n) != nil || write && d.mapping.storable(off, n) {
		return diskserve.HostRange{}, false
	}
	if d.dio != nil {
		if off%d.dio.align != 0 || n%d.dio.align != 0 {
			return diskserve.HostRange{}, false
		}
		// Not Whole: an engine's own fallocate would not be ordered
		// against read-modify-writes.
		r := diskserve.HostRange{FD: d.fd, Off: off, MemAlign: int(d.dio.memAlign)}
		if write {
			s := d.dio.begin(off, off+n, false)
			r.Release = func() { d.dio.end(s) }
		}
		return r, true
	}
	return diskserve.HostRange{FD: d.fd, Off: off, Whole: true}, true
}

// Close closes the file, releasing its lock.
func (d *Disk) Close() error {
	d.mapping.unmap() // the mapping holds the file, and so the lock, open
	if d.dio != nil {
		d.dio.close()
	}
	return d.f.Close()
}

// LocateHost reports that the file stores the disk as it is, holes too.
func (d *Disk) LocateHost(off, n int64) (diskserve.HostLocation, error) {
	return diskserve.HostLocation{Len: n, File: d.path, Off: off}, nil
}

// Describe reports the format and file name.
func (d *Disk) Describe(info *diskserve.Info) {
	info.Format = Format.Name
	info.Filename = d.path
}
