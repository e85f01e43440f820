package raw

import (
	"sync/atomic"
	"time"
)

// A way is how a small write into cached pages reaches the page cache.
type way int

const (
	byStore  way = iota // a memory copy into the file's shared mapping
	byPwrite            // a pwrite system call
)

// A wayChooser picks, for each 2 MiB region of a file, the way small
// writes into cached pages go: the one whose recent writes there took less
// time. Which is cheaper depends on the page cache's folios, which no
// system call reports. In large folios (a file written or read in large
// pieces) a pwrite of a few pages walks the whole folio under the inode
// lock, and a store, which only faults the pages it touches, wins; in
// single-page folios (after random small writes, as a VM's disk is after
// a while) the store's page fault costs more than the whole pwrite. A
// region's first learnWrites writes take turns; after them the other way
// is tried now and then (once in exploreEvery writes, times the ratio of
// the two ways' costs), so that a region whose folios change is noticed.
// Regions are 2 MiB, the page cache's largest folio on x86-64.
//
// The table covers the store window in blocks of a GiB of regions,
// allocated as writes reach them. Its counters are updated without locks:
// a lost update only blurs a mean.
type wayChooser struct {
	blocks [storeWindow >> blockShift]atomic.Pointer[[1 << (blockShift - regionShift)]regionCost]
}

const (
	regionShift     = 21 // 2 MiB regions
	blockShift      = 30 // allocated a GiB of regions at a time
	exploreEvery    = 32 // the other way is tried once in exploreEvery writes, times
	maxExploreScale = 8  // how many times dearer it was, up to this
	learnWrites     = 8  // a region's first writes take turns
	// A write counts in a mean for at most twice the mean and slack, so
	// that one that was preempted or waited for writeback does not decide
	// a region alone; a lasting change still moves the mean within a few
	// writes.
	sampleSlack = int32(5 * time.Microsecond)
	maxSample   = int32(time.Millisecond)
)

// regionCost is what a region's writes took lately: a moving average of
// the nanoseconds per write of each way (0 while unmeasured), and the
// writes chosen so far.
type regionCost struct {
	mean   [2]atomic.Int32
	writes atomic.Uint32
}

// region returns the costs of the region holding off, which lies in the
// store window.
func (c *wayChooser) region(off int64) *regionCost {
	slot := &c.blocks[off>>blockShift]
	b := slot.Load()
	if b == nil {
		slot.CompareAndSwap(nil, new([1 << (blockShift - regionShift)]regionCost))
		b = slot.Load()
	}
	return &b[off>>regionShift&(1<<(blockShift-regionShift)-1)]
}

// pick returns the way for the region's next write.
func (r *regionCost) pick() way {
	n := r.writes.Add(1)
	if n <= learnWrites { // learning: take turns
		return way(n % 2)
	}
	store, pwrite := r.mean[byStore].Load(), r.mean[byPwrite].Load()
	best, other, ratio := byStore, byPwrite, pwrite/max(store, 1)
	if pwrite < store {
		best, other, ratio = byPwrite, byStore, store/max(pwrite, 1)
	}
	// The dearer the other way, the less often it is tried: a try costs
	// the difference.
	if n%(exploreEvery*uint32(min(max(ratio, 1), maxExploreScale))) == 0 {
		return other
	}
	return best
}

// record enters a write by w that took d into the region's mean: an
// exponential moving average, of weight 1/2 while the region learns and
// 1/4 after.
func (r *regionCost) record(w way, d time.Duration) {
	ns := int32(min(d, time.Duration(maxSample)))
	m := &r.mean[w]
	old := m.Load()
	if old == 0 {
		m.Store(max(ns, 1))
		return
	}
	ns = min(ns, 2*old+sampleSlack)
	shift := 2
	if r.writes.Load() <= learnWrites {
		shift = 1
	}
	m.Store(max(old+(ns-old)>>shift, 1))
}
