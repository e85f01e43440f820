package async

import (
	"fmt"
	"sync"

	"github.com/diskserve/diskserve"
)

const defaultWorkers = 64

// A PoolEngine runs requests on a bounded set of goroutines that call the
// disk's methods. It works for every disk, and is the fallback where
// io_uring is missing.
type PoolEngine struct {
	d     diskserve.DiskFile
	queue chan *Request
	slots chan struct{} // one per request allowed in Do at once
	mu    sync.RWMutex  // held shared by Submit and Do, exclusive by Close
	shut  bool
	wg    sync.WaitGroup
}

// NewPool starts a pool of workers goroutines (64 if workers is 0) on d.
func NewPool(d diskserve.DiskFile, workers int) *PoolEngine {
	if workers <= 0 {
		workers = defaultWorkers
	}
	p := &PoolEngine{
		d:     d,
		queue: make(chan *Request, workers),
		slots: make(chan struct{}, workers),
	}
	for range workers {
		p.wg.Go(func() {
			for r := range p.queue {
				exec(p.d, r)
				complete(r)
			}
		})
	}
	return p
}

// Name returns "pool".
func (p *PoolEngine) Name() string { return string(Pool) }

// Submit queues r for a worker.
func (p *PoolEngine) Submit(r *Request) {
	p.mu.RLock()
	if p.shut {
		p.mu.RUnlock()
		closed(r)
		complete(r)
		return
	}
	p.queue <- r
	p.mu.RUnlock()
}

// Do runs r on the calling goroutine, taking one of the pool's slots so
// that no more than its workers run at once.
func (p *PoolEngine) Do(r *Request) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.shut {
		closed(r)
		return
	}
	p.slots <- struct{}{}
	exec(p.d, r)
	<-p.slots
}

// Close waits for every request submitted before it, and stops the
// workers.
func (p *PoolEngine) Close() error {
	p.mu.Lock()
	if !p.shut {
		p.shut = true
		close(p.queue)
	}
	p.mu.Unlock()
	p.wg.Wait()
	return nil
}

// closed fails r because its engine is closed.
func closed(r *Request) {
	r.N = 0
	r.Err = fmt.Errorf("%v at %d: %w", r.Op, r.Off, ErrClosed)
}
