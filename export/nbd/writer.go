package nbd

import (
	"net"
	"runtime"
)

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
				// share this writev, the costliest call per request.
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
