package vhostuser

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

// swapMemory changes the memory table with change, with every running
// queue stopped around it (their requests in flight complete first, so
// that no I/O touches memory being unmapped), then started again.
func (ss *session) swapMemory(change func() error) error {
	var stopped []int
	for i, v := range ss.vrings {
		if v.q != nil {
			ss.stop(v)
			stopped = append(stopped, i)
		}
	}
	err := change()
	for _, i := range stopped {
		if serr := ss.start(i); serr != nil && err == nil {
			err = serr
		}
	}
	return err
}

// start starts ring i once it has everything it needs (size, addresses,
// kick, enabled), unless it runs already.
func (ss *session) start(i int) error {
	v := ss.vrings[i]
	if v.q != nil || v.kick < 0 || !v.enabled || !v.addrSet || v.num == 0 {
		return nil
	}
	q := &Queue{
		Index:     i,
		mem:       ss.mem,
		size:      v.num,
		eventIdx:  ss.features&FeatureEventIdx != 0,
		indirect:  ss.features&FeatureIndirectDesc != 0,
		lastAvail: v.base,
		call:      v.call,
	}
	descN, availN, usedN := ringBytes(v.num)
	var err error
	if q.desc, err = ss.mem.user(v.desc, descN); err != nil {
		return fmt.Errorf("ring %d: descriptor table: %w", i, err)
	}
	if q.avail, err = ss.mem.user(v.avail, availN); err != nil {
		return fmt.Errorf("ring %d: avail ring: %w", i, err)
	}
	if q.used, err = ss.mem.user(v.used, usedN); err != nil {
		return fmt.Errorf("ring %d: used ring: %w", i, err)
	}
	if v.avail%2 != 0 || v.used%4 != 0 || v.desc%16 != 0 {
		return fmt.Errorf("ring %d: misaligned (descriptors at %#x, avail at %#x, used at %#x)", i, v.desc, v.avail, v.used)
	}
	q.usedIdx = load16(q.used, 2)
	q.signalled = q.usedIdx
	var resubmit []uint16
	if ss.inflight != nil {
		if q.inflight, err = ss.inflight.queue(i, v.num); err != nil {
			return err
		}
		resubmit = q.inflight.recover(q.usedIdx)
		q.lastAvail = q.usedIdx + uint16(len(resubmit))
		if len(resubmit) > 0 {
			ss.log.Info("vhost-user: finishing requests a previous back-end left in flight", "queue", i, "requests", len(resubmit))
		}
	}
	w, err := newKickWaiter(v.kick)
	if err != nil {
		return fmt.Errorf("ring %d: %w", i, err)
	}
	v.kicks = w
	v.q = q
	v.running = make(chan struct{})
	go ss.run(q, w, v.running, resubmit)
	return nil
}

// A kickWaiter waits for a ring's kicks, or for its stop, in poll(2) on
// the kick eventfd and one of its own, which stop signals: the VMM's
// descriptor is neither closed nor made non-blocking under it.
type kickWaiter struct {
	kick  int // a duplicate of the ring's kick eventfd
	wake  int // an eventfd of ours that stop signals
	fds   []unix.PollFd
	count [8]byte
}

func newKickWaiter(kick int) (*kickWaiter, error) {
	k, err := unix.Dup(kick)
	if err != nil {
		return nil, err
	}
	w, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(k)
		return nil, err
	}
	return &kickWaiter{kick: k, wake: w, fds: []unix.PollFd{{Fd: int32(k), Events: unix.POLLIN}, {Fd: int32(w), Events: unix.POLLIN}}}, nil
}

// wait waits for a kick and consumes it; it reports false once stop is
// called.
func (w *kickWaiter) wait() bool {
	for {
		w.fds[0].Revents, w.fds[1].Revents = 0, 0
		_, err := unix.Poll(w.fds, -1)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil || w.fds[1].Revents != 0:
			return false
		case w.fds[0].Revents&unix.POLLIN != 0:
			unix.Read(w.kick, w.count[:]) // the count: kicks since the last read, one wake
			return true
		case w.fds[0].Revents != 0: // the kick eventfd failed
			return false
		}
	}
}

// stop makes wait return false, now or at its next call.
func (w *kickWaiter) stop() { signal(w.wake) }

// close releases the descriptors; wait must have returned.
func (w *kickWaiter) close() {
	unix.Close(w.kick)
	unix.Close(w.wake)
}

// stop stops ring v's queue, if it runs: its goroutine ends, its requests
// in flight complete, and the next chain to take becomes its base.
func (ss *session) stop(v *vring) {
	if v.q == nil {
		return
	}
	v.kicks.stop()
	<-v.running
	v.kicks.close()
	v.q.pending.Wait()
	v.base = v.q.lastAvail
	v.q, v.kicks = nil, nil
}

// run serves queue q: it takes every chain available and hands it to the
// device, then waits for a kick. It ends when kick is closed, or when the
// driver breaks the rules (which ends the session).
func (ss *session) run(q *Queue, kicks *kickWaiter, done chan struct{}, resubmit []uint16) {
	defer close(done)
	for _, head := range resubmit {
		c := &Chain{}
		if err := q.readChain(c, head); err != nil {
			ss.fail(err)
			return
		}
		q.pending.Add(1)
		ss.dev.Handle(q, c)
	}
	for {
		q.drain(true)
		for {
			c := &Chain{}
			ok, err := q.Pop(c)
			if err != nil {
				q.drain(false)
				ss.fail(err)
				return
			}
			if ok {
				c.Alone = q.availIdx() == q.lastAvail
				ss.dev.Handle(q, c)
				continue
			}
			if !q.wantKicks() {
				break
			}
		}
		q.drain(false)
		if !kicks.wait() {
			return
		}
	}
}

func (ss *session) getConfig(m *message) (*message, error) {
	if len(m.payload) < 12 {
		return nil, errShort
	}
	off, size := binary.LittleEndian.Uint32(m.payload), binary.LittleEndian.Uint32(m.payload[4:])
	cfg := ss.dev.Config()
	if uint64(off)+uint64(size) > uint64(len(cfg)) || size > 256 {
		// An empty payload says the request failed.
		return &message{}, fmt.Errorf("config bytes %d+%d of %d", off, size, len(cfg))
	}
	p := append([]byte(nil), m.payload[:12]...)
	return &message{payload: append(p, cfg[off:off+size]...)}, nil
}

// The inflight description: mmap size, mmap offset, queues, queue size.
func (ss *session) getInflight(m *message) (*message, error) {
	if len(m.payload) < 20 {
		return nil, errShort
	}
	queues := binary.LittleEndian.Uint16(m.payload[16:])
	queueSize := binary.LittleEndian.Uint16(m.payload[18:])
	if int(queues) > len(ss.vrings) {
		return nil, fmt.Errorf("inflight region for %d queues; the device has %d", queues, len(ss.vrings))
	}
	r, fd, err := newInflightRegion(queues, queueSize)
	if err != nil {
		return nil, err
	}
	ss.inflight.close()
	ss.inflight = r
	p := binary.LittleEndian.AppendUint64(nil, uint64(len(r.data)))
	p = binary.LittleEndian.AppendUint64(p, 0)
	p = binary.LittleEndian.AppendUint16(p, queues)
	p = binary.LittleEndian.AppendUint16(p, queueSize)
	p = append(p, 0, 0, 0, 0) // the C struct's padding: qemu wants 24 bytes
	return &message{payload: p, fds: []int{fd}}, nil
}

func (ss *session) setInflight(m *message) error {
	if len(m.payload) < 20 {
		return errShort
	}
	fd := m.takeFD()
	if fd < 0 {
		return fmt.Errorf("SET_INFLIGHT_FD with %d descriptors, want 1", len(m.fds))
	}
	defer unix.Close(fd)
	size := binary.LittleEndian.Uint64(m.payload)
	offset := binary.LittleEndian.Uint64(m.payload[8:])
	queues := binary.LittleEndian.Uint16(m.payload[16:])
	queueSize := binary.LittleEndian.Uint16(m.payload[18:])
	if int(queues) > len(ss.vrings) {
		return fmt.Errorf("inflight region for %d queues; the device has %d", queues, len(ss.vrings))
	}
	r, err := mapInflight(fd, size, offset, queues, queueSize)
	if err != nil {
		return err
	}
	ss.inflight.close()
	ss.inflight = r
	return nil
}
