package nbd

import (
	"bytes"
	"errors"
	"io"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// This file holds a minimal NBD client that speaks the wire format
// directly, so that tests can send what real clients never would.

// start serves exports on a Unix socket and returns its path. The server is
// shut down when the test ends.
func start(t testing.TB, exports []Export, opts Options) (*Server, string) {
	t.Helper()
	srv, err := NewServer(exports, opts)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Shutdown(t.Context())
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return srv, path
}

type client struct {
	t testing.TB
	c net.Conn
}

// dial connects and reads the greeting; it sends no client flags yet.
func dial(t testing.TB, path string) *client {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	cl := &client{t: t, c: c}
	g := cl.read(18)
	if be.Uint64(g) != magicInit || be.Uint64(g[8:]) != magicOpt || be.Uint16(g[16:]) != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("greeting % x", g)
	}
	return cl
}

// connect dials and sends the usual client flags.
func connect(t testing.TB, path string) *client {
	cl := dial(t, path)
	cl.u32(flagFixedNewstyle | flagNoZeroes)
	return cl
}

func (cl *client) write(b []byte) {
	cl.t.Helper()
	if _, err := cl.c.Write(b); err != nil {
		cl.t.Fatalf("write: %v", err)
	}
}

func (cl *client) u32(v uint32) { cl.write(be.AppendUint32(nil, v)) }

func (cl *client) read(n int) []byte {
	cl.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(cl.c, b); err != nil {
		cl.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// closed checks that the server closed the connection.
func (cl *client) closed() {
	cl.t.Helper()
	cl.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	n, err := cl.c.Read(b[:])
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		cl.t.Fatalf("connection still open (read %d bytes, %v)", n, err)
	}
}

func (cl *client) option(opt uint32, data []byte) {
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, uint32(len(data)))
	cl.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (cl *client) optReply() optReply {
	cl.t.Helper()
	h := cl.read(20)
	if be.Uint64(h) != magicOptReply {
		cl.t.Fatalf("option reply magic %#x", be.Uint64(h))
	}
	return optReply{be.Uint32(h[8:]), be.Uint32(h[12:]), cl.read(int(be.Uint32(h[16:])))}
}

// expect reads one option reply and checks its option and type.
func (cl *client) expect(opt, typ uint32) optReply {
	cl.t.Helper()
	r := cl.optReply()
	if r.opt != opt || r.typ != typ {
		cl.t.Fatalf("option %d: reply %d type %#x (%q), want type %#x", opt, r.opt, r.typ, r.data, typ)
	}
	return r
}

// nameData encodes the name-and-list body of INFO, GO and the meta context
// options.
func nameData(name string, tail []byte) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	return append(append(b, name...), tail...)
}

func infoData(name string, infos ...uint16) []byte {
	t := be.AppendUint16(nil, uint16(len(infos)))
	for _, i := range infos {
		t = be.AppendUint16(t, i)
	}
	return nameData(name, t)
}

func metaData(name string, queries ...string) []byte {
	t := be.AppendUint32(nil, uint32(len(queries)))
	for _, q := range queries {
		t = be.AppendUint32(t, uint32(len(q)))
		t = append(t, q...)
	}
	return nameData(name, t)
}

// goExport negotiates GO for name and returns the transmission flags.
func (cl *client) goExport(name string) uint16 {
	cl.t.Helper()
	cl.option(optGo, infoData(name))
	var flags uint16
	for {
		r := cl.optReply()
		switch {
		case r.typ == repAck:
			return flags
		case r.typ == repInfo && be.Uint16(r.data) == infoExport:
			flags = be.Uint16(r.data[10:])
		case r.typ != repInfo:
			cl.t.Fatalf("GO: reply type %#x: %q", r.typ, r.data)
		}
	}
}

// structured negotiates structured replies and base:allocation, then GO.
func (cl *client) structured(name string) uint16 {
	cl.t.Helper()
	cl.option(optStructuredReply, nil)
	cl.expect(optStructuredReply, repAck)
	cl.option(optSetMetaContext, metaData(name, contextBaseAllocation))
	cl.expect(optSetMetaContext, repMetaContext)
	cl.expect(optSetMetaContext, repAck)
	return cl.goExport(name)
}

// attach connects and enters transmission on the default export, with
// structured replies and base:allocation or with neither.
func attach(t testing.TB, path string, structured bool) *client {
	cl := connect(t, path)
	if structured {
		cl.structured("")
	} else {
		cl.goExport("")
	}
	return cl
}

// requestHeader encodes the header of a request.
func requestHeader(typ, flags uint16, cookie, off uint64, length uint32) []byte {
	b := be.AppendUint32(nil, magicRequest)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	b = be.AppendUint64(b, off)
	return be.AppendUint32(b, length)
}

func (cl *client) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	cl.write(append(requestHeader(typ, flags, cookie, off, length), payload...))
}

// simple reads a simple reply and returns its error and cookie.
func (cl *client) simple() (errno uint32, cookie uint64) {
	cl.t.Helper()
	h := cl.read(16)
	if be.Uint32(h) != magicSimpleReply {
		cl.t.Fatalf("simple reply magic %#x", be.Uint32(h))
	}
	return be.Uint32(h[4:]), be.Uint64(h[8:])
}

type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

func (cl *client) chunk() chunk {
	cl.t.Helper()
	h := cl.read(20)
	if be.Uint32(h) != magicStructReply {
		cl.t.Fatalf("structured reply magic %#x", be.Uint32(h))
	}
	return chunk{be.Uint16(h[4:]), be.Uint16(h[6:]), be.Uint64(h[8:]), cl.read(int(be.Uint32(h[16:])))}
}

// structuredRead reads the chunks of one READ reply into buf (which covers
// the request at off) and returns the chunks' types in order, or the error.
func (cl *client) structuredRead(cookie uint64, off int64, buf []byte) (types []uint16, errno uint32) {
	cl.t.Helper()
	for {
		c := cl.chunk()
		if c.cookie != cookie {
			cl.t.Fatalf("chunk for cookie %d, want %d", c.cookie, cookie)
		}
		types = append(types, c.typ)
		switch c.typ {
		case chunkOffsetData:
			o := int64(be.Uint64(c.payload)) - off
			copy(buf[o:], c.payload[8:])
		case chunkOffsetHole:
			o := int64(be.Uint64(c.payload)) - off
			clear(buf[o : o+int64(be.Uint32(c.payload[8:]))])
		case chunkError:
			errno = be.Uint32(c.payload)
		case chunkNone:
		default:
			cl.t.Fatalf("unexpected chunk type %d", c.typ)
		}
		if c.flags&replyFlagDone != 0 {
			return types, errno
		}
	}
}

// sparseDisk is an in-memory disk that reports every all-zero 4 KiB block
// as a hole, so tests can check sparse reads and block status.
type sparseDisk struct{ *disktest.Memory }

func (d sparseDisk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	p := make([]byte, n)
	d.ReadAt(p, off)
	for pos := int64(0); pos < n; {
		end := min((off+pos)/4096*4096+4096-off, n)
		var fl diskserve.ExtentFlags
		if bytes.Count(p[pos:end], []byte{0}) == int(end-pos) {
			fl = diskserve.ExtentHole | diskserve.ExtentZero
		}
		dst = append(dst, diskserve.Extent{Off: off + pos, Len: end - pos, Flags: fl})
		pos = end
	}
	return dst, nil
}

// failingDisk fails every read at or past failAt with EIO.
type failingDisk struct {
	*disktest.Memory
	failAt int64
}

func (d failingDisk) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > d.failAt {
		return 0, syscall.EIO
	}
	return d.Memory.ReadAt(p, off)
}
