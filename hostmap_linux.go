package diskserve

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ReadCached reads len(buf) bytes of r's file at r.Off if all of them are
// in the page cache, without waiting for the device: preadv2 with
// RWF_NOWAIT, which fails with EAGAIN rather than wait, as a raw system
// call (it cannot block, so the scheduler need not be told). It reports
// whether it read them all, and whether the file cannot be read this way
// at all (EOPNOTSUPP, EINVAL), so that a caller may stop trying. A range
// open with O_DIRECT is never read.
func (r HostRange) ReadCached(buf []byte) (ok, unsupported bool) {
	if len(buf) == 0 || r.Direct() {
		return false, false
	}
	iov := unix.Iovec{Base: &buf[0]}
	iov.SetLen(len(buf))
	got, _, errno := unix.RawSyscall6(unix.SYS_PREADV2, uintptr(r.FD), uintptr(unsafe.Pointer(&iov)), 1,
		uintptr(r.Off), 0, unix.RWF_NOWAIT)
	switch {
	case errno == unix.EOPNOTSUPP, errno == unix.EINVAL:
		return false, true
	case errno != 0:
		return false, false
	}
	return int(got) == len(buf), false
}
