package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/diskserve/diskserve"
)

const (
	// workersPerConn requests of one connection are served at once: as
	// many as qemu keeps in flight, so a qemu guest never waits for a
	// worker.
	workersPerConn = 16

	// requestsPerConn requests may be read ahead of the replies; past
	// that the reader stops reading the socket, which is the client's
	// back-pressure.
	requestsPerConn = 64

	// bytesPerConn bounds the buffers held by one connection's requests
	// in flight: four of the largest READs or WRITEs.
	bytesPerConn = 4 * maxPayload

	// hdrSpace holds the reply headers of one request: up to
	// maxReadChunks data or hole chunks (32 bytes each with their offset
	// and size fields), or one error chunk with its message.
	hdrSpace       = maxReadChunks*32 + 64 + maxErrMsg
	maxErrMsg      = 256
	statusStep     = 256 << 20 // the range one Extents call covers in BLOCK_STATUS
	unixSendBuffer = 4 << 20
	stopGrace      = 10 * time.Second // for a client to read its last replies at shutdown
	cacheStep      = 1 << 20          // the buffer CACHE reads into

	// cachedBatch READs at most are served on the reader and held for one
	// writev (see serveCached). Their buffers, at most cachedBatch times
	// sendfileMin bytes, are outside the connection's budget.
	cachedBatch = 32
)

// errDisconnect ends a connection after the client sent NBD_CMD_DISC.
var errDisconnect = errors.New("client disconnected")

// transmission is the transmission phase of one connection.
type transmission struct {
	s          *Server
	exp        *Export
	disk       diskserve.DiskFile
	size       int64
	c          net.Conn
	log        *slog.Logger
	flags      uint16 // transmission flags sent to the client
	structured bool   // structured replies negotiated
	blockStat  bool   // base:allocation selected for this export

	budget   *semaphore.Weighted // bytes of buffers in flight
	free     chan *request       // request objects not in use
	work     chan *request       // requests for the workers
	replies  chan *request       // requests whose reply is ready
	stopping atomic.Bool
	hdr      [28]byte   // the request header being read; reader only
	cached   []*request // READs the reader served, replies not yet sent; reader only
	noCached bool       // the host file refused RWF_NOWAIT; reader only

	// sendMu is held by whoever writes replies to the socket: the reply
	// writer, or the reader sending what it served itself. Both send
	// whole replies, so replies never interleave.
	sendMu sync.Mutex
	dead   bool // a send failed; sendMu guards it

	// The socket beneath the connection, read and written with raw
	// system calls (see socket); nil for TLS, which sendfile cannot serve.
	sock *socket

	// The sender's, under sendMu: the batch of one writev.
	batch net.Buffers
	bufs  net.Buffers
}

func newTransmission(s *Server, e *Export, c net.Conn, log *slog.Logger, structured, blockStat bool) *transmission {
	t := &transmission{
		s:          s,
		exp:        e,
		disk:       e.Disk,
		size:       e.Disk.Size(),
		c:          c,
		log:        log,
		flags:      exportFlags(e.Disk, structured),
		structured: structured,
		blockStat:  blockStat,
		budget:     semaphore.NewWeighted(bytesPerConn),
		free:       make(chan *request, requestsPerConn),
		work:       make(chan *request, requestsPerConn),
		replies:    make(chan *request, requestsPerConn),
	}
	for range requestsPerConn {
		t.free <- &request{out: make([][]byte, 0, 2*maxReadChunks+2)}
	}
	if sc, ok := c.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			t.sock = newSocket(raw)
		}
	}
	return t
}

// stop makes the reader stop at the next request; requests already read
// are still served, and a client has stopGrace to take their replies.
// Used by Server.Shutdown.
func (t *transmission) stop() {
	t.stopping.Store(true)
	t.c.SetReadDeadline(time.Now())
	t.c.SetWriteDeadline(time.Now().Add(stopGrace))
}

func (t *transmission) serve() {
	if uc, ok := t.c.(*net.UnixConn); ok {
		// The default Unix socket buffer holds a fraction of a 1 MiB
		// READ reply; 4 MiB made 1 MiB sequential reads about 1.4x
		// faster (fio, nbd engine, queue depth 4). TCP keeps its
		// autotuning, which a fixed size would turn off.
		uc.SetWriteBuffer(unixSendBuffer)
	}
	t.log.Info("client attached", "structured", t.structured, "block-status", t.blockStat)
	var workers, writer sync.WaitGroup
	for range workersPerConn {
		workers.Go(func() {
			for r := range t.work {
				t.handle(r)
				t.replies <- r
			}
		})
	}
	writer.Go(t.writeLoop)
	var in io.Reader = t.c
	if t.sock != nil {
		in = t.sock
	}
	err := t.readLoop(bufio.NewReaderSize(in, 64<<10))
	close(t.work)
	workers.Wait()
	close(t.replies)
	writer.Wait()
	t.c.Close()
	switch {
	case errors.Is(err, errDisconnect), t.stopping.Load():
		t.log.Info("client detached")
	default:
		t.log.Info("connection ended", "err", err)
	}
}

// readLoop reads requests until the client disconnects or sends garbage,
// validating each one before any disk is touched, and hands valid ones to
// the workers, but for the small READs it serves from the page cache
// itself. Their replies go out together once no whole request is left in
// the read buffer, before the reader could wait for anything.
func (t *transmission) readLoop(br *bufio.Reader) error {
	defer t.sendCached()
	for {
		if len(t.cached) == cachedBatch || len(t.cached) > 0 && br.Buffered() < len(t.hdr) {
			t.sendCached()
		}
		var r *request
		select {
		case r = <-t.free:
		default:
			t.sendCached()
			r = <-t.free
		}
		if err := t.readRequest(br, r); err != nil {
			t.free <- r
			return err
		}
	}
}

// sendCached sends the replies of the READs the reader served.
func (t *transmission) sendCached() {
	if len(t.cached) == 0 {
		return
	}
	t.sendReplies(t.cached)
	for _, r := range t.cached {
		t.release(r)
	}
	t.cached = t.cached[:0]
}

// sendReplies sends the replies of done under sendMu; after a failed send
// it closes the connection, so that the reader fails next and ends it, and
// sends nothing more.
func (t *transmission) sendReplies(done []*request) {
	t.sendMu.Lock()
	defer t.sendMu.Unlock()
	if !t.dead && t.send(done) != nil {
		t.dead = true
		t.c.Close()
	}
}

func (t *transmission) readRequest(br *bufio.Reader, r *request) error {
	if _, err := io.ReadFull(br, t.hdr[:]); err != nil {
		if err == io.EOF {
			return io.EOF
		}
		return fmt.Errorf("read request: %w", err)
	}
	if m := be.Uint32(t.hdr[0:]); m != magicRequest {
		return fmt.Errorf("bad request magic %#x", m)
	}
	r.flags = be.Uint16(t.hdr[4:])
	r.typ = be.Uint16(t.hdr[6:])
	r.cookie = be.Uint64(t.hdr[8:])
	r.off = be.Uint64(t.hdr[16:])
	r.length = be.Uint32(t.hdr[24:])
	if r.typ == cmdDisc {
		return errDisconnect
	}
	errno, msg := t.validate(r)
	if r.typ == cmdWrite {
		if r.length > maxDrain {
			return fmt.Errorf("WRITE of %d bytes, more than %d", r.length, maxDrain)
		}
		if errno != 0 {
			t.sendCached() // the payload may have to be waited for
			if _, err := io.CopyN(io.Discard, br, int64(r.length)); err != nil {
				return fmt.Errorf("read WRITE payload: %w", err)
			}
		}
	}
	if errno != 0 {
		t.log.Debug("request refused", "cmd", r.typ, "offset", r.off, "length", r.length, "err", msg)
		r.fail(t.structured, errno, msg)
		t.replies <- r
		return nil
	}
	if r.typ == cmdRead && t.serveCached(r) {
		t.cached = append(t.cached, r)
		return nil
	}
	r.cost = t.bufferCost(r)
	if !t.budget.TryAcquire(r.cost) {
		t.sendCached()
		if err := t.budget.Acquire(context.Background(), r.cost); err != nil {
			return err
		}
	}
	if r.typ == cmdWrite {
		if br.Buffered() < int(r.length) {
			t.sendCached()
		}
		if _, err := io.ReadFull(br, r.buffer(int(r.length))); err != nil {
			t.unhold(r) // readLoop returns r itself
			return fmt.Errorf("read WRITE payload: %w", err)
		}
	}
	t.work <- r
	return nil
}

// bufferCost is how many bytes of buffer serving r takes.
func (t *transmission) bufferCost(r *request) int64 {
	switch r.typ {
	case cmdRead, cmdWrite:
		return int64(r.length)
	case cmdBlockStatus:
		return 4 + 8*maxDescriptors
	case cmdCache:
		return cacheStep
	}
	return 0
}

// validate checks a request against the spec and the export, and returns
// the error to answer it with (0 if it is valid) and why.
func (t *transmission) validate(r *request) (uint32, string) {
	allowed := uint16(cmdFlagFUA) // valid on every command
	switch r.typ {
	case cmdRead:
		if t.structured {
			allowed |= cmdFlagDF
		}
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
		if t.flags&tflagSendFastZero != 0 {
			allowed |= cmdFlagFastZero
		}
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	case cmdWrite, cmdFlush, cmdTrim, cmdCache:
	default:
		return errInval, fmt.Sprintf("unknown command %d", r.typ)
	}
	if r.flags&^allowed != 0 {
		return errInval, fmt.Sprintf("flags %#x not valid on command %d", r.flags, r.typ)
	}
	write := r.typ == cmdWrite || r.typ == cmdTrim || r.typ == cmdWriteZeroes
	switch {
	case write && t.flags&tflagReadOnly != 0:
		return errPerm, "the export is read-only"
	case r.typ == cmdTrim && t.flags&tflagSendTrim == 0:
		return errInval, "TRIM was not advertised"
	case r.typ == cmdBlockStatus && !t.blockStat:
		return errInval, "no metadata context was negotiated for this export"
	case r.typ == cmdBlockStatus && r.length == 0:
		return errInval, "BLOCK_STATUS of length 0"
	case r.typ == cmdFlush:
		return 0, ""
	}
	if r.off > uint64(t.size) || uint64(r.length) > uint64(t.size)-r.off {
		msg := fmt.Sprintf("range %d+%d is outside the export (%d bytes)", r.off, r.length, t.size)
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return errNoSpc, msg
		}
		return errInval, msg
	}
	if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > maxPayload {
		return errInval, fmt.Sprintf("%d bytes is more than the maximum payload, %d", r.length, maxPayload)
	}
	return 0, ""
}

// handle serves a valid request and leaves its reply in r.
func (t *transmission) handle(r *request) {
	off, n := int64(r.off), int64(r.length)
	var err error
	switch r.typ {
	case cmdRead:
		t.read(r)
		return
	case cmdBlockStatus:
		t.blockStatus(r)
		return
	case cmdCache:
		err = t.cache(off, n, r.buffer(cacheStep))
	case cmdWrite:
		_, err = t.disk.WriteAt(r.payload(), off)
	case cmdFlush:
		err = diskserve.Flush(t.disk)
	case cmdTrim:
		err = diskserve.PunchHole(t.disk, off, n)
	case cmdWriteZeroes:
		var zf diskserve.ZeroFlags
		if r.flags&cmdFlagNoHole == 0 {
			zf |= diskserve.ZeroMayUnmap
		}
		if r.flags&cmdFlagFastZero != 0 {
			zf |= diskserve.ZeroFast
		}
		err = diskserve.WriteZeroes(t.disk, off, n, zf)
	}
	if err == nil && r.flags&cmdFlagFUA != 0 && r.typ != cmdFlush {
		err = diskserve.Flush(t.disk)
	}
	t.finish(r, err)
}

// finish encodes the reply of a request that returns no data.
func (t *transmission) finish(r *request, err error) {
	if err != nil {
		t.failed(r, err)
		return
	}
	r.simple(0)
}

// failed encodes an error reply for err, and logs it.
func (t *transmission) failed(r *request, err error) {
	errno := errnoOf(err, r)
	t.log.Warn("request failed", "cmd", r.typ, "offset", r.off, "length", r.length, "err", err)
	r.fail(t.structured, errno, err.Error())
}

// read serves NBD_CMD_READ. With structured replies and a large enough
// request, ranges that read as zeroes go as OFFSET_HOLE chunks and are
// never read; otherwise the data is read whole before any header goes out,
// so an error can still be reported.
func (t *transmission) read(r *request) {
	off, n := int64(r.off), int64(r.length)
	if n == 0 {
		if t.structured {
			r.chunk(replyFlagDone, chunkNone, 0)
		} else {
			r.simple(0)
		}
		return
	}
	runs := r.ext[:0]
	if t.structured && r.flags&cmdFlagDF == 0 && n >= sparseReadMin {
		var err error
		if runs, err = diskserve.Extents(t.disk, runs, off, n); err != nil {
			runs = runs[:0] // a failed lookup costs only the holes
		}
		runs = zeroRuns(runs, maxReadChunks)
	}
	if len(runs) == 0 {
		runs = append(runs, diskserve.Extent{Off: off, Len: n})
	}
	r.ext = runs
	if len(runs) == 1 && runs[0].Flags&diskserve.ExtentZero == 0 && t.fromPageCache(r, off, n) {
		r.data(t.structured, off, n)
		return
	}
	buf := r.buffer(int(n))
	for _, e := range runs {
		if e.Flags&diskserve.ExtentZero != 0 {
			continue
		}
		if got, err := t.disk.ReadAt(buf[e.Off-off:e.Off-off+e.Len], e.Off); int64(got) != e.Len {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			t.failed(r, err)
			return
		}
	}
	if !t.structured {
		r.simple(0)
		r.out = append(r.out, buf)
		return
	}
	for i, e := range runs {
		var fl uint16
		if i == len(runs)-1 {
			fl = replyFlagDone
		}
		if e.Flags&diskserve.ExtentZero != 0 {
			h := r.chunk(fl, chunkOffsetHole, 12)
			h = be.AppendUint64(h, uint64(e.Off))
			be.AppendUint32(h, uint32(e.Len))
			continue
		}
		h := r.chunk(fl, chunkOffsetData, 8+e.Len)
		be.AppendUint64(h, uint64(e.Off))
		r.out = append(r.out, buf[e.Off-off:e.Off-off+e.Len])
	}
}

// fromPageCache arranges for the data of r, [off, off+n) of the export, to
// go to the client with sendfile(2) from the page cache, without a copy in
// this process: where the connection is a plain socket, the read is large,
// the disk maps the range onto a host file, and all of it is cached. A read
// that would have to wait for the host's disk takes the pread path, so that
// the connection's reply writer never waits for one. Reads of cached pages
// do not fail; if the file shrinks under a sendfile, the reply cannot be
// finished and the connection ends.
func (t *transmission) fromPageCache(r *request, off, n int64) bool {
	if t.sock == nil || n < sendfileMin {
		return false
	}
	hr, ok := diskserve.MapHost(t.disk, off, n, false)
	if !ok || !pageCached(hr.FD, hr.Off, n) {
		return false
	}
	r.file = hostSpan{fd: hr.FD, off: hr.Off, n: n}
	return true
}

// zeroRuns merges extents into alternating runs of data and of zeroes, at
// most max of them (the tail past that becomes data), in place.
func zeroRuns(ext []diskserve.Extent, max int) []diskserve.Extent {
	out := ext[:0]
	for _, e := range ext {
		e.Flags &= diskserve.ExtentZero
		if n := len(out); n > 0 && (out[n-1].Flags == e.Flags || n == max) {
			out[n-1].Len += e.Len
			out[n-1].Flags &= e.Flags
			continue
		}
		out = append(out, e)
	}
	return out
}

// blockStatus serves NBD_CMD_BLOCK_STATUS for base:allocation.
func (t *transmission) blockStatus(r *request) {
	off := int64(r.off)
	end := off + int64(r.length)
	ext := r.ext[:0]
	for pos := off; pos < end && len(ext) < maxDescriptors; pos += statusStep {
		var err error
		if ext, err = diskserve.Extents(t.disk, ext, pos, min(statusStep, end-pos)); err != nil {
			t.failed(r, err)
			return
		}
	}
	ext = diskserve.MergeExtents(ext)
	if len(ext) > maxDescriptors {
		ext = ext[:maxDescriptors]
	}
	if r.flags&cmdFlagReqOne != 0 {
		ext = ext[:1]
	}
	r.ext = ext
	p := r.buffer(4 + 8*len(ext))[:0]
	p = be.AppendUint32(p, contextIDBase)
	for _, e := range ext {
		p = be.AppendUint32(p, uint32(e.Len))
		p = be.AppendUint32(p, uint32(e.Flags))
	}
	r.chunk(replyFlagDone, chunkBlockStatus, int64(len(p)))
	r.out = append(r.out, p)
}

// cache serves NBD_CMD_CACHE by reading the range, which brings it into
// the page cache and the format's own caches.
func (t *transmission) cache(off, n int64, buf []byte) error {
	for n > 0 {
		c := min(n, int64(len(buf)))
		if got, err := t.disk.ReadAt(buf[:c], off); int64(got) != c {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}

// writeLoop sends replies as they become ready, all those that are ready
// at once together, and returns each request to the free list.
func (t *transmission) writeLoop() {
	var done []*request
	for r := range t.replies {
		done = append(done[:0], r)
		yielded := false
	more:
		for len(done) < requestsPerConn {
			select {
			case r, ok := <-t.replies:
				if !ok {
					break more
				}
				done = append(done, r)
			default:
				if yielded || len(t.free)+len(done) >= requestsPerConn {
					break more
				}
				// Other requests are being served: let them finish and
				// share this writev, the costliest call per request
				// (4k random reads at QD16: 10-20% more IOPS in 6 of 7 paired runs).
				runtime.Gosched()
				yielded = true
			}
		}
		t.sendReplies(done)
		for _, r := range done {
			t.release(r)
		}
	}
}

// send writes the replies of done in order: their bytes in one writev, or
// around each span of a host file, which goes with sendfile.
func (t *transmission) send(done []*request) error {
	batch := t.batch[:0]
	for _, r := range done {
		batch = append(batch, r.out...)
		if r.file.n == 0 {
			continue
		}
		if err := t.writev(batch); err != nil {
			return err
		}
		batch = batch[:0]
		if err := t.sock.sendfile(r.file); err != nil {
			return err
		}
	}
	t.batch = batch
	return t.writev(batch)
}

func (t *transmission) writev(batch net.Buffers) error {
	if len(batch) == 0 {
		return nil
	}
	var err error
	if t.sock != nil {
		err = t.sock.writev(batch)
	} else {
		t.bufs = batch // WriteTo consumes its receiver
		_, err = t.bufs.WriteTo(t.c)
	}
	clear(batch)
	return err
}

// release returns r and its buffer for reuse.
func (t *transmission) release(r *request) {
	t.unhold(r)
	t.free <- r
}

// unhold returns r's buffer and budget.
func (t *transmission) unhold(r *request) {
	r.reset()
	if r.cost > 0 {
		t.budget.Release(r.cost)
		r.cost = 0
	}
}
