package nbd

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// A Client is the least NBD client that reads and writes an export, for
// benchmarks and tools: fixed newstyle, OPT_GO to the default export,
// simple replies, any number of requests in flight on one connection (as
// fio's nbd engine keeps them). Its methods are safe for concurrent use.
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
// attaches to its default export.
func Dial(network, addr string) (*Client, error) {
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
	msg = be.AppendUint32(msg, 6) // empty name, no info requests
	msg = be.AppendUint32(msg, 0)
	msg = be.AppendUint16(msg, 0)
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
			call.done <- fmt.Errorf("NBD error %d", errno)
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

// do sends one request and waits for its reply.
func (cl *Client) do(cmd uint16, off int64, p []byte) error {
	call := &clientCall{done: make(chan error, 1)}
	if cmd == cmdRead {
		call.buf = p
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
	be.PutUint32(h[24:], uint32(len(p)))
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
	if err := cl.do(cmdRead, off, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off of the export.
func (cl *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := cl.do(cmdWrite, off, p); err != nil {
		return 0, err
	}
	return len(p), nil
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
