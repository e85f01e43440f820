package nbd

import (
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// sendfileMin is the smallest READ whose data goes with sendfile(2). A
// smaller one is cheaper copied: its reply then joins the other replies of
// the connection in one writev, where a sendfile is a system call of its
// own. The threshold is where sendfile began to win in random reads of a
// cached raw image (docs/performance.md, "Thresholds").
const sendfileMin = 32 << 10

var pageSize = int64(os.Getpagesize())

// pageCached reports whether every page of [off, off+n) of the file fd is
// in the page cache, with cachestat(2) (Linux 6.5); false where it cannot
// tell.
func pageCached(fd int, off, n int64) bool {
	var st unix.Cachestat_t
	if unix.Cachestat(uint(fd), &unix.CachestatRange{Off: uint64(off), Len: uint64(n)}, &st, 0) != nil {
		return false
	}
	return st.Cache >= uint64((off+n+pageSize-1)/pageSize-off/pageSize)
}

// sendfile sends span on the socket.
func (s *socket) sendfile(span hostSpan) error {
	s.span, s.werr = span, nil
	if err := s.raw.Write(s.sendF); err != nil {
		return err
	}
	return s.werr
}

// sendSome sends what it can of s.span on the socket fd; it reports false
// when the socket is full, so that the poller waits and calls again.
func (s *socket) sendSome(fd uintptr) bool {
	for s.span.n > 0 {
		w, err := unix.Sendfile(int(fd), s.span.fd, &s.span.off, int(min(s.span.n, maxPayload)))
		s.span.n -= int64(max(w, 0))
		switch {
		case err == unix.EAGAIN:
			return false
		case err == unix.EINTR:
		case err != nil:
			s.werr = os.NewSyscallError("sendfile", err)
			return true
		case w == 0: // the file is shorter than the span now
			s.werr = io.ErrUnexpectedEOF
			return true
		}
	}
	return true
}
