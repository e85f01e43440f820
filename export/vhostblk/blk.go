// Package vhostblk is a virtio-blk device (virtio 1.2, section 5.2) over a
// disk, for the vhost-user back-end of package vhostuser: a VMM attaches
// the disk as vhost-user-blk-pci, and the guest's requests move between
// the disk and guest memory in place, through an async I/O engine.
package vhostblk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/export/vhostuser"
)

// Feature bits of virtio-blk.
const (
	featSegMax      = 1 << 2
	featRO          = 1 << 5
	featBlkSize     = 1 << 6
	featFlush       = 1 << 9
	featConfigWCE   = 1 << 11
	featMQ          = 1 << 12
	featDiscard     = 1 << 13
	featWriteZeroes = 1 << 14
)

// Request types and status values.
const (
	typeIn          = 0
	typeOut         = 1
	typeFlush       = 4
	typeGetID       = 8
	typeDiscard     = 11
	typeWriteZeroes = 13

	statusOK     = 0
	statusIOErr  = 1
	statusUnsupp = 2

	sector       = 512
	headerLen    = 16
	idLen        = 20 // VIRTIO_BLK_ID_BYTES
	segmentLen   = 16 // of a discard or write zeroes request
	maxSegments  = 32 // discard and write zeroes segments per request
	configLen    = 60
	configWCEOff = 32
)

// Options configure a device.
type Options struct {
	// Queues is how many queues the device offers (1 if 0).
	Queues int
	// Serial is what GET_ID returns (at most 20 bytes).
	Serial string
	// Durable says that every write is durable once done (cache modes
	// writethrough and directsync): the device then offers no volatile
	// write cache, and guests send no FLUSH.
	Durable bool
	// QueueSize is the ring size the front-end is expected to use, for
	// seg_max (128 if 0).
	QueueSize int
	// Logger receives I/O errors.
	Logger *slog.Logger
}

// A Device serves a disk as virtio-blk.
type Device struct {
	disk   diskserve.DiskFile
	engine async.Engine
	opts   Options
	log    *slog.Logger

	mu  sync.Mutex
	wce uint8 // the driver's choice of write-back (1) or write-through (0)
}

var _ vhostuser.Device = (*Device)(nil)

// New returns a device serving disk through engine.
func New(disk diskserve.DiskFile, engine async.Engine, opts Options) (*Device, error) {
	if opts.Queues <= 0 {
		opts.Queues = 1
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 128
	}
	if len(opts.Serial) > idLen {
		return nil, fmt.Errorf("serial %q is longer than %d bytes", opts.Serial, idLen)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	d := &Device{disk: disk, engine: engine, opts: opts, log: opts.Logger}
	if !opts.Durable {
		d.wce = 1
	}
	return d, nil
}

// Features returns virtio-blk's feature bits for the disk.
func (d *Device) Features() uint64 {
	f := uint64(featSegMax | featBlkSize | featMQ)
	if !d.opts.Durable {
		f |= featFlush | featConfigWCE
	}
	if d.disk.ReadOnly() {
		f |= featRO
	} else {
		f |= featDiscard | featWriteZeroes
	}
	return f
}

// Queues returns the number of queues.
func (d *Device) Queues() int { return d.opts.Queues }

// Config returns the configuration space: capacity in sectors, limits,
// the write cache mode and the number of queues.
func (d *Device) Config() []byte {
	c := make([]byte, configLen)
	le := binary.LittleEndian
	le.PutUint64(c[0:], uint64(d.disk.Size()/sector))
	le.PutUint32(c[12:], uint32(d.opts.QueueSize-2)) // seg_max: the header and the status take a descriptor each
	le.PutUint32(c[20:], sector)                     // blk_size
	d.mu.Lock()
	c[configWCEOff] = d.wce
	d.mu.Unlock()
	le.PutUint16(c[34:], uint16(d.opts.Queues))
	le.PutUint32(c[36:], 1<<22) // max_discard_sectors: 2 GiB
	le.PutUint32(c[40:], maxSegments)
	le.PutUint32(c[44:], 8)     // discard_sector_alignment: 4 KiB
	le.PutUint32(c[48:], 1<<22) // max_write_zeroes_sectors
	le.PutUint32(c[52:], maxSegments)
	c[56] = 1 // write_zeroes_may_unmap
	return c
}

// SetConfig lets the driver switch the write cache between write-back and
// write-through (the writeback byte); nothing else is writable.
func (d *Device) SetConfig(off int, b []byte) error {
	if off != configWCEOff || len(b) != 1 || d.opts.Durable || b[0] > 1 {
		return fmt.Errorf("virtio-blk config: %d bytes at %d are not writable", len(b), off)
	}
	d.mu.Lock()
	d.wce = b[0]
	d.mu.Unlock()
	return nil
}

func (d *Device) writeBack() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.wce == 1
}

// A request is one virtio-blk request in flight.
type request struct {
	d       *Device
	q       *vhostuser.Queue
	head    uint16
	status  []byte // the status byte, in guest memory
	written uint32
	left    atomic.Int32 // engine requests still running
	failed  atomic.Bool
	flush   bool // a write that the driver's write-through mode makes durable before completion
	inline  bool // a page-cached write run on the queue's goroutine (see readCached)
	reqs    []async.Request
}

// Handle starts the request of chain c.
func (d *Device) Handle(q *vhostuser.Queue, c *vhostuser.Chain) {
	r := &request{d: d, q: q, head: c.Head}
	st, in := lastByte(c.In)
	if st == nil {
		// Nowhere to put the status: a broken driver. Return the chain
		// with nothing written.
		d.log.Warn("virtio-blk: a request without a status byte", "queue", q.Index)
		q.Complete(c.Head, 0)
		return
	}
	r.status = st
	if len(c.Out)+len(c.In) > d.opts.QueueSize {
		// More buffers than seg_max (the queue size less the header and
		// the status) allows, counting those the header and status take.
		r.finish(statusIOErr)
		return
	}
	var hdr [headerLen]byte
	out := c.Out
	if n := gather(hdr[:], out); n < headerLen {
		r.finish(statusIOErr)
		return
	}
	out = skip(out, headerLen)
	typ := binary.LittleEndian.Uint32(hdr[0:])
	off := int64(binary.LittleEndian.Uint64(hdr[8:]))
	switch typ {
	case typeIn:
		r.written = uint32(total(in))
		if c.Alone && r.readCached(in, off) {
			r.finish(statusOK)
			return
		}
		r.data(async.OpRead, in, off)
	case typeOut:
		if d.disk.ReadOnly() {
			r.finish(statusIOErr)
			return
		}
		r.flush = !d.writeBack() && !d.opts.Durable
		r.inline = c.Alone && r.cachedWrite(out, off)
		r.data(async.OpWrite, out, off)
	case typeFlush:
		if d.disk.ReadOnly() {
			r.finish(statusOK)
			return
		}
		r.submit([]async.Request{{Op: async.OpFlush}})
	case typeGetID:
		id := make([]byte, idLen)
		copy(id, d.opts.Serial)
		r.written = uint32(scatter(in, id))
		r.finish(statusOK)
	case typeDiscard, typeWriteZeroes:
		if d.disk.ReadOnly() {
			r.finish(statusIOErr)
			return
		}
		r.zero(typ, out)
	default:
		r.finish(statusUnsupp)
	}
}

// A request alone in its queue (vhostuser.Chain.Alone) whose data is a
// copy to or from the page cache is served on the queue's goroutine, which
// saves the hand-offs to and from an engine goroutine; one that may wait
// for a device (data not cached, O_DIRECT, a format that does not map its
// data onto a host file, flushes) goes to the engine, so that the chains
// the guest makes available meanwhile do not wait behind it.

// readCached serves a read of one buffer from the page cache, with
// preadv2's RWF_NOWAIT (which fails rather than wait for the device), and
// reports whether it did.
func (r *request) readCached(bufs [][]byte, sec int64) bool {
	if len(bufs) != 1 || len(bufs[0])%sector != 0 || sec < 0 || sec > r.d.disk.Size()/sector {
		return false
	}
	buf := bufs[0]
	hr, ok := diskserve.MapHost(r.d.disk, sec*sector, int64(len(buf)), false)
	if !ok {
		return false
	}
	defer hr.Done()
	ok, _ = hr.ReadCached(buf)
	return ok
}

// cachedWrite reports whether a write of bufs at sector sec goes to the
// page cache of a host file: whether the disk maps the range's reads onto
// one, without O_DIRECT (the engine's disk maps writes itself, not for
// others).
func (r *request) cachedWrite(bufs [][]byte, sec int64) bool {
	n := total(bufs)
	if sec < 0 || sec > r.d.disk.Size()/sector || n == 0 {
		return false
	}
	hr, ok := diskserve.MapHost(r.d.disk, sec*sector, n, false)
	if !ok {
		return false
	}
	hr.Done()
	return !hr.Direct()
}

// data reads or writes the sectors from off (in sectors) from or into the
// guest buffers bufs, one engine request per buffer.
func (r *request) data(op async.Op, bufs [][]byte, sec int64) {
	n := total(bufs)
	off := sec * sector
	if sec < 0 || n%sector != 0 || off > r.d.disk.Size() || n > r.d.disk.Size()-off {
		r.finish(statusIOErr)
		return
	}
	reqs := make([]async.Request, 0, len(bufs))
	for _, b := range bufs {
		if len(b) > 0 {
			reqs = append(reqs, async.Request{Op: op, Off: off, Buf: b})
			off += int64(len(b))
		}
	}
	if len(reqs) == 0 {
		r.finish(statusOK)
		return
	}
	r.submit(reqs)
}

// zero carries out the segments of a discard or write zeroes request.
func (r *request) zero(typ uint32, out [][]byte) {
	n := total(out)
	if n == 0 || n%segmentLen != 0 || n/segmentLen > maxSegments {
		r.finish(statusIOErr)
		return
	}
	seg := make([]byte, n)
	gather(seg, out)
	size := r.d.disk.Size()
	reqs := make([]async.Request, 0, n/segmentLen)
	for k := 0; k < len(seg); k += segmentLen {
		sec := binary.LittleEndian.Uint64(seg[k:])
		num := int64(binary.LittleEndian.Uint32(seg[k+8:]))
		flags := binary.LittleEndian.Uint32(seg[k+12:])
		off := int64(sec) * sector
		if sec > uint64(size/sector) || num*sector > size-off || flags&^1 != 0 || typ == typeDiscard && flags != 0 {
			r.finish(statusUnsupp)
			return
		}
		req := async.Request{Op: async.OpPunchHole, Off: off, Len: num * sector}
		if typ == typeWriteZeroes {
			req.Op = async.OpWriteZeroes
			if flags&1 != 0 {
				req.Flags = diskserve.ZeroMayUnmap
			}
		}
		reqs = append(reqs, req)
	}
	r.submit(reqs)
}

// submit starts reqs, finishing r once every one is done: at once on this
// goroutine for a page-cached write alone in its queue, else through the
// engine's completions.
func (r *request) submit(reqs []async.Request) {
	r.reqs = reqs
	r.left.Store(int32(len(reqs)))
	for i := range r.reqs {
		req := &r.reqs[i]
		req.Done = r.done
		if r.inline {
			r.d.engine.Do(req)
			r.done(req)
		} else {
			r.d.engine.Submit(req)
		}
	}
}

// done is the Done of each engine request.
func (r *request) done(er *async.Request) {
	if er.Err != nil && !(er.Op == async.OpPunchHole && errors.Is(er.Err, diskserve.ErrUnsupported)) {
		r.d.log.Warn("virtio-blk request failed", "op", er.Op.String(), "offset", er.Off, "err", er.Err)
		r.failed.Store(true)
	}
	if r.left.Add(-1) > 0 {
		return
	}
	switch {
	case r.failed.Load():
		r.finish(statusIOErr)
	case r.flush:
		r.flush, r.inline = false, false // a sync waits for the device
		r.submit([]async.Request{{Op: async.OpFlush}})
	default:
		r.finish(statusOK)
	}
}

// finish writes the status and returns the chain.
func (r *request) finish(status byte) {
	r.status[0] = status
	r.q.Complete(r.head, r.written+1)
}

// lastByte splits off the last byte of bufs: the status byte.
func lastByte(bufs [][]byte) ([]byte, [][]byte) {
	for i := len(bufs) - 1; i >= 0; i-- {
		if b := bufs[i]; len(b) > 0 {
			rest := bufs[:i:i]
			if len(b) > 1 {
				rest = append(rest, b[:len(b)-1])
			}
			return b[len(b)-1:], rest
		}
	}
	return nil, nil
}

func total(bufs [][]byte) int64 {
	var n int64
	for _, b := range bufs {
		n += int64(len(b))
	}
	return n
}

// gather copies from bufs into p, and returns how much it copied.
func gather(p []byte, bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		if n == len(p) {
			break
		}
		n += copy(p[n:], b)
	}
	return n
}

// scatter copies p into bufs, and returns how much it copied.
func scatter(bufs [][]byte, p []byte) int {
	n := 0
	for _, b := range bufs {
		if n == len(p) {
			break
		}
		n += copy(b, p[n:])
	}
	return n
}

// skip returns bufs without its first n bytes.
func skip(bufs [][]byte, n int) [][]byte {
	for len(bufs) > 0 && n > 0 {
		if n < len(bufs[0]) {
			return append([][]byte{bufs[0][n:]}, bufs[1:]...)
		}
		n -= len(bufs[0])
		bufs = bufs[1:]
	}
	return bufs
}
