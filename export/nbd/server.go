// Package nbd serves diskserve disks over the Network Block Device
// protocol.
//
// It implements the protocol as specified in doc/proto.md of the
// NetworkBlockDevice/nbd project, rather than building on an existing Go
// package: github.com/pojntfx/go-nbd (v0.3.2) serves only READ, WRITE and
// DISC, one request at a time, and has crash and desynchronisation bugs,
// so using it would mean replacing all of it.
//
// # Supported
//
// Handshake: fixed newstyle with NO_ZEROES; EXPORT_NAME, ABORT, LIST, INFO
// and GO (export, name, description and block-size information),
// STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT with
// base:allocation, and STARTTLS with x509 certificates. Other options,
// extended headers among them, are answered NBD_REP_ERR_UNSUP.
//
// Transmission: READ (with sparse structured replies: holes go as
// OFFSET_HOLE chunks), WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES (with
// NO_HOLE and FAST_ZERO), BLOCK_STATUS (with REQ_ONE), and FUA on every
// command. Simple replies go to clients that did not ask for structured
// ones (the Linux kernel).
//
// # Concurrency
//
// Each connection has one goroutine reading requests, a fixed pool of
// workers serving them in parallel, and one goroutine writing replies, in
// whatever order they complete, batched into one writev. All connections to
// an export share its [diskserve.DiskFile], so a FLUSH on any connection
// makes every completed write durable, and the server advertises
// NBD_FLAG_CAN_MULTI_CONN.
package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/diskserve/diskserve"
)

// An Export is a disk offered to clients under a name.
type Export struct {
	Name        string // "" is the default export
	Description string // shown by nbdinfo --list; optional
	Disk        diskserve.DiskFile
	// Bitmaps names dirty bitmaps of Disk ([diskserve.BitmapKeeper]) that
	// clients may read with BLOCK_STATUS, each as the metadata context
	// qemu:dirty-bitmap:NAME (as qemu-nbd -B offers them).
	Bitmaps []string
	// AllocationDepth offers the metadata context qemu:allocation-depth:
	// which layer of the disk's backing chain holds each range
	// ([diskserve.AllocationDepths]), as qemu-nbd -A does.
	AllocationDepth bool
}

// TLSMode says whether clients must use TLS.
type TLSMode int

const (
	// TLSRequire refuses every option but STARTTLS and ABORT until the
	// connection is encrypted.
	TLSRequire TLSMode = iota
	// TLSAllow lets clients choose.
	TLSAllow
)

// Options configure a [Server]. The zero value serves without TLS.
type Options struct {
	// TLS, if not nil, enables STARTTLS with this configuration.
	TLS *tls.Config
	// TLSMode applies when TLS is set.
	TLSMode TLSMode
	// Logger receives connection events and errors; nil discards them.
	Logger *slog.Logger
	// HandshakeTimeout bounds the negotiation phase of a connection; 0
	// means 10 seconds, as in qemu.
	HandshakeTimeout time.Duration
}

// ErrServerClosed is returned by [Server.Serve] after [Server.Shutdown].
var ErrServerClosed = errors.New("nbd: server closed")

// A Server serves a fixed set of exports. Its methods may be called
// concurrently.
type Server struct {
	exports []Export // in listing order
	opts    Options
	log     *slog.Logger

	mu        sync.Mutex
	closing   bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]*transmission // nil value: still negotiating
	active    sync.WaitGroup             // connection goroutines
}

// NewServer returns a server for exports, whose names must be distinct.
// The server does not own the disks: closing them is the caller's job,
// after [Server.Shutdown].
func NewServer(exports []Export, opts Options) (*Server, error) {
	seen := map[string]bool{}
	for _, e := range exports {
		switch {
		case seen[e.Name]:
			return nil, fmt.Errorf("nbd: export %q listed twice", e.Name)
		case len(e.Name) > maxStringLen || len(e.Description) > maxStringLen:
			return nil, fmt.Errorf("nbd: export %q: name or description longer than %d bytes", e.Name, maxStringLen)
		case e.Disk == nil:
			return nil, fmt.Errorf("nbd: export %q has no disk", e.Name)
		case len(e.Bitmaps) > maxBitmaps:
			return nil, fmt.Errorf("nbd: export %q: more than %d bitmaps", e.Name, maxBitmaps)
		}
		for _, b := range e.Bitmaps {
			if _, err := diskserve.FindDirtyBitmap(e.Disk, b); err != nil {
				return nil, fmt.Errorf("nbd: export %q: %w", e.Name, err)
			}
		}
		seen[e.Name] = true
	}
	if opts.HandshakeTimeout == 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{
		exports:   exports,
		opts:      opts,
		log:       log,
		listeners: map[net.Listener]struct{}{},
		conns:     map[net.Conn]*transmission{},
	}, nil
}

func (s *Server) export(name string) *Export {
	for i := range s.exports {
		if s.exports[i].Name == name {
			return &s.exports[i]
		}
	}
	return nil
}

// Serve accepts connections on l and serves each in its own goroutine,
// until l is closed or [Server.Shutdown] is called; after Shutdown it
// returns [ErrServerClosed]. Serve closes l.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	backoff := 5 * time.Millisecond
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			switch {
			case closing:
				return ErrServerClosed
			case errors.Is(err, net.ErrClosed):
				return err
			}
			// Out of descriptors, say: wait and try again, as net/http
			// does, rather than stop serving everyone.
			s.log.Warn("accept failed", "err", err)
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		if !s.track(c) {
			c.Close()
			return ErrServerClosed
		}
		go func() {
			defer s.active.Done()
			s.serve(c)
		}()
	}
}

// ServeConn serves one connection, returning when it ends. The server
// closes c.
func (s *Server) ServeConn(c net.Conn) {
	if !s.track(c) {
		c.Close()
		return
	}
	defer s.active.Done()
	s.serve(c)
}

// track registers c, unless the server is shutting down.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.conns[c] = nil
	s.active.Add(1)
	return true
}

func (s *Server) serve(c net.Conn) {
	log := s.log.With("remote", c.RemoteAddr().String())
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	t, err := s.negotiate(c, log)
	if err != nil {
		log.Info("negotiation failed", "err", err)
		return
	}
	if t == nil { // the client aborted
		return
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		t.c.Close()
		return
	}
	s.conns[c] = t
	s.mu.Unlock()
	t.serve()
}

// Clients returns how many connections are attached to the export called
// name (past negotiation).
func (s *Server) Clients(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, t := range s.conns {
		if t != nil && t.exp.Name == name {
			n++
		}
	}
	return n
}

// Shutdown stops accepting connections, ends negotiations, lets every
// connection finish the requests it has read, and flushes every export. It
// returns when all that is done or ctx ends, whichever is first.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	for c, t := range s.conns {
		if t == nil {
			c.Close() // still negotiating
		} else {
			t.stop()
		}
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.active.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	var errs []error
	for _, e := range s.exports {
		if err := diskserve.Flush(e.Disk); err != nil {
			errs = append(errs, fmt.Errorf("flush export %q: %w", e.Name, err))
		}
	}
	return errors.Join(errs...)
}
