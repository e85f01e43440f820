package nbd

import (
	"io"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// iovMax is the most pieces one writev(2) takes (IOV_MAX).
const iovMax = 1024

// A socket reads and writes a connection's socket with raw system calls:
// read(2) and writev(2) on the non-blocking socket, waiting in the
// poller when it has nothing to read or no room, as net.Conn does, but
// without telling the scheduler of each call. Neither call can block, so
// the goroutine's processor need not be handed to another thread while it
// runs (a 1 MiB copy holds it for some tens of microseconds). Told of each
// call, the scheduler woke Go's system monitor after every idle spell, and
// the monitor then polled in a tight loop, a large share of the server's
// CPU (docs/performance.md, "Where the CPU goes").
// Deadlines set on the connection hold, since the poller's waits honour
// them.
//
// The reader uses Read; the sender, one at a time, writev and sendfile.
type socket struct {
	raw syscall.RawConn

	// The reader's: the buffer of the call under way and its result.
	p     []byte
	n     int
	err   error
	readF func(fd uintptr) bool // s.readOnce, bound once

	// The sender's: the pieces left to write, or the span of a host file
	// left to send, and how sending failed.
	iov    []unix.Iovec
	next   int
	span   hostSpan
	werr   error
	writeF func(fd uintptr) bool // s.writeSome, bound once
	sendF  func(fd uintptr) bool // s.sendSome, bound once
}

func newSocket(raw syscall.RawConn) *socket {
	s := &socket{raw: raw}
	s.readF, s.writeF, s.sendF = s.readOnce, s.writeSome, s.sendSome
	return s
}

// Read reads what the socket holds into p, at most len(p) bytes, waiting
// for some if it holds none.
func (s *socket) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.p = p
	err := s.raw.Read(s.readF)
	s.p = nil
	if err != nil {
		return 0, err
	}
	return s.n, s.err
}

func (s *socket) readOnce(fd uintptr) bool {
	for {
		n, _, errno := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&s.p[0])), uintptr(len(s.p)))
		switch {
		case errno == unix.EINTR:
			continue
		case errno == unix.EAGAIN:
			return false
		case errno != 0:
			s.n, s.err = 0, os.NewSyscallError("read", errno)
		case n == 0:
			s.n, s.err = 0, io.EOF
		default:
			s.n, s.err = int(n), nil
		}
		return true
	}
}

// writev writes all of bufs.
func (s *socket) writev(bufs [][]byte) error {
	for _, b := range bufs {
		if len(b) > 0 {
			v := unix.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			s.iov = append(s.iov, v)
		}
	}
	s.next, s.werr = 0, nil
	err := s.raw.Write(s.writeF)
	clear(s.iov) // let the buffers go
	s.iov = s.iov[:0]
	if err != nil {
		return err
	}
	return s.werr
}

// writeSome writes what the socket takes of the pieces left; it reports
// false when the socket is full, so that the poller waits and calls again.
func (s *socket) writeSome(fd uintptr) bool {
	for s.next < len(s.iov) {
		left := s.iov[s.next:]
		n, _, errno := unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&left[0])), uintptr(min(len(left), iovMax)))
		switch errno {
		case 0:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		default:
			s.werr = os.NewSyscallError("writev", errno)
			return true
		}
		for w := uint64(n); w > 0; {
			v := &s.iov[s.next]
			if w < v.Len {
				v.Base = (*byte)(unsafe.Add(unsafe.Pointer(v.Base), w))
				v.Len -= w
				break
			}
			w -= v.Len
			s.next++
		}
	}
	return true
}
