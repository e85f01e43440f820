package cache

import (
	"sync"
	"sync/atomic"
	"time"
)

// readahead detects sequential reading and fetches ahead of it. Once a
// stream has stepped into two new chunks in order, it keeps half as many
// chunks ahead of it as it has read, up to max: a short run fetches
// little it will not read, a long one streams at full depth.
type readahead struct {
	mu    sync.Mutex
	last  int64 // highest chunk read in the current sequential stream
	steps int64 // chunks the stream has stepped into, in order
	ahead int64 // first chunk not yet asked for ahead
	max   int64
}

// reorder is how far behind or ahead of the stream a read may land and
// still count as part of it: clients keep several requests in flight, and
// they arrive in any order.
const reorder = 8

// readahead notes a read of chunks [first, last] and starts fetches ahead
// of a sequential stream, when GET slots are free: demand reads go first.
func (d *Disk) readahead(first, last int64) {
	ra := &d.ra
	ra.mu.Lock()
	switch {
	case first > ra.last+reorder || last+reorder < ra.last: // elsewhere
		ra.last, ra.steps, ra.ahead = last, 0, last+1
		ra.mu.Unlock()
		return
	case last <= ra.last: // within the stream
		ra.mu.Unlock()
		return
	}
	// A step forward, perhaps past a read still on its way: it counts
	// the chunks it read, not those it jumped.
	ra.steps += min(last-ra.last, last-first+1)
	ra.last = last
	window := min(ra.steps/2, ra.max)
	from := max(ra.ahead, ra.last+1)
	to := min(ra.last+1+window, d.n)
	if to-from < min(window, d.maxRun) && to < d.n {
		// Ask in runs as long as one GET takes: a GET costs a round
		// trip, whatever its length.
		ra.mu.Unlock()
		return
	}
	ra.ahead = max(ra.ahead, to)
	ra.mu.Unlock()
	for from < to {
		end := min(to, from+d.maxRun)
		if !d.fetchAhead(from, end, &d.stats.readahead) {
			// No GET slot was free: the next step asks again from here.
			ra.mu.Lock()
			ra.ahead = min(ra.ahead, from)
			ra.mu.Unlock()
			return
		}
		from = end
	}
}

// fetchAhead starts, in the background, fetches of the chunks of [first,
// end) that are neither present nor being fetched, if a GET slot is free,
// and counts a fetch it starts in started (if not nil). It reports false
// when no slot was free.
func (d *Disk) fetchAhead(first, end int64, started *atomic.Int64) bool {
	for first < end && d.s.state(first)&kindMask != absent {
		first++
	}
	if first == end {
		return true
	}
	if !d.sem.TryAcquire(1) {
		return false
	}
	d.mu.Lock()
	if _, busy := d.inflight[first]; busy || d.demand.Err() != nil {
		d.mu.Unlock()
		d.sem.Release(1)
		return true
	}
	end, st := d.claim(first, min(end, first+d.maxRun))
	d.bg.Add(1)
	d.mu.Unlock()
	if started != nil {
		started.Add(1)
	}
	go func() {
		defer d.bg.Done()
		defer d.sem.Release(1)
		d.fetchRun(d.demand, st, first, end)
	}()
	return true
}

// prefetchAll fetches every absent chunk, in order, at rate bytes per
// second at most, until the cache holds the whole object or Close.
func (d *Disk) prefetchAll(rate int64) {
	defer d.bg.Done()
	start := time.Now()
	var (
		mu      sync.Mutex
		next    int64 // the next chunk to look at
		fetched int64
		wg      sync.WaitGroup
	)
	lastLog := start
	d.log.Info("prefetching the whole image into the cache", "image", d.id.Name, "size", d.size, "rate", rate)
	work := func() {
		defer wg.Done()
		for d.ctx.Err() == nil {
			mu.Lock()
			for next < d.n && d.s.state(next)&kindMask != absent {
				next++
			}
			if next == d.n {
				mu.Unlock()
				return
			}
			first := next
			end := min(d.n, first+d.maxRun)
			next = end
			mu.Unlock()
			if d.sem.Acquire(d.ctx, 1) != nil {
				return
			}
			d.mu.Lock()
			if _, busy := d.inflight[first]; busy {
				d.mu.Unlock()
				d.sem.Release(1)
				continue
			}
			end, st := d.claim(first, end)
			d.mu.Unlock()
			d.fetchRun(d.ctx, st, first, end)
			d.sem.Release(1)

			mu.Lock()
			fetched += (end - first) * d.chunk
			due := start.Add(time.Duration(float64(fetched) / float64(rate) * float64(time.Second)))
			if now := time.Now(); now.Sub(lastLog) >= 10*time.Second {
				lastLog = now
				d.log.Info("prefetching", "image", d.id.Name, "done", float64(first)/float64(d.n))
			}
			mu.Unlock()
			select {
			case <-time.After(time.Until(due)):
			case <-d.ctx.Done():
			}
		}
	}
	wg.Add(prefetchStreams)
	for range prefetchStreams {
		go work()
	}
	wg.Wait()
	if d.ctx.Err() != nil {
		return
	}
	if st := d.State(); st.Chunks < d.n {
		d.log.Warn("prefetch incomplete: some chunks could not be fetched; reads fetch them", "image", d.id.Name, "chunks", st.Chunks, "of", d.n)
		return
	}
	d.log.Info("prefetch done: the whole image is in the cache", "image", d.id.Name, "seconds", time.Since(start).Seconds())
}
