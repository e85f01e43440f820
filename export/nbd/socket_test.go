package nbd

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// socketPair returns a socket over one end of a connected pair of Unix
// sockets, its net.Conn, and the other end.
func socketPair(t *testing.T) (*socket, net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socket")
		defer f.Close()
		c, err := net.FileConn(f) // a duplicate of f
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	c, peer := conn(fds[0]), conn(fds[1])
	raw, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return newSocket(raw), c, peer
}

// TestSocketWritevPartial writes more pieces than one writev takes, and
// more bytes than the socket buffer holds, to a slow reader: every byte
// arrives, in order.
func TestSocketWritevPartial(t *testing.T) {
	s, c, peer := socketPair(t)
	c.(*net.UnixConn).SetWriteBuffer(16 << 10)
	data := pattern(3<<20 + 1234)
	var bufs [][]byte
	for off, n := 0, 1; off < len(data); off, n = off+n, n%2047+1 {
		bufs = append(bufs, data[off:min(off+n, len(data))], nil) // and empty pieces
	}
	if len(bufs) <= 2*iovMax {
		t.Fatalf("%d pieces: the test needs more than one writev's worth", len(bufs))
	}
	got := make(chan []byte)
	go func() {
		var b bytes.Buffer
		chunk := make([]byte, 3000)
		for b.Len() < len(data) {
			n, err := peer.Read(chunk)
			if err != nil {
				break
			}
			b.Write(chunk[:n])
		}
		got <- b.Bytes()
	}()
	if err := s.writev(bufs); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(<-got, data) {
		t.Fatal("the peer read other bytes than were written")
	}
	if len(s.iov) != 0 {
		t.Fatal("writev kept its pieces")
	}
}

// TestSocketErrors checks the ends of a socket's life: EOF when the peer
// closes, a read deadline ending a wait, EPIPE writing to a closed peer.
func TestSocketErrors(t *testing.T) {
	s, c, peer := socketPair(t)
	peer.Write([]byte("abc"))
	buf := make([]byte, 10)
	if n, err := s.Read(buf); n != 3 || err != nil || string(buf[:3]) != "abc" {
		t.Fatalf("Read: %d, %v", n, err)
	}
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := s.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past its deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	c.SetReadDeadline(time.Time{})
	peer.Close()
	if _, err := s.Read(buf); err != io.EOF {
		t.Fatalf("Read after the peer closed: %v, want io.EOF", err)
	}
	if err := s.writev([][]byte{[]byte("x")}); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("writev to a closed peer: %v, want EPIPE", err)
	}
	c.Close()
	if _, err := s.Read(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read of a closed socket: %v, want net.ErrClosed", err)
	}
}
