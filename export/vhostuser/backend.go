// Package vhostuser is the back-end side of the vhost-user protocol
// (qemu's docs/interop/vhost-user.rst): a VMM (qemu, cloud-hypervisor,
// crosvm) shares guest memory and the virtqueues of a virtio device over a
// Unix socket, and the back-end serves the queues in place. The device
// itself (virtio-blk) is a [Device]; this package negotiates features,
// maps the memory regions, sets the rings up and runs one goroutine per
// started queue, which hands each chain to the device.
//
// A VMM is trusted with its own guest only: every address and length it or
// its guest sends is checked against the mapped memory before use, and a
// message or chain that breaks the rules ends the session with an error,
// never an access outside guest memory.
package vhostuser

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// A Device is the virtio device that a [Server] serves.
type Device interface {
	// Features returns the device's own feature bits; the ring features
	// (VERSION_1, INDIRECT_DESC, EVENT_IDX) are this package's.
	Features() uint64
	// Queues returns the most queues the device serves.
	Queues() int
	// Config returns the device's configuration space.
	Config() []byte
	// SetConfig writes b at off of the configuration space, where the
	// driver may write.
	SetConfig(off int, b []byte) error
	// Handle serves one chain of queue q, which it then owns. It runs on
	// the queue's goroutine and must not wait for I/O: it starts the
	// request and returns, and calls q.Complete once the request is done.
	Handle(q *Queue, c *Chain)
}

// A Server serves a device to one front-end at a time.
type Server struct {
	dev Device
	log *slog.Logger

	mu      sync.Mutex
	conn    *net.UnixConn // the session's, while one runs
	closing bool
	done    sync.WaitGroup
}

// NewServer returns a server of dev.
func NewServer(dev Device, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{dev: dev, log: log}
}

// Serve accepts front-ends on l, one at a time: a front-end that
// disconnects and connects again gets a new session, in which the rings
// go on where they were (with the inflight region, the chains the last
// session left in flight are finished). It returns when l fails or
// Shutdown is called.
func (s *Server) Serve(l *net.UnixListener) error {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return nil
			}
			return err
		}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			c.Close()
			return nil
		}
		s.conn = c
		s.done.Add(1)
		s.mu.Unlock()
		err = s.serveConn(c)
		s.mu.Lock()
		s.conn = nil
		s.mu.Unlock()
		s.done.Done()
		if err != nil {
			s.log.Warn("vhost-user session ended", "err", err)
		} else {
			s.log.Info("vhost-user front-end disconnected")
		}
	}
}

// Shutdown ends the session under way, once its requests in flight are
// complete, and makes Serve return; the caller closes the listener.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	if s.conn != nil {
		s.conn.CloseRead()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.done.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// A session is the state of one front-end's connection.
type session struct {
	dev      Device
	log      *slog.Logger
	conn     *net.UnixConn
	failOnce sync.Once

	features uint64 // acknowledged by SET_FEATURES
	protocol uint64 // acknowledged by SET_PROTOCOL_FEATURES
	mem      *Memory
	vrings   []*vring
	inflight *inflightRegion
	status   uint8
}

// vring is the front-end's setup of one ring.
type vring struct {
	num               uint16
	desc, used, avail uint64 // user addresses
	addrSet           bool
	base              uint16
	kick, call, errFD int
	enabled           bool
	q                 *Queue
	kicks             *kickWaiter
	running           chan struct{} // closed when the queue's goroutine ends
}

func (s *Server) serveConn(c *net.UnixConn) error {
	defer c.Close()
	ss := &session{dev: s.dev, log: s.log, conn: c, mem: &Memory{}}
	for range s.dev.Queues() {
		ss.vrings = append(ss.vrings, &vring{kick: -1, call: -1, errFD: -1})
	}
	defer ss.close()
	buf := make([]byte, headerLen)
	for {
		m, err := readMessage(c, buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) || isEOF(err) {
				return nil
			}
			return err
		}
		reply, herr := ss.handle(m)
		m.closeFDs()
		if reply != nil {
			if err := writeReply(c, m.request, reply.payload, reply.fds...); err != nil {
				reply.closeFDs()
				return err
			}
			reply.closeFDs()
		} else if m.flags&flagNeedReply != 0 && ss.protocol&protoReplyAck != 0 {
			code := uint64(0)
			if herr != nil {
				code = 1
			}
			if err := writeReply(c, m.request, u64Payload(code)); err != nil {
				return err
			}
		}
		if herr != nil {
			return fmt.Errorf("%s: %w", requestName(m.request), herr)
		}
	}
}

func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET)
}

// fail ends the session because of err, found off the message loop (a
// broken chain).
func (ss *session) fail(err error) {
	ss.failOnce.Do(func() {
		ss.log.Warn("vhost-user: ending the session", "err", err)
		ss.conn.CloseRead()
	})
}

// close stops every queue (waiting for their requests in flight) and
// releases the session's memory and descriptors.
func (ss *session) close() {
	for _, v := range ss.vrings {
		ss.stop(v)
		for _, fd := range []int{v.kick, v.call, v.errFD} {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	}
	ss.mem.close()
	ss.inflight.close()
}

func (ss *session) vring(i uint32) (*vring, error) {
	if i >= uint32(len(ss.vrings)) {
		return nil, fmt.Errorf("ring %d of %d", i, len(ss.vrings))
	}
	return ss.vrings[i], nil
}

// handle carries out one request and returns its reply, if it has one.
func (ss *session) handle(m *message) (*message, error) {
	switch m.request {
	case reqGetFeatures:
		return &message{payload: u64Payload(ringFeatures | ss.dev.Features())}, nil
	case reqSetFeatures:
		v, err := m.u64()
		if err != nil {
			return nil, err
		}
		if v&^(ringFeatures|ss.dev.Features()) != 0 {
			return nil, fmt.Errorf("features %#x were not offered", v&^(ringFeatures|ss.dev.Features()))
		}
		ss.features = v
		return nil, nil
	case reqGetProtocolFeatures:
		return &message{payload: u64Payload(supportedProtocolFeatures)}, nil
	case reqSetProtocolFeatures:
		v, err := m.u64()
		if err != nil {
			return nil, err
		}
		if v&^supportedProtocolFeatures != 0 {
			return nil, fmt.Errorf("protocol features %#x were not offered", v&^supportedProtocolFeatures)
		}
		ss.protocol = v
		return nil, nil
	case reqSetOwner:
		return nil, nil
	case reqResetOwner, reqResetDevice:
		for _, v := range ss.vrings {
			ss.stop(v)
			v.base, v.enabled, v.addrSet = 0, false, false
		}
		ss.status = 0
		return nil, nil
	case reqGetQueueNum:
		return &message{payload: u64Payload(uint64(len(ss.vrings)))}, nil
	case reqGetMaxMemSlots:
		return &message{payload: u64Payload(maxSlots)}, nil
	case reqSetMemTable:
		return nil, ss.setMemTable(m)
	case reqAddMemReg, reqRemMemReg:
		return nil, ss.changeMemReg(m)
	case reqSetVringNum:
		i, num, err := m.state()
		if err != nil {
			return nil, err
		}
		v, err := ss.vring(i)
		if err != nil {
			return nil, err
		}
		if num == 0 || num > maxQueueSize || num&(num-1) != 0 {
			return nil, fmt.Errorf("ring %d: size %d is not a power of 2 up to %d", i, num, maxQueueSize)
		}
		if v.q != nil {
			return nil, fmt.Errorf("ring %d: resized while running", i)
		}
		v.num = uint16(num)
		return nil, nil
	case reqSetVringAddr:
		return nil, ss.setVringAddr(m)
	case reqSetVringBase:
		i, base, err := m.state()
		if err != nil {
			return nil, err
		}
		v, err := ss.vring(i)
		if err != nil {
			return nil, err
		}
		if v.q != nil {
			return nil, fmt.Errorf("ring %d: base set while running", i)
		}
		v.base = uint16(base)
		return nil, nil
	case reqGetVringBase:
		i, _, err := m.state()
		if err != nil {
			return nil, err
		}
		v, err := ss.vring(i)
		if err != nil {
			return nil, err
		}
		ss.stop(v)
		if v.kick >= 0 {
			unix.Close(v.kick)
			v.kick = -1
		}
		p := binary.LittleEndian.AppendUint32(nil, i)
		return &message{payload: binary.LittleEndian.AppendUint32(p, uint32(v.base))}, nil
	case reqSetVringKick, reqSetVringCall, reqSetVringErr:
		return nil, ss.setVringFD(m)
	case reqSetVringEnable:
		i, on, err := m.state()
		if err != nil {
			return nil, err
		}
		v, err := ss.vring(i)
		if err != nil {
			return nil, err
		}
		v.enabled = on != 0
		if !v.enabled {
			ss.stop(v)
			return nil, nil
		}
		return nil, ss.start(int(i))
	case reqGetConfig:
		return ss.getConfig(m)
	case reqSetConfig:
		if len(m.payload) < 12 {
			return nil, errShort
		}
		off, size := binary.LittleEndian.Uint32(m.payload), binary.LittleEndian.Uint32(m.payload[4:])
		if uint64(size) != uint64(len(m.payload)-12) {
			return nil, fmt.Errorf("config of %d bytes in a payload of %d", size, len(m.payload)-12)
		}
		return nil, ss.dev.SetConfig(int(off), m.payload[12:])
	case reqGetInflightFD:
		return ss.getInflight(m)
	case reqSetInflightFD:
		return nil, ss.setInflight(m)
	case reqSetStatus:
		v, err := m.u64()
		if err != nil {
			return nil, err
		}
		ss.status = uint8(v)
		return nil, nil
	case reqGetStatus:
		return &message{payload: u64Payload(uint64(ss.status))}, nil
	}
	return nil, fmt.Errorf("not supported")
}

// A vringFD payload's index and flags.
const (
	vringIndexMask = 0xff
	vringNoFD      = 1 << 8
)

func (ss *session) setVringFD(m *message) error {
	p, err := m.u64()
	if err != nil {
		return err
	}
	v, err := ss.vring(uint32(p & vringIndexMask))
	if err != nil {
		return err
	}
	fd := -1
	if p&vringNoFD == 0 {
		if fd = m.takeFD(); fd < 0 {
			return fmt.Errorf("ring %d: %d descriptors with the message, want 1", p&vringIndexMask, len(m.fds))
		}
	}
	switch m.request {
	case reqSetVringKick:
		if fd < 0 {
			return fmt.Errorf("ring %d: polling instead of kicks is not supported", p&vringIndexMask)
		}
		ss.stop(v)
		if v.kick >= 0 {
			unix.Close(v.kick)
		}
		v.kick = fd
		// Without protocol features, a ring starts enabled.
		if ss.features&FeatureProtocolFeatures == 0 {
			v.enabled = true
		}
		return ss.start(int(p & vringIndexMask))
	case reqSetVringCall:
		old := v.call
		v.call = fd
		if v.q != nil {
			v.q.setCall(fd)
		}
		if old >= 0 {
			unix.Close(old)
		}
	case reqSetVringErr:
		if v.errFD >= 0 {
			unix.Close(v.errFD)
		}
		v.errFD = fd
	}
	return nil
}

func (ss *session) setVringAddr(m *message) error {
	if len(m.payload) < 40 {
		return errShort
	}
	i := binary.LittleEndian.Uint32(m.payload)
	v, err := ss.vring(i)
	if err != nil {
		return err
	}
	if v.q != nil {
		return fmt.Errorf("ring %d: addresses set while running", i)
	}
	if flags := binary.LittleEndian.Uint32(m.payload[4:]); flags != 0 {
		return fmt.Errorf("ring %d: flags %#x (logging is not supported)", i, flags)
	}
	v.desc = binary.LittleEndian.Uint64(m.payload[8:])
	v.used = binary.LittleEndian.Uint64(m.payload[16:])
	v.avail = binary.LittleEndian.Uint64(m.payload[24:])
	v.addrSet = true
	return nil
}

func (ss *session) setMemTable(m *message) error {
	if len(m.payload) < 8 {
		return errShort
	}
	n := binary.LittleEndian.Uint32(m.payload)
	if n > maxRegions || uint64(len(m.payload)) < 8+uint64(n)*32 {
		return fmt.Errorf("%d regions in a payload of %d bytes", n, len(m.payload))
	}
	if uint32(len(m.fds)) != n {
		return fmt.Errorf("%d regions with %d descriptors", n, len(m.fds))
	}
	mem := &Memory{}
	for k := range n {
		guest, size, user, offset := parseRegion(m.payload[8+32*k:])
		fd := m.fds[k]
		m.fds[k] = -1
		r, err := mapRegion(fd, guest, size, user, offset)
		if err == nil {
			err = mem.add(r)
		}
		if err != nil {
			mem.close()
			return err
		}
	}
	return ss.swapMemory(func() error { ss.mem.close(); ss.mem = mem; return nil })
}

func (ss *session) changeMemReg(m *message) error {
	if len(m.payload) < 40 {
		return errShort
	}
	guest, size, user, offset := parseRegion(m.payload[8:])
	if m.request == reqRemMemReg {
		return ss.swapMemory(func() error { return ss.mem.remove(guest, size, user) })
	}
	fd := m.takeFD()
	if fd < 0 {
		return fmt.Errorf("ADD_MEM_REG with %d descriptors, want 1", len(m.fds))
	}
	r, err := mapRegion(fd, guest, size, user, offset)
	if err != nil {
		return err
	}
	return ss.swapMemory(func() error {
		if err := ss.mem.add(r); err != nil {
			r.unmap()
			return err
		}
		return nil
	})
}
