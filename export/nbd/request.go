package nbd

import (
	"errors"
	"math/bits"
	"sync"
	"syscall"

	"github.com/diskserve/diskserve"
)

// A request is one NBD request and, once served, its encoded reply. Request
// objects and their buffers are reused, so serving a request allocates
// nothing in the steady state.
type request struct {
	typ, flags uint16
	cookie     uint64
	off        uint64
	length     uint32

	cost int64              // bytes of the connection's budget held
	buf  *[]byte            // pooled buffer: WRITE payload, READ data, BLOCK_STATUS payload
	ext  []diskserve.Extent // scratch for READ and BLOCK_STATUS

	hdr  [hdrSpace]byte // reply headers; out points into it
	nhdr int
	out  [][]byte // the reply, as pieces for one writev
	file hostSpan // READ data sent from the page cache after out, if any
}

// A hostSpan is n bytes of a host file, sent with sendfile(2).
type hostSpan struct {
	fd     int
	off, n int64
}

// buffer returns a pooled buffer of n bytes, held until the request is
// released.
func (r *request) buffer(n int) []byte {
	if r.buf == nil || cap(*r.buf) < n {
		putBuffer(r.buf)
		r.buf = getBuffer(n)
	}
	return (*r.buf)[:n]
}

// payload returns the WRITE payload read into the buffer.
func (r *request) payload() []byte { return (*r.buf)[:r.length] }

// reset forgets the reply and returns the buffer to its pool.
func (r *request) reset() {
	putBuffer(r.buf)
	r.buf = nil
	r.nhdr = 0
	clear(r.out)
	r.out = r.out[:0]
	r.file = hostSpan{}
	if cap(r.ext) > 4096 { // a large BLOCK_STATUS: do not keep its memory
		r.ext = nil
	}
}

// header reserves n bytes of header space and adds them to the reply.
func (r *request) header(n int) []byte {
	h := r.hdr[r.nhdr : r.nhdr+n : r.nhdr+n]
	r.nhdr += n
	r.out = append(r.out, h)
	return h
}

// simple encodes a simple reply header.
func (r *request) simple(errno uint32) {
	h := r.header(16)[:0]
	h = be.AppendUint32(h, magicSimpleReply)
	h = be.AppendUint32(h, errno)
	be.AppendUint64(h, r.cookie)
}

// chunk encodes the header of a structured reply chunk whose payload is
// length bytes, and returns the header space after it, sized for the
// chunk's fixed fields (an offset, a hole size), which the caller appends.
func (r *request) chunk(flags, typ uint16, length int64) []byte {
	fixed := 0
	switch typ {
	case chunkOffsetData:
		fixed = 8
	case chunkOffsetHole:
		fixed = 12
	}
	h := r.header(20 + fixed)[:0]
	h = be.AppendUint32(h, magicStructReply)
	h = be.AppendUint16(h, flags)
	h = be.AppendUint16(h, typ)
	h = be.AppendUint64(h, r.cookie)
	h = be.AppendUint32(h, uint32(length))
	return h
}

// data encodes the header of a reply whose data, n bytes of the export
// from off, follows in one piece: a simple reply, or one OFFSET_DATA chunk
// that ends the reply.
func (r *request) data(structured bool, off, n int64) {
	if !structured {
		r.simple(0)
		return
	}
	h := r.chunk(replyFlagDone, chunkOffsetData, 8+n)
	be.AppendUint64(h, uint64(off))
}

// fail replaces the reply with an error: an error chunk carrying msg when
// structured replies were negotiated, a simple reply otherwise.
func (r *request) fail(structured bool, errno uint32, msg string) {
	r.nhdr = 0
	r.out = r.out[:0]
	r.file = hostSpan{}
	if !structured {
		r.simple(errno)
		return
	}
	if len(msg) > maxErrMsg {
		msg = msg[:maxErrMsg]
	}
	h := r.header(20 + 6 + len(msg))[:0]
	h = be.AppendUint32(h, magicStructReply)
	h = be.AppendUint16(h, replyFlagDone)
	h = be.AppendUint16(h, chunkError)
	h = be.AppendUint64(h, r.cookie)
	h = be.AppendUint32(h, uint32(6+len(msg)))
	h = be.AppendUint32(h, errno)
	h = be.AppendUint16(h, uint16(len(msg)))
	_ = append(h, msg...)
}

// errnoOf maps an error from serving r to the NBD error the client gets:
// [diskserve.Errno]'s class, in the few errors NBD has. Everything else
// is EIO.
func errnoOf(err error, r *request) uint32 {
	switch diskserve.Errno(err) {
	case syscall.EPERM, syscall.EROFS, syscall.EACCES:
		return errPerm
	case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
		if errors.Is(err, diskserve.ErrOutOfRange) && r.typ != cmdWrite && r.typ != cmdWriteZeroes {
			return errInval // a range error of a command that writes nothing
		}
		return errNoSpc
	case syscall.EOPNOTSUPP:
		if r.flags&cmdFlagFastZero != 0 {
			return errNotSup // the one case the spec allows ENOTSUP
		}
		return errInval
	case syscall.ENOMEM:
		return errNoMem
	case syscall.EINVAL:
		return errInval
	}
	return errIO
}

// Payload buffers are pooled by size class: powers of two from 4 KiB up to
// maxPayload (32 MiB = 1<<25). Pointers to slices are pooled, so Put does
// not allocate.
const (
	minBufferShift = 12
	maxBufferShift = 25
)

var bufferPools [maxBufferShift - minBufferShift + 1]sync.Pool

func bufferClass(n int) int {
	if n <= 1<<minBufferShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufferShift
}

func getBuffer(n int) *[]byte {
	c := bufferClass(n)
	if p, ok := bufferPools[c].Get().(*[]byte); ok {
		return p
	}
	b := make([]byte, 1<<(c+minBufferShift))
	return &b
}

func putBuffer(p *[]byte) {
	if p == nil {
		return
	}
	// Only buffers whose capacity is exactly a class size were made here.
	if c := bufferClass(cap(*p)); c < len(bufferPools) && 1<<(c+minBufferShift) == cap(*p) {
		bufferPools[c].Put(p)
	}
}
