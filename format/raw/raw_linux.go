package raw

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve"
)

// OpenFile opens the regular file or block device at path as a raw disk
// (a *[Disk]) and takes its lock. It refuses directories, pipes and other
// special files before opening them, so that a FIFO cannot block the open.
// Its signature is that of [diskserve.Options.OpenFile].
func OpenFile(path string, readOnly bool) (diskserve.DiskFile, error) {
	return openFile(path, readOnly, false)
}

// OpenFileDirect is [OpenFile] with O_DIRECT: the disk's reads and writes
// bypass the host's page cache. It fails on a file system that does not
// support direct I/O.
func OpenFileDirect(path string, readOnly bool) (diskserve.DiskFile, error) {
	return openFile(path, readOnly, true)
}

func openFile(path string, readOnly, direct bool) (diskserve.DiskFile, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: errors.Unwrap(err)}
	}
	if err := checkMode(st.Mode()); err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	if direct {
		flag |= unix.O_DIRECT
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		if direct && errors.Is(err, unix.EINVAL) {
			err = &fs.PathError{Op: "open", Path: path, Err: errNoDirect}
		}
		return nil, err
	}
	d, err := newDisk(f, path, readOnly)
	if err != nil {
		f.Close()
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return d, nil
}

// FromFile returns the open file f as a raw disk (a *[Disk]) called path
// in errors, and takes its lock; a file opened with O_DIRECT gets the
// direct path, as from [OpenFileDirect]. The disk owns f: its Close closes
// it.
func FromFile(f *os.File, path string, readOnly bool) (diskserve.DiskFile, error) {
	d, err := newDisk(f, path, readOnly)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return d, nil
}

func checkMode(m fs.FileMode) error {
	switch {
	case m.IsRegular(), m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0:
		return nil
	case m.IsDir():
		return errors.New("is a directory, not a disk image")
	default:
		return fmt.Errorf("is a %v file, not a regular file or block device", m.Type())
	}
}

// errLocked is the cause given when another process holds the image's lock.
var errLocked = errors.New("image is in use by another process (it holds the flock lock)")

// lockWait is how long an open waits for a conflicting lock to go before
// it calls the image in use. A lock belongs to the open file, and a child
// that this process forks shares every open file until it executes its
// program (Go marks descriptors close-on-exec, but fork copies them
// first): an image closed while another goroutine starts a command stays
// locked for that moment after its Close.
const lockWait = time.Second

// lock takes the flock how on fd, waiting up to lockWait for a
// conflicting one to be released.
func lock(fd, how int) error {
	deadline := time.Now().Add(lockWait)
	for pause := time.Millisecond; ; pause = min(2*pause, 50*time.Millisecond) {
		err := unix.Flock(fd, how|unix.LOCK_NB)
		if !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(pause)
	}
}

func newDisk(f *os.File, path string, readOnly bool) (*Disk, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if err := checkMode(st.Mode()); err != nil { // replaced since the Stat
		return nil, err
	}
	d := &Disk{f: f, fd: int(f.Fd()), path: path, readOnly: readOnly, blockDev: !st.Mode().IsRegular()}
	how := unix.LOCK_EX
	if readOnly {
		how = unix.LOCK_SH
	}
	if err := lock(d.fd, how); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errLocked
		}
		return nil, fmt.Errorf("lock: %w", err)
	}
	size := st.Size()
	if d.blockDev {
		if size, err = f.Seek(0, io.SeekEnd); err != nil {
			return nil, fmt.Errorf("size of block device: %w", err)
		}
	}
	d.size.Store(size)
	switch {
	case isDirect(d.fd): // a shared mapping would not be coherent with its writes
		if d.dio, err = openDirect(f, d.blockDev); err != nil {
			return nil, err
		}
	case !readOnly && !d.blockDev:
		if d.mapping = mapForWrites(d.fd); d.mapping != nil {
			d.ways = new(wayChooser)
		}
	}
	return d, nil
}

// isDirect reports whether fd was opened with O_DIRECT.
func isDirect(fd int) bool {
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	return err == nil && fl&unix.O_DIRECT != 0
}

// Flush calls fdatasync.
func (d *Disk) Flush() error {
	if err := unix.Fdatasync(d.fd); err != nil {
		return &fs.PathError{Op: "fdatasync", Path: d.path, Err: err}
	}
	return nil
}

// WriteZeroesAt zeroes [off, off+n) with fallocate. With
// [diskserve.ZeroMayUnmap] it punches a hole; otherwise it uses
// FALLOC_FL_ZERO_RANGE, which keeps the range allocated, or, where the file
// system lacks that (tmpfs), punches a hole and allocates it again.
func (d *Disk) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	if err := diskserve.CheckWrite(d, off, n); err != nil {
		return fmt.Errorf("write zeroes: %w", err)
	}
	if flags&diskserve.ZeroMayUnmap != 0 {
		return d.fallocate("write zeroes", unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
	err := d.fallocate("write zeroes", unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if !errors.Is(err, diskserve.ErrUnsupported) || d.blockDev {
		return err
	}
	if err := d.fallocate("write zeroes", unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		return err
	}
	// The range reads as zeroes now; allocating it again is a preference,
	// so a file system that cannot is not an error.
	_ = unix.Fallocate(d.fd, unix.FALLOC_FL_KEEP_SIZE, off, n)
	return nil
}

// PunchHole deallocates [off, off+n) with
// fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE).
func (d *Disk) PunchHole(off, n int64) error {
	if err := diskserve.CheckWrite(d, off, n); err != nil {
		return fmt.Errorf("punch hole: %w", err)
	}
	return d.fallocate("punch hole", unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// fallocate calls fallocate(2) and reports a mode that the file system or
// device does not support as [diskserve.ErrUnsupported]. Block devices also
// refuse ranges not aligned to their logical block size with EINVAL; the
// range was checked before, so EINVAL means the same there.
func (d *Disk) fallocate(op string, mode uint32, off, n int64) error {
	var err error
	if d.dio != nil {
		err = d.dio.exclusive(off, n, func() error { return unix.Fallocate(d.fd, mode, off, n) })
	} else {
		err = unix.Fallocate(d.fd, mode, off, n)
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EOPNOTSUPP), d.blockDev && errors.Is(err, unix.EINVAL):
		return fmt.Errorf("%s on %s: %w (%v)", op, d.path, diskserve.ErrUnsupported, err)
	default:
		return &fs.PathError{Op: op, Path: d.path, Err: err}
	}
}

// AppendExtents reports data and holes from lseek(SEEK_DATA/SEEK_HOLE).
// Holes read as zeroes. Where the file system cannot tell, and on block
// devices, everything is data.
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	end := off + n
	if d.blockDev {
		return append(dst, diskserve.Extent{Off: off, Len: n}), nil
	}
	for pos := off; pos < end; {
		data, err := unix.Seek(d.fd, pos, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO): // only holes from pos to the end of the file
			data = end
		case err != nil:
			return append(dst, diskserve.Extent{Off: pos, Len: end - pos}), nil
		}
		if data > pos {
			next := min(data, end)
			dst = append(dst, diskserve.Extent{Off: pos, Len: next - pos, Flags: diskserve.ExtentHole | diskserve.ExtentZero})
			pos = next
			continue
		}
		hole, err := unix.Seek(d.fd, pos, unix.SEEK_HOLE)
		if err != nil || hole <= pos {
			hole = end
		}
		next := min(hole, end)
		dst = append(dst, diskserve.Extent{Off: pos, Len: next - pos})
		pos = next
	}
	return dst, nil
}

// Resize sets the size of a regular file with ftruncate. Block devices
// cannot be resized.
func (d *Disk) Resize(size int64) error {
	if d.readOnly {
		return fmt.Errorf("resize: %w", diskserve.ErrReadOnly)
	}
	if d.blockDev {
		return fmt.Errorf("resize block device %s: %w", d.path, diskserve.ErrUnsupported)
	}
	if err := d.f.Truncate(size); err != nil {
		return err
	}
	d.size.Store(size)
	return nil
}
