package cache

import (
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Stats count what one open cache did.
type Stats struct {
	Name string // the object, without credentials

	gets      atomic.Int64 // GETs started (retries not counted)
	fetched   atomic.Int64 // bytes fetched into the cache
	hitBytes  atomic.Int64 // bytes read from chunks already present
	missBytes atomic.Int64 // bytes read that waited for a fetch
	readahead atomic.Int64 // fetches started ahead of a sequential reader
	failures  atomic.Int64 // fetches that failed
	evictions atomic.Int64 // chunks evicted
	cached    atomic.Int64 // bytes of present chunks
	retries   func() int64 // requests tried again, counted by the source

	mu       sync.Mutex
	buckets  [len(LatencyBuckets) + 1]uint64
	seconds  float64
	observed uint64
}

// LatencyBuckets are the upper bounds, in seconds, of the histogram of
// fetch latencies.
var LatencyBuckets = [...]float64{0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30}

// A Snapshot is a copy of a [Stats].
type Snapshot struct {
	Name                                                    string
	GETs, Fetched, HitBytes, MissBytes, Readahead, Failures int64
	Evictions, Cached, Retries                              int64
	LatencyCounts                                           [len(LatencyBuckets) + 1]uint64 // per bucket, the last one unbounded
	LatencySeconds                                          float64
	LatencyObserved                                         uint64
}

// A Retrier is a [Source] that counts the requests it tried again.
type Retrier interface{ Retries() int64 }

// Add adds the counters of o to s.
func (s *Snapshot) Add(o Snapshot) {
	s.GETs += o.GETs
	s.Fetched += o.Fetched
	s.HitBytes += o.HitBytes
	s.MissBytes += o.MissBytes
	s.Readahead += o.Readahead
	s.Failures += o.Failures
	s.Evictions += o.Evictions
	s.Cached += o.Cached
	s.Retries += o.Retries
	for i := range s.LatencyCounts {
		s.LatencyCounts[i] += o.LatencyCounts[i]
	}
	s.LatencySeconds += o.LatencySeconds
	s.LatencyObserved += o.LatencyObserved
}

func newStats(src Source) *Stats {
	s := &Stats{Name: src.Identity().Name, retries: func() int64 { return 0 }}
	if r, ok := src.(Retrier); ok {
		s.retries = r.Retries
	}
	return s
}

func (s *Stats) observe(d time.Duration) {
	sec := d.Seconds()
	i := 0
	for i < len(LatencyBuckets) && sec > LatencyBuckets[i] {
		i++
	}
	s.mu.Lock()
	s.buckets[i]++
	s.seconds += sec
	s.observed++
	s.mu.Unlock()
}

// Snapshot copies the counters.
func (s *Stats) Snapshot() Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Snapshot{
		Name: s.Name, GETs: s.gets.Load(), Fetched: s.fetched.Load(),
		HitBytes: s.hitBytes.Load(), MissBytes: s.missBytes.Load(),
		Readahead: s.readahead.Load(), Failures: s.failures.Load(),
		Evictions: s.evictions.Load(), Cached: s.cached.Load(), Retries: s.retries(),
		LatencyCounts: s.buckets, LatencySeconds: s.seconds, LatencyObserved: s.observed,
	}
}

// Stats returns the disk's counters.
func (d *Disk) Stats() *Stats { return d.stats }

var (
	openMu sync.Mutex
	open   = map[*Disk]bool{}
)

func register(d *Disk) {
	openMu.Lock()
	open[d] = true
	openMu.Unlock()
}

func unregister(d *Disk) {
	openMu.Lock()
	delete(open, d)
	openMu.Unlock()
}

// Each calls fn with every cache open in the process, in the order of
// their names.
func Each(fn func(*Disk)) {
	openMu.Lock()
	list := make([]*Disk, 0, len(open))
	for d := range open {
		list = append(list, d)
	}
	openMu.Unlock()
	slices.SortFunc(list, func(a, b *Disk) int { return strings.Compare(a.id.Name, b.id.Name) })
	for _, d := range list {
		fn(d)
	}
}
