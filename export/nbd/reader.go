package nbd

import (
	"bufio"
	"context"
	"fmt"
	"io"
)

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
		return int64(len(t.meta)) * statusBytes
	case cmdCache:
		return cacheStep
	}
	return 0
}
