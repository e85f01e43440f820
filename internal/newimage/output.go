package newimage

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
	"golang.org/x/sys/unix"
)

// An output is the set of files of a new image, written where nobody sees
// them until commit puts them in place: unnamed files (O_TMPFILE) where
// the file system has them (ext4, xfs, btrfs, tmpfs), so that a process
// killed at any moment leaves nothing behind (but for the instant of
// replacing an existing file, see commit); elsewhere files under
// temporary names, which the next run against the same destination
// removes (see removeStale).
type output struct {
	dir    string
	files  []*outFile // the image's own file first
	direct bool       // files opened as disks are opened with O_DIRECT
}

// An outFile is one file of an output.
type outFile struct {
	f    *os.File
	name string // its final name, in the output's directory
	tmp  string // its temporary path; "" for an unnamed file
}

// tempMark marks the temporary names of outputs: .NAME.diskserve-PID-N.
const tempMark = ".diskserve-"

// newOutput starts the output of an image that will be named dst, after
// removing what earlier runs killed before they finished left there. It
// refuses a dst that exists and is not a regular file: a device, a pipe
// or a directory is never replaced by a new file.
func newOutput(dst string) (*output, error) {
	if st, err := os.Stat(dst); err == nil && !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file (%v): a new image is written as a file in its place, and that would replace it", dst, st.Mode().Type())
	}
	o := &output{dir: filepath.Dir(dst)}
	removeStale(o.dir, filepath.Base(dst))
	return o, nil
}

// create makes a new empty file of the output, to be named name (a base
// name, in the output's directory) on commit.
func (o *output) create(name string) (*os.File, error) {
	if strings.ContainsRune(name, filepath.Separator) {
		return nil, fmt.Errorf("%q: a file beside an image is named without a directory", name)
	}
	of := &outFile{name: name}
	f, err := os.OpenFile(o.dir, os.O_RDWR|unix.O_TMPFILE, 0o644)
	if err != nil {
		// No unnamed files here: a temporary name that a later run
		// can recognise and remove.
		of.tmp = tempName(o.dir, name, len(o.files))
		if f, err = os.OpenFile(of.tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644); err != nil {
			return nil, err
		}
	}
	of.f = f
	o.files = append(o.files, of)
	return f, nil
}

// tempName returns the temporary path of the k-th file of an output of
// this process, named name in dir.
func tempName(dir, name string, k int) string {
	return filepath.Join(dir, "."+name+tempMark+strconv.Itoa(os.Getpid())+"-"+strconv.Itoa(k))
}

// commit makes every file durable (unless sync is false), gives each its
// name (replacing what was there), the image's own file last, and makes
// the names durable.
func (o *output) commit(sync bool) error {
	for _, of := range o.files {
		if !sync {
			break
		}
		if err := of.f.Sync(); err != nil {
			return err
		}
	}
	for i := len(o.files) - 1; i >= 0; i-- {
		of := o.files[i]
		dst := filepath.Join(o.dir, of.name)
		if of.tmp == "" {
			// An unnamed file is linked straight to a free name, which
			// leaves nothing to clean up at any moment. linkat cannot
			// replace a name: over an existing file, it is linked to a
			// temporary name and renamed over dst, and a kill between
			// the two leaves that name for the next run to remove.
			proc := "/proc/self/fd/" + strconv.Itoa(int(of.f.Fd()))
			err := unix.Linkat(unix.AT_FDCWD, proc, unix.AT_FDCWD, dst, unix.AT_SYMLINK_FOLLOW)
			if err == nil {
				continue
			}
			if !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("link %s: %w", dst, err)
			}
			of.tmp = tempName(o.dir, of.name, i)
			if err := unix.Linkat(unix.AT_FDCWD, proc, unix.AT_FDCWD, of.tmp, unix.AT_SYMLINK_FOLLOW); err != nil {
				of.tmp = ""
				return fmt.Errorf("link %s: %w", dst, err)
			}
		}
		if err := os.Rename(of.tmp, dst); err != nil {
			return err
		}
		of.tmp = ""
	}
	if !sync {
		return nil
	}
	return SyncDir(o.dir)
}

// close closes every file and removes those that commit did not name.
func (o *output) close() error {
	var errs []error
	for _, of := range o.files {
		errs = append(errs, of.f.Close())
		if of.tmp != "" {
			os.Remove(of.tmp)
		}
	}
	return errors.Join(errs...)
}

// removeStale removes the temporary files and directories that runs of
// diskserve left in dir for an output named name (.NAME.diskserve-PID and
// .NAME.diskserve-PID-N, and those of the files beside it, .NAME.X...)
// when they were killed before they finished: those whose process is gone.
func removeStale(dir, name string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		n := e.Name()
		i := strings.LastIndex(n, tempMark)
		if i < 0 || !strings.HasPrefix(n, "."+name) {
			continue
		}
		pidText, _, _ := strings.Cut(n[i+len(tempMark):], "-")
		pid, err := strconv.Atoi(pidText)
		if err != nil || pid <= 0 || pid == os.Getpid() || alive(pid) {
			continue
		}
		os.RemoveAll(filepath.Join(dir, n))
	}
}

// alive reports whether a process pid exists.
func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// openFile returns an opener of image files that opens the files of the
// output by their final names, and passes every other path to next.
// container returns a function that opens the output's file that will be
// named path as a read-write container.
func (o *output) container(path string) func() (diskserve.DiskFile, error) {
	return func() (diskserve.DiskFile, error) {
		return o.openFile(func(p string, _ bool) (diskserve.DiskFile, error) {
			return nil, fmt.Errorf("%s is not a file of the new image", p)
		})(path, false)
	}
}

func (o *output) openFile(next func(string, bool) (diskserve.DiskFile, error)) func(string, bool) (diskserve.DiskFile, error) {
	return func(path string, readOnly bool) (diskserve.DiskFile, error) {
		for _, of := range o.files {
			if filepath.Join(o.dir, of.name) != filepath.Clean(path) {
				continue
			}
			if o.direct {
				return o.openDirect(of, path, readOnly)
			}
			fd, err := unix.Dup(int(of.f.Fd()))
			if err != nil {
				return nil, err
			}
			return raw.FromFile(os.NewFile(uintptr(fd), path), path, readOnly)
		}
		return next(path, readOnly)
	}
}

// openDirect opens the output's file of with O_DIRECT, as a disk called
// path: opened anew through /proc, since the flag must not reach the file
// the format created it with (its unaligned writes would fail).
func (o *output) openDirect(of *outFile, path string, readOnly bool) (diskserve.DiskFile, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile("/proc/self/fd/"+strconv.Itoa(int(of.f.Fd())), flag|unix.O_DIRECT, 0)
	if err != nil {
		if errors.Is(err, unix.EINVAL) {
			err = errors.New("the file system does not support O_DIRECT (cache modes none and directsync)")
		}
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return raw.FromFile(f, path, readOnly)
}

// TempDir makes a directory beside dst, named so that the next run against
// dst removes it if this process dies before renaming it into place (as
// removeStale does for files). Bundles are written in one.
func TempDir(dst string) (string, error) {
	removeStale(filepath.Dir(dst), filepath.Base(dst))
	tmp := filepath.Join(filepath.Dir(dst), "."+filepath.Base(dst)+tempMark+strconv.Itoa(os.Getpid()))
	return tmp, os.Mkdir(tmp, 0o755)
}
