package vhostuser

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve/internal/vhostfront"
)

// nullDevice completes every chain at once, with nothing written.
type nullDevice struct{}

func (nullDevice) Features() uint64                  { return 1 << 9 }
func (nullDevice) Queues() int                       { return 2 }
func (nullDevice) Config() []byte                    { return make([]byte, 60) }
func (nullDevice) SetConfig(off int, b []byte) error { return nil }
func (nullDevice) Handle(q *Queue, c *Chain)         { q.Complete(c.Head, 0) }

func listen(t *testing.T) (string, *Server) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(nullDevice{}, nil)
	go s.Serve(l)
	t.Cleanup(func() { s.Shutdown(t.Context()); l.Close() })
	return path, s
}

// TestMalformedMessages sends requests that break the protocol: each gets
// an error (a non-zero REPLY_ACK where it asks for one, an empty GET_CONFIG
// reply) and the back-end ends the session, then serves the next
// front-end.
func TestMalformedMessages(t *testing.T) {
	path, _ := listen(t)
	header := func(req, flags, size uint32) []byte {
		b := binary.LittleEndian.AppendUint32(nil, req)
		b = binary.LittleEndian.AppendUint32(b, flags)
		return binary.LittleEndian.AppendUint32(b, size)
	}
	for _, tc := range []struct {
		name string
		send func(f *vhostfront.Frontend) error
		ack  bool // a non-zero REPLY_ACK comes first
	}{
		{"protocol version 2", func(f *vhostfront.Frontend) error { return f.SendRaw(header(reqSetOwner, 2, 0)) }, false},
		{"a payload too large", func(f *vhostfront.Frontend) error { return f.SendRaw(header(reqSetOwner, 1, 1<<20)) }, false},
		{"an unknown request", func(f *vhostfront.Frontend) error { return f.Send(99, true, nil) }, true},
		{"a short payload", func(f *vhostfront.Frontend) error { return f.Send(reqSetVringNum, true, []byte{1, 2}) }, true},
		{"a ring past the queues", func(f *vhostfront.Frontend) error {
			return f.Send(reqSetVringNum, true, vhostfront.State(7, 64))
		}, true},
		{"a ring size not a power of 2", func(f *vhostfront.Frontend) error {
			return f.Send(reqSetVringNum, true, vhostfront.State(0, 100))
		}, true},
		{"a memory table without its descriptor", func(f *vhostfront.Frontend) error {
			return f.Send(reqSetMemTable, true, f.MemTable())
		}, true},
		{"a memory table of 9 regions", func(f *vhostfront.Frontend) error {
			p := f.MemTable()
			binary.LittleEndian.PutUint32(p, 9)
			return f.Send(reqSetMemTable, true, p, f.MemFD())
		}, true},
		{"a memory region of size 0", func(f *vhostfront.Frontend) error {
			p := f.MemTable()
			binary.LittleEndian.PutUint64(p[16:], 0)
			return f.Send(reqSetMemTable, true, p, f.MemFD())
		}, true},
		{"a memory region past the end of its file", func(f *vhostfront.Frontend) error {
			p := f.MemTable()
			binary.LittleEndian.PutUint64(p[32:], 1<<40)
			return f.Send(reqSetMemTable, true, p, f.MemFD())
		}, true},
		{"ring addresses outside memory", func(f *vhostfront.Frontend) error {
			if err := f.Ack(reqSetMemTable, f.MemTable(), f.MemFD()); err != nil {
				return err
			}
			f.Ack(reqSetVringNum, vhostfront.State(0, 64))
			addr := binary.LittleEndian.AppendUint32(nil, 0)
			addr = binary.LittleEndian.AppendUint32(addr, 0)
			for range 3 {
				addr = binary.LittleEndian.AppendUint64(addr, 0x1000)
			}
			addr = binary.LittleEndian.AppendUint64(addr, 0)
			f.Ack(reqSetVringAddr, addr)
			kick, _ := unix.Eventfd(0, unix.EFD_CLOEXEC)
			defer unix.Close(kick)
			return f.Send(reqSetVringKick, true, vhostfront.U64(0), kick)
		}, true},
		{"a kick without a descriptor", func(f *vhostfront.Frontend) error {
			return f.Send(reqSetVringKick, true, vhostfront.U64(0))
		}, true},
		{"config bytes past the config space", func(f *vhostfront.Frontend) error {
			p := binary.LittleEndian.AppendUint32(nil, 56)
			p = binary.LittleEndian.AppendUint32(p, 16)
			p = binary.LittleEndian.AppendUint32(p, 0)
			if err := f.Send(reqGetConfig, false, append(p, make([]byte, 16)...)); err != nil {
				return err
			}
			r, _, err := f.Reply(reqGetConfig)
			if err == nil && len(r) != 0 {
				t.Errorf("GET_CONFIG past the end answered %d bytes, want none", len(r))
			}
			return err
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := vhostfront.Dial(path, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.Call(reqGetProtocolFeatures, nil); err != nil {
				t.Fatal(err)
			}
			if err := f.Send(reqSetProtocolFeatures, false, vhostfront.U64(protoReplyAck|protoConfig)); err != nil {
				t.Fatal(err)
			}
			if err := tc.send(f); err != nil {
				t.Fatal(err)
			}
			if tc.ack {
				p, _, err := f.Reply(0)
				if err == nil && (len(p) != 8 || binary.LittleEndian.Uint64(p) == 0) {
					t.Errorf("the error was acknowledged with %x", p)
				}
			}
			if _, _, err := f.Reply(0); err != io.EOF {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					t.Fatal("the back-end kept the session")
				}
			}
		})
	}
	f, err := vhostfront.Dial(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, _, err := f.Setup(2, 16, true, true); err != nil {
		t.Fatalf("after the malformed messages: %v", err)
	}
}

// FuzzMessages feeds a session arbitrary bytes as its message stream: it
// must end without a panic, whatever they say.
func FuzzMessages(f *testing.F) {
	msg := func(req, flags uint32, payload ...byte) []byte {
		b := binary.LittleEndian.AppendUint32(nil, req)
		b = binary.LittleEndian.AppendUint32(b, flags)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(payload)))
		return append(b, payload...)
	}
	f.Add(msg(reqGetFeatures, 1))
	f.Add(append(msg(reqSetProtocolFeatures, 1, vhostfront.U64(protoReplyAck|protoConfig|protoMQ)...), msg(reqSetVringNum, 9, vhostfront.State(1, 128)...)...))
	f.Add(msg(reqGetConfig, 1, 0, 0, 0, 0, 60, 0, 0, 0, 0, 0, 0, 0))
	f.Add(msg(reqSetVringAddr, 1, make([]byte, 40)...))
	f.Add(msg(reqGetInflightFD, 1, append(make([]byte, 16), 2, 0, 128, 0, 0, 0, 0, 0)...))
	f.Add(msg(reqSetStatus, 1, vhostfront.U64(15)...))
	f.Fuzz(func(t *testing.T, data []byte) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		ours := os.NewFile(uintptr(fds[0]), "front")
		theirs := os.NewFile(uintptr(fds[1]), "back")
		defer ours.Close()
		fc, err := net.FileConn(theirs)
		theirs.Close()
		if err != nil {
			t.Fatal(err)
		}
		s := NewServer(nullDevice{}, nil)
		done := make(chan error, 1)
		go func() { done <- s.serveConn(fc.(*net.UnixConn)) }()
		ours.Write(data)
		unix.Shutdown(fds[0], unix.SHUT_WR)
		go io.Copy(io.Discard, ours) // the replies
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the session did not end at the end of its messages")
		}
	})
}

// FuzzChain reads chains out of a descriptor table and an avail ring of
// arbitrary bytes in 64 KiB of guest memory: every chain is taken or
// refused with an error, and every buffer lies in guest memory.
func FuzzChain(f *testing.F) {
	desc := func(addr uint64, n uint32, flags, next uint16) []byte {
		b := binary.LittleEndian.AppendUint64(nil, addr)
		b = binary.LittleEndian.AppendUint32(b, n)
		b = binary.LittleEndian.AppendUint16(b, flags)
		return binary.LittleEndian.AppendUint16(b, next)
	}
	f.Add(append(desc(0x1000, 16, descFNext, 1), desc(0x2000, 1, descFWrite, 0)...), uint16(1))
	f.Add(desc(0x3000, 48, descFIndirect, 0), uint16(1))
	f.Add(append(desc(0x1000, 16, descFNext, 1), desc(0x2000, 1, descFNext|descFWrite, 0)...), uint16(2))
	f.Fuzz(func(t *testing.T, table []byte, avail uint16) {
		const memBytes, size = 64 << 10, 16
		mem, err := unix.Mmap(-1, 0, memBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Munmap(mem)
		// The table at 0, an indirect table's worth of the input at
		// 0x3000, the avail ring at 0x8000, the used ring at 0x9000.
		copy(mem[:size*descSize], table)
		if len(table) > size*descSize {
			copy(mem[0x3000:0x4000], table[size*descSize:])
		}
		binary.LittleEndian.PutUint16(mem[0x8000+2:], avail)
		for i := range size {
			binary.LittleEndian.PutUint16(mem[0x8000+4+2*i:], uint16(i)^uint16(len(table)))
		}
		m := &Memory{regions: []*region{{guest: 0, size: memBytes, data: mem}}}
		q := &Queue{mem: m, size: size, desc: mem[:size*descSize], avail: mem[0x8000 : 0x8000+6+2*size], used: mem[0x9000 : 0x9000+6+8*size], indirect: true, call: -1}
		var c Chain
		for range 20 {
			ok, err := q.Pop(&c)
			if err != nil || !ok {
				return
			}
			lo := uintptr(unsafe.Pointer(&mem[0]))
			for _, b := range append(c.Out, c.In...) {
				if len(b) == 0 {
					continue
				}
				p := uintptr(unsafe.Pointer(&b[0]))
				if p < lo || p+uintptr(len(b)) > lo+memBytes {
					t.Fatalf("a buffer of %d bytes outside guest memory", len(b))
				}
			}
			q.pending.Done()
		}
	})
}

// TestMemorySlots adds guest memory with ADD_MEM_REG (as a VMM that
// hot-plugs memory does) in two regions, serves a chain whose buffer lies
// in the second, removes that region with REM_MEM_REG, and finds a chain
// into it refused.
func TestMemorySlots(t *testing.T) {
	path, _ := listen(t)
	f, err := vhostfront.Dial(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Send(reqSetProtocolFeatures, false, vhostfront.U64(protoReplyAck|protoConfigureMemSlot)); err != nil {
		t.Fatal(err)
	}
	p, err := f.Call(reqGetMaxMemSlots, nil)
	if err != nil || binary.LittleEndian.Uint64(p) < 2 {
		t.Fatalf("GET_MAX_MEM_SLOTS: %x, %v", p, err)
	}
	feats, err := f.Call(reqGetFeatures, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Ack(reqSetFeatures, feats); err != nil {
		t.Fatal(err)
	}
	// The two halves of the front-end's memory, as two regions.
	reg := func(guest, size uint64) []byte {
		b := make([]byte, 8)
		b = binary.LittleEndian.AppendUint64(b, guest)
		b = binary.LittleEndian.AppendUint64(b, size)
		b = binary.LittleEndian.AppendUint64(b, vhostfront.UserBase+guest)
		return binary.LittleEndian.AppendUint64(b, guest)
	}
	half := uint64(len(f.Mem) / 2)
	for _, g := range []uint64{0, half} {
		if err := f.Ack(reqAddMemReg, reg(g, half), f.MemFD()); err != nil {
			t.Fatalf("ADD_MEM_REG at %#x: %v", g, err)
		}
	}
	q, err := f.StartQueue(0, 16, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := half + 4096
	if _, err := q.Add(vhostfront.Seg{Addr: buf, Len: 512}); err != nil {
		t.Fatal(err)
	}
	q.KickNow()
	var used []vhostfront.Used
	for deadline := time.Now().Add(5 * time.Second); len(used) == 0 && time.Now().Before(deadline); q.WaitCall(100 * time.Millisecond) {
		used = q.Reap(used)
	}
	if len(used) != 1 {
		t.Fatal("a chain in the second region was not served")
	}
	if err := f.Ack(reqRemMemReg, reg(half, half)); err != nil {
		t.Fatalf("REM_MEM_REG: %v", err)
	}
	if _, err := q.Add(vhostfront.Seg{Addr: buf, Len: 512}); err != nil {
		t.Fatal(err)
	}
	q.KickNow()
	if _, _, err := f.Reply(0); !errors.Is(err, io.EOF) {
		t.Fatalf("a chain into removed memory: the session goes on (%v)", err)
	}
}
