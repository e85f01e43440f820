package control

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/diskserve/diskserve/remote/cache"
)

// remoteCollector exports the counters of the block caches of the remote
// images open in the process, labelled by the export that opened each (as
// [Metrics.RemoteOf] records it; "" for none) and by image (its URL
// without credentials). Caches of one export and image add up.
type remoteCollector struct {
	counters []remoteCounter
	cached   *prometheus.Desc
	latency  *prometheus.Desc

	mu      sync.Mutex
	exports map[*cache.Disk]string
}

type remoteCounter struct {
	desc *prometheus.Desc
	get  func(cache.Snapshot) int64
}

func newRemoteCollector() *remoteCollector {
	label := []string{"export", "image"}
	counter := func(name, help string, get func(cache.Snapshot) int64) remoteCounter {
		return remoteCounter{prometheus.NewDesc("diskserve_remote_"+name, help, label, nil), get}
	}
	return &remoteCollector{
		counters: []remoteCounter{
			counter("gets_total", "GETs of remote data (a retried GET counts once).", func(s cache.Snapshot) int64 { return s.GETs }),
			counter("fetched_bytes_total", "Bytes fetched into the block cache.", func(s cache.Snapshot) int64 { return s.Fetched }),
			counter("hit_bytes_total", "Bytes read that were in the cache.", func(s cache.Snapshot) int64 { return s.HitBytes }),
			counter("miss_bytes_total", "Bytes read that waited for a fetch.", func(s cache.Snapshot) int64 { return s.MissBytes }),
			counter("readahead_total", "Fetches started ahead of a sequential reader.", func(s cache.Snapshot) int64 { return s.Readahead }),
			counter("retries_total", "Requests tried again after a failure that may pass.", func(s cache.Snapshot) int64 { return s.Retries }),
			counter("failures_total", "Fetches that failed after every try.", func(s cache.Snapshot) int64 { return s.Failures }),
			counter("evictions_total", "Chunks evicted to keep within --cache-size.", func(s cache.Snapshot) int64 { return s.Evictions }),
		},
		cached:  prometheus.NewDesc("diskserve_remote_cached_bytes", "Bytes of data in the block cache.", label, nil),
		latency: prometheus.NewDesc("diskserve_remote_fetch_seconds", "Time a fetch took, retries included.", label, nil),
		exports: map[*cache.Disk]string{},
	}
}

// RemoteOf runs open, which opens the image of the export called name,
// and labels the remote images it opened (the image itself, backing
// files, components) with the export, in the metrics.
func (m *Metrics) RemoteOf(name string, open func() error) error {
	before := map[*cache.Disk]bool{}
	cache.Each(func(d *cache.Disk) { before[d] = true })
	err := open()
	m.remote.mu.Lock()
	defer m.remote.mu.Unlock()
	cache.Each(func(d *cache.Disk) {
		if !before[d] {
			m.remote.exports[d] = name
		}
	})
	return err
}

func (c *remoteCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, rc := range c.counters {
		ch <- rc.desc
	}
	ch <- c.cached
	ch <- c.latency
}

func (c *remoteCollector) Collect(ch chan<- prometheus.Metric) {
	type key struct{ export, image string }
	byKey := map[key]*cache.Snapshot{}
	var keys []key
	c.mu.Lock()
	defer c.mu.Unlock()
	open := map[*cache.Disk]bool{}
	cache.Each(func(d *cache.Disk) {
		open[d] = true
		s := d.Stats().Snapshot()
		k := key{c.exports[d], s.Name}
		if t, ok := byKey[k]; ok {
			t.Add(s)
			return
		}
		byKey[k] = &s
		keys = append(keys, k)
	})
	for d := range c.exports {
		if !open[d] {
			delete(c.exports, d) // closed
		}
	}
	for _, k := range keys {
		s := byKey[k]
		for _, rc := range c.counters {
			ch <- prometheus.MustNewConstMetric(rc.desc, prometheus.CounterValue, float64(rc.get(*s)), k.export, k.image)
		}
		ch <- prometheus.MustNewConstMetric(c.cached, prometheus.GaugeValue, float64(s.Cached), k.export, k.image)
		buckets := map[float64]uint64{}
		var cum uint64
		for i, le := range cache.LatencyBuckets {
			cum += s.LatencyCounts[i]
			buckets[le] = cum
		}
		ch <- prometheus.MustNewConstHistogram(c.latency, s.LatencyObserved, s.LatencySeconds, buckets, k.export, k.image)
	}
}
