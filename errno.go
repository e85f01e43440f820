package diskserve

import (
	"errors"
	"io/fs"
	"syscall"
)

// Errno is the one mapping from an error of a disk to the errno that
// exporters report for it (FUSE as it is; NBD through the few errors its
// protocol has), so that a client sees the same error class whichever way
// it attaches:
//
//   - [ErrReadOnly]: EROFS.
//   - [ErrOutOfRange]: ENOSPC, as a device answers a write past its end.
//   - [errors.ErrUnsupported]: EOPNOTSUPP.
//   - an error carrying a [syscall.Errno] (from the host file): that errno.
//   - [fs.ErrPermission] (a write refused by policy, such as one that would
//     give an image probed as raw another format's magic): EPERM.
//   - anything else, corrupt images included: EIO.
//
// Errno(nil) is 0.
func Errno(err error) syscall.Errno {
	var errno syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrReadOnly):
		return syscall.EROFS
	case errors.Is(err, ErrOutOfRange):
		return syscall.ENOSPC
	case errors.Is(err, errors.ErrUnsupported):
		return syscall.EOPNOTSUPP
	case errors.As(err, &errno) && errno != 0:
		return errno
	case errors.Is(err, fs.ErrPermission):
		return syscall.EPERM
	}
	return syscall.EIO
}
