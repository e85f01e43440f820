package nbd

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// hostMapped is an in-memory disk that maps reads onto a host file holding
// other bytes than its own, so that a reply's bytes tell whether the page
// cache (sendfile, or preadv2 on the reader) or ReadAt served it.
type hostMapped struct {
	*disktest.Memory
	f *os.File
}

func (d hostMapped) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	return diskserve.HostRange{FD: int(d.f.Fd()), Off: off}, !write
}

// hostFile writes data to a file and returns it open, its pages cached
// and clean.
func hostFile(t testing.TB, data []byte) *os.File {
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

// TestPageCacheReads checks which READs are served from the host file's
// page cache: large ones by sendfile and small ones on the reader, through
// simple and structured replies, pipelined in one batch; none of pages the
// page cache lacks, which a worker reads with ReadAt.
func TestPageCacheReads(t *testing.T) {
	mem := pattern(diskSize)
	host := bytes.Clone(mem)
	for i := range host {
		host[i] ^= 0xff
	}
	f := hostFile(t, host)
	e := Export{Disk: hostMapped{disktest.NewMemory(mem, false), f}}
	_, path := start(t, []Export{e}, Options{})
	for _, structured := range []bool{false, true} {
		f.ReadAt(make([]byte, diskSize), 0) // all cached
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
			if !bytes.Equal(got, host[off:off+n]) {
				t.Fatalf("structured=%v: READ of %d at %d was not served from the page cache", structured, n, off)
			}
		}

		// Pages not cached are read by a worker with ReadAt. Only the
		// sendfile path is checked here: cachestat decides it without
		// touching the file. The reader's preadv2 with RWF_NOWAIT starts
		// readahead of the pages it lacks and may find them read in
		// before it returns, on a fast enough device; its fallback is
		// checked by TestPageCacheShortHostFile.
		const n = 1 << 20
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		if pageCached(int(f.Fd()), 0, n) {
			t.Fatal("FADV_DONTNEED left the host file cached")
		}
		cl.request(cmdRead, 0, 5, 0, n, nil)
		if !bytes.Equal(read(5, 0, n), mem[:n]) {
			t.Fatalf("structured=%v: a READ of %d bytes not cached was not served by ReadAt", structured, n)
		}
		f.ReadAt(make([]byte, n), 0) // cached again
		cl.request(cmdRead, 0, 6, 0, n, nil)
		if !bytes.Equal(read(6, 0, n), host[:n]) {
			t.Fatalf("structured=%v: a READ of %d cached bytes was not served from the page cache", structured, n)
		}
	}
}

// TestPageCacheShortHostFile maps a disk onto a host file holding only its
// first page: a READ of that page is served from the page cache, and READs
// the file cannot fill, small (the reader's preadv2 comes back short) or
// large (cachestat counts no pages), go to a worker and ReadAt.
func TestPageCacheShortHostFile(t *testing.T) {
	mem := pattern(diskSize)
	host := bytes.Clone(mem[:4096])
	for i := range host {
		host[i] ^= 0xff
	}
	f := hostFile(t, host)
	f.ReadAt(make([]byte, len(host)), 0)
	_, path := start(t, []Export{{Disk: hostMapped{disktest.NewMemory(mem, false), f}}}, Options{})
	cl := attach(t, path, false)
	for i, r := range []struct {
		off, n int64
		want   []byte
	}{
		{0, 4096, host},
		{4096, 4096, mem[4096:8192]},
		{2048, 4096, mem[2048:6144]},
		{0, 1 << 20, mem[:1<<20]},
	} {
		cookie := uint64(i + 1)
		cl.request(cmdRead, 0, cookie, uint64(r.off), uint32(r.n), nil)
		if errno, c := cl.simple(); errno != 0 || c != cookie {
			t.Fatalf("READ: errno %d cookie %d, want cookie %d", errno, c, cookie)
		}
		if !bytes.Equal(cl.read(int(r.n)), r.want) {
			t.Errorf("READ of %d at %d: wrong source", r.n, r.off)
		}
	}
}

// TestCachedReplyNotHeld sends a small READ that the reader serves from the
// page cache, then the header of a WRITE whose payload comes later: the
// READ's reply must not wait for the payload.
func TestCachedReplyNotHeld(t *testing.T) {
	f := hostFile(t, pattern(diskSize))
	_, path := start(t, []Export{{Disk: hostMapped{disktest.NewMemory(make([]byte, diskSize), false), f}}}, Options{})
	cl := attach(t, path, false)
	req := append(requestHeader(cmdRead, 0, 1, 4096, 4096), requestHeader(cmdWrite, 0, 2, 0, 4096)...)
	if _, err := cl.c.Write(req); err != nil {
		t.Fatal(err)
	}
	cl.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if errno, cookie := cl.simple(); errno != 0 || cookie != 1 {
		t.Fatalf("first reply: errno %d cookie %d, want the READ's", errno, cookie)
	}
	if !bytes.Equal(cl.read(4096), pattern(diskSize)[4096:8192]) {
		t.Fatal("the READ was not served from the page cache")
	}
	if _, err := cl.c.Write(make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	if errno, cookie := cl.simple(); errno != 0 || cookie != 2 {
		t.Fatalf("second reply: errno %d cookie %d, want the WRITE's", errno, cookie)
	}
}

// TestSendfileShortFile sends a span that runs past the end of its file,
// as when the file shrinks under a READ: the send fails instead of
// leaving the client waiting for the rest.
func TestSendfileShortFile(t *testing.T) {
	f := hostFile(t, pattern(1<<20))
	s, _, peer := socketPair(t)
	err := s.sendfile(hostSpan{fd: int(f.Fd()), off: 1<<20 - 100, n: 1000})
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("sendfile past the end of the file: %v, want io.ErrUnexpectedEOF", err)
	}
	got := make([]byte, 100)
	if _, err := io.ReadFull(peer, got); err != nil || !bytes.Equal(got, pattern(1 << 20)[1<<20-100:]) {
		t.Fatalf("the bytes before the end: %v", err)
	}
}

// TestPageCacheAllocs pins the page-cache paths: READs of cached pages, a
// large one by sendfile and a small one on the reader, allocate nothing
// once the pools are warm.
func TestPageCacheAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	f := hostFile(t, pattern(diskSize))
	_, path := start(t, []Export{{Disk: hostMapped{disktest.NewMemory(make([]byte, diskSize), false), f}}}, Options{})
	cl := attach(t, path, false)
	for _, n := range []int{1 << 20, 4096} {
		req := requestHeader(cmdRead, 0, 1, 0, uint32(n))
		reply := make([]byte, 16+n)
		roundTrip := func() {
			cl.c.Write(req)
			io.ReadFull(cl.c, reply)
		}
		for range 20 {
			roundTrip()
		}
		if !bytes.Equal(reply[16:], pattern(diskSize)[:n]) {
			t.Fatalf("the READ of %d bytes was not served from the page cache", n)
		}
		if allocs := testing.AllocsPerRun(100, roundTrip); allocs > 0.1 {
			t.Errorf("%.2f allocations per READ of %d bytes from the page cache", allocs, n)
		}
	}
}
