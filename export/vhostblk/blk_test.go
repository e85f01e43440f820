package vhostblk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/export/vhostblk"
	"github.com/diskserve/diskserve/export/vhostuser"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/vhostfront"
)

// backend serves disk as vhost-user-blk on a socket in a temporary
// directory and returns the socket's path.
func backend(t *testing.T, disk diskserve.DiskFile, opts vhostblk.Options) string {
	t.Helper()
	e, err := async.New(disk, async.Options{Mode: async.Pool})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := vhostblk.New(disk, e, opts)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "vhost.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	srv := vhostuser.NewServer(dev, nil)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		l.Close()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		e.Close()
	})
	return path
}

// lockedDisk is a memory disk whose bytes the test reads under the lock
// its writes take: completions reach the test through guest memory, which
// the race detector cannot see as synchronisation.
type lockedDisk struct {
	diskserve.Passthrough
	mu  sync.Mutex
	img []byte
}

func newLockedDisk(img []byte) *lockedDisk {
	return &lockedDisk{Passthrough: diskserve.Passthrough{D: disktest.NewMemory(img, false)}, img: img}
}

func (d *lockedDisk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.D.ReadAt(p, off)
}

func (d *lockedDisk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.D.WriteAt(p, off)
}

func (d *lockedDisk) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return diskserve.WriteZeroes(d.D, off, n, flags)
}

func (d *lockedDisk) PunchHole(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return diskserve.PunchHole(d.D, off, n)
}

// bytes returns a copy of n bytes of the disk at off.
func (d *lockedDisk) bytes(off, n int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return bytes.Clone(d.img[off : off+n])
}

// client is a front-end with one started queue, and helpers to send
// virtio-blk requests through it.
type client struct {
	*vhostfront.Frontend
	q   *vhostfront.Queue
	t   *testing.T
	buf uint64 // guest address of a scratch area for requests
}

func connect(t *testing.T, path string, eventIdx bool) *client {
	t.Helper()
	f, err := vhostfront.Dial(path, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	_, qs, err := f.Setup(1, 64, eventIdx, true)
	if err != nil {
		t.Fatal(err)
	}
	return &client{Frontend: f, q: qs[0], t: t, buf: f.Alloc(4<<20, 4096)}
}

const (
	typeIn, typeOut, typeFlush, typeGetID, typeDiscard, typeWriteZeroes = 0, 1, 4, 8, 11, 13
	statusOK, statusIOErr, statusUnsupp                                 = 0, 1, 2
)

// header writes a request header at a.
func (c *client) header(a uint64, typ uint32, sector uint64) {
	binary.LittleEndian.PutUint32(c.Mem[a:], typ)
	binary.LittleEndian.PutUint32(c.Mem[a+4:], 0)
	binary.LittleEndian.PutUint64(c.Mem[a+8:], sector)
}

// do adds a chain, kicks, and waits for its completion; it returns the
// status byte at statusAt and the length the device reported.
func (c *client) do(statusAt uint64, segs ...vhostfront.Seg) (byte, uint32) {
	c.t.Helper()
	c.Mem[statusAt] = 0xff
	head, err := c.q.Add(segs...)
	if err != nil {
		c.t.Fatal(err)
	}
	c.q.KickNow()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		for _, u := range c.q.Reap(nil) {
			if u.Head != head {
				c.t.Fatalf("completion of chain %d, want %d", u.Head, head)
			}
			return c.Mem[statusAt], u.Len
		}
		c.q.WaitCall(100 * time.Millisecond)
	}
	c.t.Fatal("no completion in 10 s")
	return 0, 0
}

// request sends a request of typ at sector with data (out) or room for
// n bytes (in), in pieces of piece bytes, and returns the status, the
// reported length and the bytes read.
func (c *client) request(typ uint32, sector uint64, data []byte, n, piece int) (byte, uint32, []byte) {
	c.t.Helper()
	hdr, st, dataAt := c.buf, c.buf+64, c.buf+4096
	c.header(hdr, typ, sector)
	segs := []vhostfront.Seg{{Addr: hdr, Len: 16}}
	write := data == nil
	if !write {
		copy(c.Mem[dataAt:], data)
		n = len(data)
	}
	for off := 0; off < n; off += piece {
		segs = append(segs, vhostfront.Seg{Addr: dataAt + uint64(off), Len: uint32(min(piece, n-off)), Write: write})
	}
	segs = append(segs, vhostfront.Seg{Addr: st, Len: 1, Write: true})
	status, length := c.do(st, segs...)
	return status, length, bytes.Clone(c.Mem[dataAt : dataAt+uint64(n)])
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i/512) + seed
	}
	return p
}

// TestRequests sends every request type through a queue, with and
// without EVENT_IDX, and checks statuses, lengths and the disk's bytes.
func TestRequests(t *testing.T) {
	for _, eventIdx := range []bool{true, false} {
		t.Run(map[bool]string{true: "event-idx", false: "no-event-idx"}[eventIdx], func(t *testing.T) {
			disk := newLockedDisk(make([]byte, 4<<20))
			c := connect(t, backend(t, disk, vhostblk.Options{Serial: "ds-serial-1", QueueSize: 32}), eventIdx)

			data := pattern(12288, 1)
			if st, n, _ := c.request(typeOut, 8, data, 0, 4096); st != statusOK || n != 1 {
				t.Fatalf("write: status %d, length %d", st, n)
			}
			if !bytes.Equal(disk.bytes(8*512, len(data)), data) {
				t.Fatal("the write is not on the disk")
			}
			st, n, got := c.request(typeIn, 8, nil, len(data), 1000) // pieces not sector sized
			if st != statusOK || n != uint32(len(data))+1 || !bytes.Equal(got, data) {
				t.Fatalf("read: status %d, length %d, equal %v", st, n, bytes.Equal(got, data))
			}
			if st, _, _ := c.request(typeFlush, 0, nil, 0, 1); st != statusOK {
				t.Fatalf("flush: status %d", st)
			}
			st, n, id := c.request(typeGetID, 0, nil, 20, 20)
			if st != statusOK || n != 21 || string(bytes.TrimRight(id, "\x00")) != "ds-serial-1" {
				t.Fatalf("get id: status %d, length %d, %q", st, n, id)
			}
			// Write zeroes (unmap) over the middle 4 KiB; discard the
			// first 4 KiB (the memory disk cannot punch holes: still OK).
			seg := binary.LittleEndian.AppendUint64(nil, 16)
			seg = binary.LittleEndian.AppendUint32(seg, 8)
			seg = binary.LittleEndian.AppendUint32(seg, 1)
			if st, _, _ := c.request(typeWriteZeroes, 0, seg, 0, 16); st != statusOK {
				t.Fatalf("write zeroes: status %d", st)
			}
			want := bytes.Clone(data)
			clear(want[4096:8192])
			if !bytes.Equal(disk.bytes(8*512, len(data)), want) {
				t.Fatal("write zeroes did not zero exactly its range")
			}
			seg = binary.LittleEndian.AppendUint64(nil, 8)
			seg = binary.LittleEndian.AppendUint32(seg, 8)
			seg = binary.LittleEndian.AppendUint32(seg, 0)
			if st, _, _ := c.request(typeDiscard, 0, seg, 0, 16); st != statusOK {
				t.Fatalf("discard: status %d", st)
			}
			for _, tc := range []struct {
				name  string
				typ   uint32
				sec   uint64
				data  []byte
				n     int
				want  byte
				piece int
			}{
				{"read past the end", typeIn, 4<<20/512 - 1, nil, 1024, statusIOErr, 1024},
				{"write past the end", typeOut, 4 << 20 / 512, pattern(512, 3), 0, statusIOErr, 512},
				{"read of a partial sector", typeIn, 0, nil, 100, statusIOErr, 100},
				{"an unknown type", 99, 0, nil, 512, statusUnsupp, 512},
				{"more buffers than seg_max", typeIn, 0, nil, 40 * 512, statusIOErr, 512},
				{"write zeroes with unknown flags", typeWriteZeroes, 0, append(binary.LittleEndian.AppendUint64(nil, 0), 8, 0, 0, 0, 4, 0, 0, 0), 0, statusUnsupp, 16},
			} {
				if st, _, _ := c.request(tc.typ, tc.sec, tc.data, tc.n, tc.piece); st != tc.want {
					t.Errorf("%s: status %d, want %d", tc.name, st, tc.want)
				}
			}
			if !bytes.Equal(disk.bytes(4<<20-512, 512), make([]byte, 512)) {
				t.Error("a refused write changed the disk")
			}
		})
	}
}

// TestSplitHeaderAndIndirect sends a write whose header is split across
// two descriptors, and a read through an indirect table.
func TestSplitHeaderAndIndirect(t *testing.T) {
	disk := newLockedDisk(make([]byte, 1<<20))
	c := connect(t, backend(t, disk, vhostblk.Options{}), true)
	hdr, st, data := c.buf, c.buf+64, c.buf+4096
	c.header(hdr, typeOut, 2)
	copy(c.Mem[data:], pattern(1024, 7))
	if s, _ := c.do(st, vhostfront.Seg{Addr: hdr, Len: 8}, vhostfront.Seg{Addr: hdr + 8, Len: 8}, vhostfront.Seg{Addr: data, Len: 1024}, vhostfront.Seg{Addr: st, Len: 1, Write: true}); s != statusOK {
		t.Fatalf("split header: status %d", s)
	}
	if !bytes.Equal(disk.bytes(1024, 1024), pattern(1024, 7)) {
		t.Fatal("the write with a split header is not on the disk")
	}
	// An indirect table of three descriptors: header, data, status.
	table := c.Alloc(48, 16)
	c.header(hdr, typeIn, 2)
	clear(c.Mem[data : data+1024])
	put := func(i int, addr uint64, n uint32, flags, next uint16) {
		d := c.Mem[table+uint64(16*i):]
		binary.LittleEndian.PutUint64(d, addr)
		binary.LittleEndian.PutUint32(d[8:], n)
		binary.LittleEndian.PutUint16(d[12:], flags)
		binary.LittleEndian.PutUint16(d[14:], next)
	}
	put(0, hdr, 16, vhostfront.DescNext, 1)
	put(1, data, 1024, vhostfront.DescNext|vhostfront.DescWrite, 2)
	put(2, st, 1, vhostfront.DescWrite, 0)
	head, err := c.q.Add(vhostfront.Seg{Addr: table, Len: 48})
	if err != nil {
		t.Fatal(err)
	}
	// Add made a plain descriptor; mark it indirect before the kick.
	flagsAt := c.q.Desc + 16*uint64(head) + 12
	binary.LittleEndian.PutUint16(c.Mem[flagsAt:], vhostfront.DescIndirect)
	c.Mem[st] = 0xff
	c.q.KickNow()
	for deadline := time.Now().Add(10 * time.Second); ; c.q.WaitCall(100 * time.Millisecond) {
		if u := c.q.Reap(nil); len(u) == 1 {
			if c.Mem[st] != statusOK || u[0].Len != 1025 || !bytes.Equal(c.Mem[data:data+1024], pattern(1024, 7)) {
				t.Fatalf("indirect read: status %d, length %d", c.Mem[st], u[0].Len)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no completion of the indirect read")
		}
	}
}

// TestHostileChains makes chains that break the rules: each ends the
// session (the back-end closes the connection) without touching memory
// outside the guest's, and the back-end serves the next front-end.
func TestHostileChains(t *testing.T) {
	path := backend(t, newLockedDisk(make([]byte, 1<<20)), vhostblk.Options{})
	for _, tc := range []struct {
		name  string
		chain func(c *client)
	}{
		{"data outside guest memory", func(c *client) {
			c.header(c.buf, typeIn, 0)
			c.q.Add(vhostfront.Seg{Addr: c.buf, Len: 16}, vhostfront.Seg{Addr: 1 << 40, Len: 4096, Write: true}, vhostfront.Seg{Addr: c.buf + 64, Len: 1, Write: true})
		}},
		{"data crossing the end of guest memory", func(c *client) {
			c.header(c.buf, typeIn, 0)
			c.q.Add(vhostfront.Seg{Addr: c.buf, Len: 16}, vhostfront.Seg{Addr: 8<<20 - 512, Len: 4096, Write: true}, vhostfront.Seg{Addr: c.buf + 64, Len: 1, Write: true})
		}},
		{"a loop", func(c *client) {
			head, _ := c.q.Add(vhostfront.Seg{Addr: c.buf, Len: 16}, vhostfront.Seg{Addr: c.buf + 64, Len: 1, Write: true})
			d := c.Mem[c.q.Desc+16*uint64(head):]
			next := binary.LittleEndian.Uint16(d[14:])
			e := c.Mem[c.q.Desc+16*uint64(next):]
			binary.LittleEndian.PutUint16(e[12:], vhostfront.DescNext|vhostfront.DescWrite)
			binary.LittleEndian.PutUint16(e[14:], head)
		}},
		{"a readable buffer after a writable one", func(c *client) {
			c.q.Add(vhostfront.Seg{Addr: c.buf + 64, Len: 1, Write: true}, vhostfront.Seg{Addr: c.buf, Len: 16})
		}},
		{"next past the table", func(c *client) {
			head, _ := c.q.Add(vhostfront.Seg{Addr: c.buf, Len: 16}, vhostfront.Seg{Addr: c.buf + 64, Len: 1, Write: true})
			binary.LittleEndian.PutUint16(c.Mem[c.q.Desc+16*uint64(head)+14:], 9999)
		}},
		{"an indirect table of odd size", func(c *client) {
			head, _ := c.q.Add(vhostfront.Seg{Addr: c.buf, Len: 40})
			binary.LittleEndian.PutUint16(c.Mem[c.q.Desc+16*uint64(head)+12:], vhostfront.DescIndirect)
		}},
		{"an indirect table outside memory", func(c *client) {
			head, _ := c.q.Add(vhostfront.Seg{Addr: 1 << 40, Len: 48})
			binary.LittleEndian.PutUint16(c.Mem[c.q.Desc+16*uint64(head)+12:], vhostfront.DescIndirect)
		}},
		{"a head past the ring", func(c *client) {
			c.q.Publish(5000)
		}},
		{"more available than the ring holds", func(c *client) {
			binary.LittleEndian.PutUint16(c.Mem[c.q.Avail+2:], 1000)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := connect(t, path, true)
			tc.chain(c)
			c.q.KickNow()
			if err := waitClosed(c.Frontend); err != nil {
				t.Fatal(err)
			}
		})
	}
	// The back-end still serves.
	c := connect(t, path, true)
	if st, _, _ := c.request(typeOut, 0, pattern(512, 9), 0, 512); st != statusOK {
		t.Fatalf("after the hostile front-ends: status %d", st)
	}
}

// waitClosed waits until the back-end closes the connection.
func waitClosed(f *vhostfront.Frontend) error {
	_, _, err := f.Reply(0)
	if err == io.EOF {
		return nil
	}
	if err == nil {
		return io.ErrUnexpectedEOF
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return err
	}
	return nil
}

// gatedDisk holds reads until its gate opens.
type gatedDisk struct {
	diskserve.Passthrough
	gate    chan struct{}
	started chan struct{}
	once    sync.Once
}

func (g *gatedDisk) ReadAt(p []byte, off int64) (int, error) {
	g.once.Do(func() { close(g.started) })
	<-g.gate
	return g.D.ReadAt(p, off)
}

// TestStopWithRequestsInFlight stops a queue (GET_VRING_BASE) while a read
// is in flight: the reply waits for the read, which completes into the
// used ring first, and the base is past it.
func TestStopWithRequestsInFlight(t *testing.T) {
	image := pattern(1<<20, 5)
	g := &gatedDisk{Passthrough: diskserve.Passthrough{D: disktest.NewMemory(image, false)}, gate: make(chan struct{}), started: make(chan struct{})}
	c := connect(t, backend(t, g, vhostblk.Options{}), true)
	c.header(c.buf, typeIn, 0)
	if _, err := c.q.Add(vhostfront.Seg{Addr: c.buf, Len: 16}, vhostfront.Seg{Addr: c.buf + 4096, Len: 512, Write: true}, vhostfront.Seg{Addr: c.buf + 64, Len: 1, Write: true}); err != nil {
		t.Fatal(err)
	}
	c.q.KickNow()
	<-g.started
	base := make(chan []byte, 1)
	go func() {
		p, err := c.Call(vhostfront.ReqGetVringBase, vhostfront.State(0, 0))
		if err != nil {
			t.Error(err)
		}
		base <- p
	}()
	select {
	case <-base:
		t.Fatal("GET_VRING_BASE answered with a read in flight")
	case <-time.After(200 * time.Millisecond):
	}
	close(g.gate)
	p := <-base
	if len(p) != 8 || binary.LittleEndian.Uint32(p[4:]) != 1 {
		t.Fatalf("GET_VRING_BASE answered %x, want base 1", p)
	}
	if u := c.q.Reap(nil); len(u) != 1 || c.Mem[c.buf+64] != statusOK || !bytes.Equal(c.Mem[c.buf+4096:c.buf+4096+512], image[:512]) {
		t.Fatalf("the read in flight did not complete into the used ring (%d used, status %d)", len(u), c.Mem[c.buf+64])
	}
}

// stuckDisk holds every write at offset 0 until released, then fails
// it: a back-end that dies with that write in flight.
type stuckDisk struct {
	diskserve.Passthrough
	started chan struct{}
	release chan struct{}
	once    sync.Once
}

func (s *stuckDisk) WriteAt(p []byte, off int64) (int, error) {
	if off != 0 {
		return s.D.WriteAt(p, off)
	}
	s.once.Do(func() { close(s.started) })
	<-s.release
	return 0, io.ErrClosedPipe
}

// TestInflightFinishedByNextBackend takes two writes into a back-end
// whose disk finishes the second and never the first (as if it were
// killed with the first in flight), then connects the same memory and
// inflight region to a new back-end, as a VMM does when its back-end
// restarts: the new back-end finishes the first write, does not repeat
// the second (the used ring holds each once), and serves the chains made
// available after.
func TestInflightFinishedByNextBackend(t *testing.T) {
	disk := newLockedDisk(make([]byte, 1<<20))
	stuck := &stuckDisk{Passthrough: diskserve.Passthrough{D: disk}, started: make(chan struct{}), release: make(chan struct{})}
	first := backend(t, stuck, vhostblk.Options{})
	c := connect(t, first, true)
	t.Cleanup(func() { close(stuck.release) })
	heads := map[uint16]int{}
	write := func(slot uint64, sector uint64, seed byte) {
		hdr, data := c.buf+slot*8192, c.buf+slot*8192+4096
		c.header(hdr, typeOut, sector)
		copy(c.Mem[data:], pattern(2048, seed))
		c.Mem[hdr+64] = 0xff
		h, err := c.q.Add(vhostfront.Seg{Addr: hdr, Len: 16}, vhostfront.Seg{Addr: data, Len: 2048}, vhostfront.Seg{Addr: hdr + 64, Len: 1, Write: true})
		if err != nil {
			t.Fatal(err)
		}
		heads[h] = int(slot)
	}
	reap := func(used []vhostfront.Used, n int) []vhostfront.Used {
		for deadline := time.Now().Add(10 * time.Second); len(used) < n && time.Now().Before(deadline); c.q.WaitCall(100 * time.Millisecond) {
			used = c.q.Reap(used)
		}
		return used
	}
	write(0, 0, 1)
	write(1, 8, 2)
	c.q.KickNow()
	<-stuck.started
	used := reap(nil, 1)
	if len(used) != 1 || heads[used[0].Head] != 1 {
		t.Fatalf("the first back-end returned %v, want the second write only", used)
	}

	second := backend(t, disk, vhostblk.Options{})
	if err := c.Reconnect(second, []*vhostfront.Queue{c.q}); err != nil {
		t.Fatal(err)
	}
	used = reap(used, 2)
	time.Sleep(50 * time.Millisecond) // a repeat of the second write would show now
	used = c.q.Reap(used)
	if len(used) != 2 || heads[used[1].Head] != 0 {
		t.Fatalf("after the restart the used ring holds %v, want the second write, then the first", used)
	}
	for slot, seed := range []byte{1, 2} {
		if st := c.Mem[c.buf+uint64(slot)*8192+64]; st != statusOK {
			t.Errorf("write %d: status %d", slot, st)
		}
		if !bytes.Equal(disk.bytes(slot*4096, 2048), pattern(2048, seed)) {
			t.Errorf("write %d is not on the disk", slot)
		}
	}
	write(2, 16, 3)
	c.q.KickNow()
	if used = reap(used, 3); len(used) != 3 || !bytes.Equal(disk.bytes(16*512, 2048), pattern(2048, 3)) {
		t.Fatal("a write after the reconnection was not served")
	}
}

// splitDisk reads as mem through ReadAt but maps its reads onto the host
// file f, whose bytes differ: what a read returns shows which way it went.
type splitDisk struct {
	diskserve.Passthrough
	f *os.File
}

func (s *splitDisk) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	if write {
		return diskserve.HostRange{}, false
	}
	return diskserve.HostRange{FD: int(s.f.Fd()), Off: off}, true
}

// TestAloneReadsFromPageCacheOnly reads, alone in the queue, a range whose
// host file is in the page cache: it is served from there on the queue's
// goroutine. Then a range the host file cannot fill (it holds only the
// first 12 KiB): preadv2 comes back short and the read goes to the engine
// (ReadAt). Dropping the pages with FADV_DONTNEED would not test this
// reliably: RWF_NOWAIT starts readahead of what is missing, and on a fast
// device the pages may be read in before the call returns.
func TestAloneReadsFromPageCacheOnly(t *testing.T) {
	mem := pattern(1<<20, 1)
	host := pattern(12<<10, 100)
	path := filepath.Join(t.TempDir(), "host")
	if err := os.WriteFile(path, host, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d := &splitDisk{Passthrough: diskserve.Passthrough{D: disktest.NewMemory(mem, true)}, f: f}
	c := connect(t, backend(t, d, vhostblk.Options{}), true)
	f.ReadAt(make([]byte, 4096), 8192)
	if st, _, got := c.request(typeIn, 16, nil, 4096, 4096); st != statusOK || !bytes.Equal(got, host[8192:12288]) {
		t.Fatalf("a cached read alone was not served from the page cache (status %d)", st)
	}
	if st, _, got := c.request(typeIn, 24, nil, 4096, 4096); st != statusOK || !bytes.Equal(got, mem[12288:16384]) {
		t.Fatalf("a read alone that the page cache cannot serve was not handed to the engine (status %d)", st)
	}
}

// flushCounter is a locked disk that counts its flushes.
type flushCounter struct {
	*lockedDisk
	flushes atomic.Int32
}

func (d *flushCounter) Flush() error {
	d.flushes.Add(1)
	return nil
}

// TestFeaturesFollowDiskAndCacheMode checks, through the protocol, what
// the device offers for a writable disk with a volatile write cache, for
// one whose every write is durable (the write-through cache modes), and
// for a read-only disk, and that each behaves as it says: write-back
// writes are not flushed until the driver turns the cache to
// write-through, a durable device refuses that switch, and a read-only
// one refuses every change.
func TestFeaturesFollowDiskAndCacheMode(t *testing.T) {
	// Feature bits and config offsets of the virtio specification.
	const (
		fRO, fFlush, fConfigWCE, fDiscard, fWriteZeroes = 1 << 5, 1 << 9, 1 << 11, 1 << 13, 1 << 14
		wceOff                                          = 32
	)
	features := func(c *client) uint64 {
		p, err := c.Call(vhostfront.ReqGetFeatures, nil)
		if err != nil || len(p) != 8 {
			t.Fatalf("GET_FEATURES: %x %v", p, err)
		}
		return binary.LittleEndian.Uint64(p)
	}
	wce := func(c *client) byte {
		req := binary.LittleEndian.AppendUint32(nil, 0)
		req = binary.LittleEndian.AppendUint32(req, 60)
		req = binary.LittleEndian.AppendUint32(req, 0)
		p, err := c.Call(vhostfront.ReqGetConfig, append(req, make([]byte, 60)...))
		if err != nil || len(p) != 72 {
			t.Fatalf("GET_CONFIG: %d bytes, %v", len(p), err)
		}
		return p[12+wceOff]
	}
	setWCE := func(c *client, v byte) error {
		req := binary.LittleEndian.AppendUint32(nil, wceOff)
		req = binary.LittleEndian.AppendUint32(req, 1)
		req = binary.LittleEndian.AppendUint32(req, 0)
		return c.Ack(vhostfront.ReqSetConfig, append(req, v))
	}
	data := pattern(4096, 7)

	t.Run("write-back", func(t *testing.T) {
		disk := &flushCounter{lockedDisk: newLockedDisk(make([]byte, 1<<20))}
		c := connect(t, backend(t, disk, vhostblk.Options{}), true)
		f := features(c)
		if f&(fFlush|fConfigWCE|fDiscard|fWriteZeroes) != fFlush|fConfigWCE|fDiscard|fWriteZeroes || f&fRO != 0 {
			t.Fatalf("features %#x", f)
		}
		if w := wce(c); w != 1 {
			t.Fatalf("writeback %d, want 1", w)
		}
		if st, _, _ := c.request(typeOut, 0, data, 0, 4096); st != statusOK || disk.flushes.Load() != 0 {
			t.Fatalf("write-back write: status %d, %d flushes", st, disk.flushes.Load())
		}
		if err := setWCE(c, 0); err != nil {
			t.Fatal(err)
		}
		if w := wce(c); w != 0 {
			t.Fatalf("writeback %d after the driver chose write-through", w)
		}
		if st, _, _ := c.request(typeOut, 8, data, 0, 4096); st != statusOK || disk.flushes.Load() != 1 {
			t.Fatalf("write-through write: status %d, %d flushes, want 1", st, disk.flushes.Load())
		}
	})

	t.Run("durable", func(t *testing.T) {
		disk := &flushCounter{lockedDisk: newLockedDisk(make([]byte, 1<<20))}
		c := connect(t, backend(t, disk, vhostblk.Options{Durable: true}), true)
		f := features(c)
		if f&(fFlush|fConfigWCE|fRO) != 0 || f&(fDiscard|fWriteZeroes) != fDiscard|fWriteZeroes {
			t.Fatalf("features %#x", f)
		}
		if w := wce(c); w != 0 {
			t.Fatalf("writeback %d, want 0", w)
		}
		if st, _, _ := c.request(typeOut, 0, data, 0, 4096); st != statusOK || !bytes.Equal(disk.bytes(0, 4096), data) {
			t.Fatalf("write: status %d", st)
		}
		if setWCE(c, 1) == nil {
			t.Fatal("a durable device let the driver turn on a volatile cache")
		}
	})

	t.Run("read-only", func(t *testing.T) {
		img := pattern(1<<20, 3)
		disk := &lockedDisk{Passthrough: diskserve.Passthrough{D: disktest.NewMemory(img, true)}, img: img}
		c := connect(t, backend(t, disk, vhostblk.Options{}), true)
		if f := features(c); f&fRO == 0 || f&(fDiscard|fWriteZeroes) != 0 {
			t.Fatalf("features %#x", f)
		}
		if st, _, got := c.request(typeIn, 8, nil, 4096, 4096); st != statusOK || !bytes.Equal(got, img[4096:8192]) {
			t.Fatalf("read: status %d", st)
		}
		seg := binary.LittleEndian.AppendUint64(nil, 0)
		seg = binary.LittleEndian.AppendUint32(seg, 8)
		seg = binary.LittleEndian.AppendUint32(seg, 0)
		for _, tc := range []struct {
			name string
			typ  uint32
			data []byte
			want byte
		}{
			{"write", typeOut, data, statusIOErr},
			{"discard", typeDiscard, seg, statusIOErr},
			{"write zeroes", typeWriteZeroes, seg, statusIOErr},
			{"flush", typeFlush, nil, statusOK},
		} {
			if st, _, _ := c.request(tc.typ, 0, tc.data, 0, max(len(tc.data), 1)); st != tc.want {
				t.Errorf("%s: status %d, want %d", tc.name, st, tc.want)
			}
		}
		if !bytes.Equal(disk.bytes(0, 1<<20), pattern(1<<20, 3)) {
			t.Error("a read-only disk changed")
		}
	})
}
