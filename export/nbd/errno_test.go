package nbd

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve"
)

// TestErrnoClasses maps each class of disk error to the NBD error of each
// command, by way of diskserve.Errno, as the README promises: a write
// refused by policy (a probed raw image) is EPERM, as on a read-only
// export.
func TestErrnoClasses(t *testing.T) {
	write, read, fastZero := &request{typ: cmdWrite}, &request{typ: cmdRead}, &request{typ: cmdWriteZeroes, flags: cmdFlagFastZero}
	for _, tc := range []struct {
		err  error
		r    *request
		want uint32
	}{
		{diskserve.ErrReadOnly, write, errPerm},
		{fmt.Errorf("probed raw: %w", fs.ErrPermission), write, errPerm},
		{&fs.PathError{Op: "write", Path: "x", Err: syscall.EACCES}, write, errPerm},
		{diskserve.ErrOutOfRange, write, errNoSpc},
		{diskserve.ErrOutOfRange, read, errInval},
		{&fs.PathError{Op: "write", Path: "x", Err: syscall.ENOSPC}, write, errNoSpc},
		{errors.ErrUnsupported, fastZero, errNotSup},
		{errors.ErrUnsupported, write, errInval},
		{syscall.ENOMEM, read, errNoMem},
		{diskserve.Corrupt("qcow2", 0, "bad"), read, errIO},
		{syscall.EIO, read, errIO},
	} {
		if got := errnoOf(tc.err, tc.r); got != tc.want {
			t.Errorf("errnoOf(%v, command %d) = %d, want %d", tc.err, tc.r.typ, got, tc.want)
		}
	}
}
