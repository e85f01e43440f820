// Package vhostfront is a vhost-user front-end for tests and benchmarks:
// it plays the VMM's part (guest memory in a memfd, eventfds for kicks and
// calls, split rings it fills as a virtio driver would) against a
// back-end's socket, so that a back-end can be driven without a guest.
package vhostfront

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Requests, features and flags of the protocol (qemu's
// docs/interop/vhost-user.rst).
const (
	ReqGetFeatures         = 1
	ReqSetFeatures         = 2
	ReqSetOwner            = 3
	ReqSetMemTable         = 5
	ReqSetVringNum         = 8
	ReqSetVringAddr        = 9
	ReqSetVringBase        = 10
	ReqGetVringBase        = 11
	ReqSetVringKick        = 12
	ReqSetVringCall        = 13
	ReqGetProtocolFeatures = 15
	ReqSetProtocolFeatures = 16
	ReqGetQueueNum         = 17
	ReqSetVringEnable      = 18
	ReqGetConfig           = 24
	ReqSetConfig           = 25
	ReqGetInflightFD       = 31
	ReqSetInflightFD       = 32

	FeatureVersion1         = 1 << 32
	FeatureProtocolFeatures = 1 << 30
	FeatureEventIdx         = 1 << 29
	FeatureIndirectDesc     = 1 << 28

	ProtocolMQ       = 1 << 0
	ProtocolReplyAck = 1 << 3
	ProtocolConfig   = 1 << 9
	ProtocolInflight = 1 << 12

	flagVersion   = 1
	flagReply     = 1 << 2
	flagNeedReply = 1 << 3

	// Descriptor flags.
	DescNext     = 1
	DescWrite    = 2
	DescIndirect = 4
)

// UserBase is the user address at which the front-end says its memory
// starts (it is not mapped there; back-ends translate it).
const UserBase = 0x7f00_0000_0000

// A Frontend is one connection to a back-end, with guest memory.
type Frontend struct {
	conn  *net.UnixConn
	memfd int
	// Mem is guest memory: guest physical address 0 is Mem[0].
	Mem []byte
	top uint64 // the next free byte of Mem for Alloc

	inflightFD   int    // from GET_INFLIGHT_FD, kept for a reconnection
	inflightDesc []byte // its description
	features     uint64
	protocol     uint64
}

// Dial connects to the back-end at path with memBytes of guest memory.
func Dial(path string, memBytes int) (*Frontend, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	fd, err := unix.MemfdCreate("guest", unix.MFD_CLOEXEC)
	if err != nil {
		c.Close()
		return nil, err
	}
	if err := unix.Ftruncate(fd, int64(memBytes)); err != nil {
		c.Close()
		unix.Close(fd)
		return nil, err
	}
	mem, err := unix.Mmap(fd, 0, memBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		c.Close()
		unix.Close(fd)
		return nil, err
	}
	return &Frontend{conn: c, memfd: fd, Mem: mem, top: 4096, inflightFD: -1}, nil
}

// Close disconnects and frees the memory.
func (f *Frontend) Close() error {
	err := f.conn.Close()
	unix.Munmap(f.Mem)
	unix.Close(f.memfd)
	if f.inflightFD >= 0 {
		unix.Close(f.inflightFD)
	}
	return err
}

// Alloc returns the guest address of n bytes of guest memory, aligned to
// align.
func (f *Frontend) Alloc(n, align uint64) uint64 {
	f.top = (f.top + align - 1) &^ (align - 1)
	a := f.top
	f.top += n
	if f.top > uint64(len(f.Mem)) {
		panic("vhostfront: out of guest memory")
	}
	return a
}

// Send sends a request with its payload and descriptors.
func (f *Frontend) Send(req uint32, needReply bool, payload []byte, fds ...int) error {
	b := make([]byte, 12+len(payload))
	binary.LittleEndian.PutUint32(b, req)
	flags := uint32(flagVersion)
	if needReply {
		flags |= flagNeedReply
	}
	binary.LittleEndian.PutUint32(b[4:], flags)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[12:], payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := f.conn.WriteMsgUnix(b, oob, nil)
	return err
}

// SendRaw sends bytes as they are, for malformed messages.
func (f *Frontend) SendRaw(b []byte) error {
	_, err := f.conn.Write(b)
	return err
}

// Reply reads the reply to req: its payload and the descriptors that came
// with it.
func (f *Frontend) Reply(req uint32) ([]byte, []int, error) {
	f.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer f.conn.SetReadDeadline(time.Time{})
	hdr := make([]byte, 12)
	oob := make([]byte, unix.CmsgSpace(8*4))
	n, oobn, _, _, err := f.conn.ReadMsgUnix(hdr, oob)
	if err != nil {
		return nil, nil, err
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, nil, err
		}
		for _, m := range msgs {
			got, err := unix.ParseUnixRights(&m)
			if err != nil {
				return nil, nil, err
			}
			fds = append(fds, got...)
		}
	}
	if n < 12 {
		if _, err := io.ReadFull(f.conn, hdr[n:]); err != nil {
			return nil, fds, err
		}
	}
	if got := binary.LittleEndian.Uint32(hdr); got != req {
		return nil, fds, fmt.Errorf("reply to request %d, want %d", got, req)
	}
	if binary.LittleEndian.Uint32(hdr[4:])&flagReply == 0 {
		return nil, fds, errors.New("reply without the reply flag")
	}
	p := make([]byte, binary.LittleEndian.Uint32(hdr[8:]))
	_, err = io.ReadFull(f.conn, p)
	return p, fds, err
}

// Call sends a request that needs a reply (one of its own, or REPLY_ACK's)
// and returns the reply's payload.
func (f *Frontend) Call(req uint32, payload []byte, fds ...int) ([]byte, error) {
	if err := f.Send(req, true, payload, fds...); err != nil {
		return nil, err
	}
	p, rfds, err := f.Reply(req)
	for _, fd := range rfds {
		unix.Close(fd)
	}
	return p, err
}

// Ack sends a request under REPLY_ACK and fails unless the back-end
// acknowledges it with 0.
func (f *Frontend) Ack(req uint32, payload []byte, fds ...int) error {
	p, err := f.Call(req, payload, fds...)
	if err != nil {
		return err
	}
	if len(p) != 8 || binary.LittleEndian.Uint64(p) != 0 {
		return fmt.Errorf("request %d: the back-end answered %x", req, p)
	}
	return nil
}

// U64 is a u64 payload.
func U64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

// State is a vring state payload.
func State(index, num uint32) []byte {
	return binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, index), num)
}

// MemTable is the SET_MEM_TABLE payload for the front-end's memory as one
// region.
func (f *Frontend) MemTable() []byte {
	p := binary.LittleEndian.AppendUint32(nil, 1)
	p = binary.LittleEndian.AppendUint32(p, 0)
	p = binary.LittleEndian.AppendUint64(p, 0)
	p = binary.LittleEndian.AppendUint64(p, uint64(len(f.Mem)))
	p = binary.LittleEndian.AppendUint64(p, UserBase)
	return binary.LittleEndian.AppendUint64(p, 0)
}

// MemFD returns the descriptor of guest memory.
func (f *Frontend) MemFD() int { return f.memfd }

// A Queue is one split ring the front-end drives.
type Queue struct {
	f                 *Frontend
	Index             int
	Size              uint16
	Desc, Avail, Used uint64 // guest addresses
	Kick, Call        int    // eventfds
	free              []uint16
	nextAvail         uint16
	lastUsed          uint16
	mu                sync.Mutex
}

// Setup negotiates features (the back-end's, with EVENT_IDX only if
// eventIdx) and protocol features (MQ, REPLY_ACK, CONFIG, and INFLIGHT
// if inflight), sends the memory table and starts queues rings of size
// entries. It returns the inflight descriptor (or -1) and the queues.
func (f *Frontend) Setup(queues int, size uint16, eventIdx, inflight bool) (int, []*Queue, error) {
	p, err := f.Call(ReqGetFeatures, nil)
	if err != nil {
		return -1, nil, err
	}
	features := binary.LittleEndian.Uint64(p)
	if !eventIdx {
		features &^= FeatureEventIdx
	}
	p, err = f.Call(ReqGetProtocolFeatures, nil)
	if err != nil {
		return -1, nil, err
	}
	proto := binary.LittleEndian.Uint64(p) & (ProtocolMQ | ProtocolReplyAck | ProtocolConfig | ProtocolInflight)
	if !inflight {
		proto &^= ProtocolInflight
	}
	f.features, f.protocol = features, proto
	if err := f.negotiate(); err != nil {
		return -1, nil, err
	}
	infl := -1
	if inflight {
		q := binary.LittleEndian.AppendUint64(nil, 0)
		q = binary.LittleEndian.AppendUint64(q, 0)
		q = binary.LittleEndian.AppendUint16(q, uint16(queues))
		q = binary.LittleEndian.AppendUint16(q, size)
		q = append(q, 0, 0, 0, 0)
		if err := f.Send(ReqGetInflightFD, false, q); err != nil {
			return -1, nil, err
		}
		reply, fds, err := f.Reply(ReqGetInflightFD)
		if err != nil {
			return -1, nil, err
		}
		if len(fds) != 1 || len(reply) < 20 {
			return -1, nil, fmt.Errorf("GET_INFLIGHT_FD: %d descriptors, %d bytes", len(fds), len(reply))
		}
		infl = fds[0]
		f.inflightFD, f.inflightDesc = infl, reply
		if err := f.Ack(ReqSetInflightFD, reply, infl); err != nil {
			return -1, nil, err
		}
	}
	var qs []*Queue
	for i := range queues {
		q, err := f.StartQueue(i, size, 0)
		if err != nil {
			return infl, qs, err
		}
		qs = append(qs, q)
	}
	return infl, qs, nil
}

// negotiate sets the protocol features, the owner, the features and the
// memory table.
func (f *Frontend) negotiate() error {
	if err := f.Send(ReqSetProtocolFeatures, false, U64(f.protocol)); err != nil {
		return err
	}
	if err := f.Ack(ReqSetOwner, nil); err != nil {
		return err
	}
	if err := f.Ack(ReqSetFeatures, U64(f.features)); err != nil {
		return err
	}
	return f.Ack(ReqSetMemTable, f.MemTable(), f.memfd)
}

// Reconnect connects to a back-end at path as a VMM does after its
// back-end restarted: the same memory, the inflight region of the first
// session, and the rings of qs where they are, each started at the used
// index (the last the front-end knows).
func (f *Frontend) Reconnect(path string, qs []*Queue) error {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return err
	}
	f.conn.Close()
	f.conn = c
	if err := f.negotiate(); err != nil {
		return err
	}
	if f.inflightFD >= 0 {
		if err := f.Ack(ReqSetInflightFD, f.inflightDesc, f.inflightFD); err != nil {
			return err
		}
	}
	for _, q := range qs {
		q.mu.Lock()
		base := loadIdx(f.Mem[q.Used+2:])
		q.mu.Unlock()
		if err := q.start(base); err != nil {
			return err
		}
	}
	return nil
}

// StartQueue lays ring i out in guest memory and starts it at base.
func (f *Frontend) StartQueue(i int, size uint16, base uint16) (*Queue, error) {
	q := &Queue{f: f, Index: i, Size: size, nextAvail: base, lastUsed: base}
	n := uint64(size)
	q.Desc = f.Alloc(16*n, 16)
	q.Avail = f.Alloc(6+2*n, 4)
	q.Used = f.Alloc(6+8*n, 4096)
	binary.LittleEndian.PutUint16(f.Mem[q.Avail+2:], base)
	binary.LittleEndian.PutUint16(f.Mem[q.Used+2:], base)
	for h := range size {
		q.free = append(q.free, h)
	}
	var err error
	if q.Kick, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
		return nil, err
	}
	if q.Call, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
		return nil, err
	}
	return q, q.start(base)
}

// start sends the ring's setup, starting it at base.
func (q *Queue) start(base uint16) error {
	f, i, size := q.f, q.Index, q.Size
	addr := binary.LittleEndian.AppendUint32(nil, uint32(i))
	addr = binary.LittleEndian.AppendUint32(addr, 0)
	addr = binary.LittleEndian.AppendUint64(addr, UserBase+q.Desc)
	addr = binary.LittleEndian.AppendUint64(addr, UserBase+q.Used)
	addr = binary.LittleEndian.AppendUint64(addr, UserBase+q.Avail)
	addr = binary.LittleEndian.AppendUint64(addr, 0)
	for _, step := range []struct {
		req     uint32
		payload []byte
		fd      int
	}{
		{ReqSetVringNum, State(uint32(i), uint32(size)), -1},
		{ReqSetVringBase, State(uint32(i), uint32(base)), -1},
		{ReqSetVringAddr, addr, -1},
		{ReqSetVringCall, U64(uint64(i)), q.Call},
		{ReqSetVringKick, U64(uint64(i)), q.Kick},
		{ReqSetVringEnable, State(uint32(i), 1), -1},
	} {
		var err error
		if step.fd >= 0 {
			err = f.Ack(step.req, step.payload, step.fd)
		} else {
			err = f.Ack(step.req, step.payload)
		}
		if err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
	}
	return nil
}

// A Seg is one buffer of a chain: a guest address, a length, and whether
// the device writes it.
type Seg struct {
	Addr  uint64
	Len   uint32
	Write bool
}

// Free reports how many descriptors are free.
func (q *Queue) Free() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.free)
}

// Add puts a chain of segs into the ring and makes it available; it
// returns the chain's head. The caller kicks.
func (q *Queue) Add(segs ...Seg) (uint16, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(segs) == 0 || len(segs) > len(q.free) {
		return 0, fmt.Errorf("%d segments, %d descriptors free", len(segs), len(q.free))
	}
	ids := q.free[len(q.free)-len(segs):]
	q.free = q.free[:len(q.free)-len(segs)]
	m := q.f.Mem
	for k, s := range segs {
		d := m[q.Desc+16*uint64(ids[k]):]
		binary.LittleEndian.PutUint64(d, s.Addr)
		binary.LittleEndian.PutUint32(d[8:], s.Len)
		var flags uint16
		if s.Write {
			flags |= DescWrite
		}
		if k+1 < len(segs) {
			flags |= DescNext
			binary.LittleEndian.PutUint16(d[14:], ids[k+1])
		}
		binary.LittleEndian.PutUint16(d[12:], flags)
	}
	q.Publish(ids[0])
	return ids[0], nil
}

// Publish makes the chain at head available, as is.
func (q *Queue) Publish(head uint16) {
	m := q.f.Mem
	binary.LittleEndian.PutUint16(m[q.Avail+4+2*uint64(q.nextAvail%q.Size):], head)
	q.nextAvail++
	storeIdx(m[q.Avail+2:], q.nextAvail)
}

// KickIfWanted signals the kick eventfd if the device asked to be told of the
// entries made available since the index was old (EVENT_IDX), or always
// without EVENT_IDX. It reports whether it kicked.
func (q *Queue) KickIfWanted(old uint16, eventIdx bool) bool {
	m := q.f.Mem
	if eventIdx {
		event := loadIdx(m[q.Used+4+8*uint64(q.Size):])
		if uint16(q.nextAvail-event-1) >= uint16(q.nextAvail-old) {
			return false
		}
	} else if loadIdx(m[q.Used:])&1 != 0 { // VRING_USED_F_NO_NOTIFY
		return false
	}
	q.KickNow()
	return true
}

// AvailIdx returns the index of the next entry to make available.
func (q *Queue) AvailIdx() uint16 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.nextAvail
}

// KickNow signals the kick eventfd.
func (q *Queue) KickNow() {
	var one [8]byte
	one[0] = 1
	unix.Write(q.Kick, one[:])
}

// A Used is one chain the device returned.
type Used struct {
	Head uint16
	Len  uint32
}

// Reap returns the chains the device has returned since the last call,
// freeing their descriptors.
func (q *Queue) Reap(dst []Used) []Used {
	q.mu.Lock()
	defer q.mu.Unlock()
	m := q.f.Mem
	for {
		idx := loadIdx(m[q.Used+2:])
		for ; q.lastUsed != idx; q.lastUsed++ {
			e := m[q.Used+4+8*uint64(q.lastUsed%q.Size):]
			u := Used{Head: uint16(binary.LittleEndian.Uint32(e)), Len: binary.LittleEndian.Uint32(e[4:])}
			dst = append(dst, u)
			for h := u.Head; ; {
				q.free = append(q.free, h)
				d := m[q.Desc+16*uint64(h):]
				if binary.LittleEndian.Uint16(d[12:])&DescNext == 0 {
					break
				}
				h = binary.LittleEndian.Uint16(d[14:])
			}
		}
		// Ask to be called at the next completion, then look again: one
		// that came before the request would not call.
		storeIdx(m[q.Avail+4+2*uint64(q.Size):], q.lastUsed)
		if loadIdx(m[q.Used+2:]) == q.lastUsed {
			return dst
		}
	}
}

// WaitCall waits up to timeout for the call eventfd, and reports whether
// it was signalled.
func (q *Queue) WaitCall(timeout time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(q.Call), Events: unix.POLLIN}}
	end := time.Now().Add(timeout)
	for {
		n, err := unix.Poll(fds, int(max(0, time.Until(end).Milliseconds())))
		if err == unix.EINTR { // the Go runtime's preemption signals
			continue
		}
		if n <= 0 {
			return false
		}
		break
	}
	var b [8]byte
	unix.Read(q.Call, b[:])
	return true
}
