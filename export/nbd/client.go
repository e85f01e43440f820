package nbd

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// A Client is the least NBD client that uses an export, for benchmarks,
// tools and tests: fixed newstyle, OPT_GO, simple replies, READ, WRITE,
// FLUSH, TRIM and WRITE_ZEROES, any number of requests in flight on one
// connection (as fio's nbd engine keeps them). Its methods are safe for
// concurrent use. An error reply comes back as an [*Error].
type Client struct {
	c   net.Conn
	wmu sync.Mutex // one request on the wire at a time

	mu      sync.Mutex
	cookie  uint64
	pending map[uint64]*clientCall
	err     error
	done    chan struct{}
}

type clientCall struct {
	buf  []byte // READ data goes here
	done chan error
}

// Dial connects to the NBD server at addr (as [net.Dial] takes it) and
// attaches to export ("" for the default one).
func Dial(network, addr, export string) (*Client, error) {
	c, err := net.Dial(network, addr)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Client, error) {
		c.Close()
		return nil, fmt.Errorf("NBD handshake: %w", err)
	}
	var g [18]byte
	if _, err := io.ReadFull(c, g[:]); err != nil {
		return fail(err)
	}
	if be.Uint64(g[:]) != magicInit || be.Uint64(g[8:]) != magicOpt {
		return fail(errors.New("not a fixed newstyle server"))
	}
	msg := be.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	msg = be.AppendUint64(msg, magicOpt)
	msg = be.AppendUint32(msg, optGo)
	msg = be.AppendUint32(msg, uint32(4+len(export)+2))
	msg = be.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	msg = be.AppendUint16(msg, 0) // no info requests
	if _, err := c.Write(msg); err != nil {
		return fail(err)
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return fail(err)
		}
		typ, n := be.Uint32(h[12:]), be.Uint32(h[16:])
		if be.Uint64(h[:]) != magicOptReply || n > 1<<20 {
			return fail(errors.New("bad option reply"))
		}
		if _, err := io.CopyN(io.Discard, c, int64(n)); err != nil {
			return fail(err)
		}
		if typ&repErrBit != 0 {
			return fail(fmt.Errorf("server refused OPT_GO (reply %#x)", typ))
		}
		if typ == repAck {
			break
		}
	}
	cl := &Client{c: c, pending: map[uint64]*clientCall{}, done: make(chan struct{})}
	go cl.readReplies()
	return cl, nil
}

// readReplies hands each reply to the request waiting for it.
func (cl *Client) readReplies() {
	defer close(cl.done)
	var h [16]byte
	for {
		_, err := io.ReadFull(cl.c, h[:])
		if err == nil && be.Uint32(h[:]) != magicSimpleReply {
			err = errors.New("bad reply magic")
		}
		var call *clientCall
		if err == nil {
			cl.mu.Lock()
			call = cl.pending[be.Uint64(h[8:])]
			delete(cl.pending, be.Uint64(h[8:]))
			cl.mu.Unlock()
			if call == nil {
				err = errors.New("reply to no request")
			}
		}
		if err != nil {
			cl.mu.Lock()
			cl.err = err
			for k, p := range cl.pending {
				p.done <- err
				delete(cl.pending, k)
			}
			cl.mu.Unlock()
			return
		}
		if errno := be.Uint32(h[4:]); errno != 0 {
			call.done <- &Error{Errno: errno}
			continue
		}
		if call.buf != nil {
			if _, err := io.ReadFull(cl.c, call.buf); err != nil {
				call.done <- err
				continue
			}
		}
		call.done <- nil
	}
}

// An Error is an error reply of the server.
type Error struct {
	Errno uint32 // the NBD error: 1 EPERM, 5 EIO, 22 EINVAL, 28 ENOSPC, ...
}

func (e *Error) Error() string { return fmt.Sprintf("NBD error %d", e.Errno) }

// do sends one request and waits for its reply. p is READ's buffer or
// WRITE's payload; n is the length of the other commands.
func (cl *Client) do(cmd uint16, off int64, p []byte, n uint32) error {
	call := &clientCall{done: make(chan error, 1)}
	if cmd == cmdRead {
		call.buf = p
	}
	if p != nil {
		n = uint32(len(p))
	}
	cl.mu.Lock()
	if cl.err != nil {
		cl.mu.Unlock()
		return cl.err
	}
	cl.cookie++
	cookie := cl.cookie
	cl.pending[cookie] = call
	cl.mu.Unlock()
	var h [28]byte
	be.PutUint32(h[0:], magicRequest)
	be.PutUint16(h[6:], cmd)
	be.PutUint64(h[8:], cookie)
	be.PutUint64(h[16:], uint64(off))
	be.PutUint32(h[24:], n)
	bufs := net.Buffers{h[:]}
	if cmd == cmdWrite {
		bufs = append(bufs, p)
	}
	cl.wmu.Lock()
	_, err := bufs.WriteTo(cl.c)
	cl.wmu.Unlock()
	if err != nil {
		return err
	}
	return <-call.done
}

// ReadAt reads len(p) bytes at off of the export.
func (cl *Client) ReadAt(p []byte, off int64) (int, error) {
	if err := cl.do(cmdRead, off, p, 0); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off of the export.
func (cl *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := cl.do(cmdWrite, off, p, 0); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush asks the server to make every completed write durable.
func (cl *Client) Flush() error { return cl.do(cmdFlush, 0, nil, 0) }

// Trim asks the server to discard n bytes at off.
func (cl *Client) Trim(off int64, n uint32) error { return cl.do(cmdTrim, off, nil, n) }

// WriteZeroes asks the server to make n bytes at off read as zeroes.
func (cl *Client) WriteZeroes(off int64, n uint32) error {
	return cl.do(cmdWriteZeroes, off, nil, n)
}

// Close disconnects.
func (cl *Client) Close() error {
	var h [28]byte
	be.PutUint32(h[0:], magicRequest)
	be.PutUint16(h[6:], cmdDisc)
	cl.wmu.Lock()
	cl.c.Write(h[:])
	cl.wmu.Unlock()
	err := cl.c.Close()
	<-cl.done
	return err
}
