package nbd

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// hostMapped is an in-memory disk that maps reads onto a host file holding
// other bytes than its own, so that a reply's bytes tell whether sendfile
// or ReadAt served it.
type hostMapped struct {
	*disktest.Memory
	f *os.File
}

func (d hostMapped) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	return diskserve.HostRange{FD: int(d.f.Fd()), Off: off}, !write
}

// hostFile writes data to a file and returns it open, its pages cached
// and clean.
func hostFile(t *testing.T, data []byte) *os.File {
	t.Helper()
	path := filepath.Join(t.TempDir(), "host")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestSendfileReads checks which READs go by sendfile: large ones of
// cached pages, through simple and structured replies, with smaller
// replies interleaved in one batch; not small ones, and not pages the page
// cache lacks.
func TestSendfileReads(t *testing.T) {
	mem := pattern(diskSize)
	host := bytes.Clone(mem)
	for i := range host {
		host[i] ^= 0xff
	}
	f := hostFile(t, host)
	e := Export{Disk: hostMapped{disktest.NewMemory(mem, false), f}}
	_, path := start(t, []Export{e}, Options{})
	for _, structured := range []bool{false, true} {
		cl := attach(t, path, structured)
		read := func(cookie uint64, off, n int64) []byte {
			t.Helper()
			if !structured {
				if errno, c := cl.simple(); errno != 0 || c != cookie {
					t.Fatalf("READ: errno %d cookie %d, want cookie %d", errno, c, cookie)
				}
				return cl.read(int(n))
			}
			buf := make([]byte, n)
			if _, errno := cl.structuredRead(cookie, off, buf); errno != 0 {
				t.Fatalf("READ: errno %d", errno)
			}
			return buf
		}
		// Pipelined: one batch may hold both kinds; replies come in any
		// order, so each is matched by its cookie.
		reqs := map[uint64][2]int64{1: {0, 1 << 20}, 2: {4096, 4096}, 3: {512, sendfileMin}, 4: {8192, sendfileMin - 1}}
		for c, r := range reqs {
			cl.request(cmdRead, 0, c, uint64(r[0]), uint32(r[1]), nil)
		}
		for range reqs {
			var cookie uint64
			var got []byte
			if structured {
				c := cl.chunk()
				cookie = c.cookie
				got = c.payload[8:]
			} else {
				var errno uint32
				errno, cookie = cl.simple()
				if errno != 0 {
					t.Fatalf("READ %d: errno %d", cookie, errno)
				}
				got = cl.read(int(reqs[cookie][1]))
			}
			off, n := reqs[cookie][0], reqs[cookie][1]
			want, by := mem, "ReadAt"
			if n >= sendfileMin {
				want, by = host, "sendfile"
			}
			if !bytes.Equal(got, want[off:off+n]) {
				t.Fatalf("structured=%v: READ of %d at %d was not served by %s", structured, n, off, by)
			}
		}

		// Pages not cached are read by a worker with ReadAt.
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		if pageCached(int(f.Fd()), 0, 1<<20) {
			t.Fatal("FADV_DONTNEED left the host file cached")
		}
		cl.request(cmdRead, 0, 5, 0, 1<<20, nil)
		if !bytes.Equal(read(5, 0, 1<<20), mem[:1<<20]) {
			t.Fatalf("structured=%v: a READ of pages not cached was not served by ReadAt", structured)
		}
		f.ReadAt(make([]byte, 1<<20), 0) // cached again
		cl.request(cmdRead, 0, 6, 0, 1<<20, nil)
		if !bytes.Equal(read(6, 0, 1<<20), host[:1<<20]) {
			t.Fatalf("structured=%v: a READ of cached pages was not served by sendfile", structured)
		}
	}
}

// TestSendfileShortFile sends a span that runs past the end of its file,
// as when the file shrinks under a READ: the send fails instead of
// leaving the client waiting for the rest.
func TestSendfileShortFile(t *testing.T) {
	f := hostFile(t, pattern(1<<20))
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.FileConn(os.NewFile(uintptr(fds[0]), "server"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer := os.NewFile(uintptr(fds[1]), "client")
	defer peer.Close()
	tr := newTransmission(&Server{}, &Export{Disk: disktest.NewMemory(nil, false)}, c, nil, false, false)
	err = tr.sendFile(hostSpan{fd: int(f.Fd()), off: 1<<20 - 100, n: 1000})
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("sendfile past the end of the file: %v, want io.ErrUnexpectedEOF", err)
	}
	got := make([]byte, 100)
	if _, err := io.ReadFull(peer, got); err != nil || !bytes.Equal(got, pattern(1 << 20)[1<<20-100:]) {
		t.Fatalf("the bytes before the end: %v", err)
	}
}

// TestSendfileAllocs pins the sendfile path: a large READ of cached pages
// allocates nothing once the pools are warm.
func TestSendfileAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	f := hostFile(t, pattern(diskSize))
	_, path := start(t, []Export{{Disk: hostMapped{disktest.NewMemory(make([]byte, diskSize), false), f}}}, Options{})
	cl := attach(t, path, false)
	req := requestHeader(cmdRead, 0, 1, 0, 1<<20)
	reply := make([]byte, 16+1<<20)
	roundTrip := func() {
		cl.c.Write(req)
		io.ReadFull(cl.c, reply)
	}
	for range 20 {
		roundTrip()
	}
	if !bytes.Equal(reply[16:], pattern(diskSize)[:1<<20]) {
		t.Fatal("the READ was not served by sendfile")
	}
	if n := testing.AllocsPerRun(100, roundTrip); n > 0.1 {
		t.Errorf("%.2f allocations per 1 MiB READ by sendfile", n)
	}
}
