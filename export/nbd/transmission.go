package nbd

import (
	"bufio"
	"errors"
	"io"
	"log/slog"
	"net"
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
	unixSendBuffer = 4 << 20
	stopGrace      = 10 * time.Second // for a client to read its last replies at shutdown
	cacheStep      = 1 << 20          // the buffer CACHE reads into

	// prefetchQueue CACHE ranges at most wait for a connection's
	// prefetcher; past that a CACHE reads its range before its reply.
	prefetchQueue = 16

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
	flags      uint16        // transmission flags sent to the client
	structured bool          // structured replies negotiated
	meta       []metaContext // the metadata contexts selected, by ID - 1

	budget   *semaphore.Weighted // bytes of buffers in flight
	free     chan *request       // request objects not in use
	work     chan *request       // requests for the workers
	replies  chan *request       // requests whose reply is ready
	stopping atomic.Bool
	prefetch chan [2]int64 // CACHE ranges for the prefetcher: offset, length
	ended    atomic.Bool   // the reader has stopped: the prefetcher drops what is left
	hdr      [28]byte      // the request header being read; reader only
	cached   []*request    // READs the reader served, replies not yet sent; reader only
	noCached bool          // the host file refused RWF_NOWAIT; reader only

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

func newTransmission(s *Server, e *Export, c net.Conn, log *slog.Logger, structured bool, meta []string) *transmission {
	t := &transmission{
		s:          s,
		exp:        e,
		disk:       e.Disk,
		size:       e.Disk.Size(),
		c:          c,
		log:        log,
		flags:      exportFlags(e.Disk, structured),
		structured: structured,
		meta:       selectContexts(e, meta),
		budget:     semaphore.NewWeighted(bytesPerConn),
		free:       make(chan *request, requestsPerConn),
		work:       make(chan *request, requestsPerConn),
		replies:    make(chan *request, requestsPerConn),
		prefetch:   make(chan [2]int64, prefetchQueue),
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
		// READ reply, so a large read would take several wake-ups of
		// the client. TCP keeps its autotuning, which a fixed size
		// would turn off.
		uc.SetWriteBuffer(unixSendBuffer)
	}
	t.log.Info("client attached", "structured", t.structured, "block-status", len(t.meta) > 0)
	var workers, writer, prefetcher sync.WaitGroup
	prefetcher.Go(t.prefetchLoop)
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
	t.ended.Store(true)
	close(t.work)
	workers.Wait()
	close(t.prefetch)
	prefetcher.Wait()
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
