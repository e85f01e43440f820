package control

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/diskserve/diskserve/remote/cache"
)

// remoteCollector exports the counters of the block caches of the remote
// images open in the process, labelled by image (its URL without
// credentials). Two opens of one image add up.
type remoteCollector struct {
	counters []remoteCounter
	cached   *prometheus.Desc
	latency  *prometheus.Desc
}

type remoteCounter struct {
	desc *prometheus.Desc
	get  func(cache.Snapshot) int64
}

func newRemoteCollector() *remoteCollector {
	label := []string{"image"}
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
	}
}

func (c *remoteCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, rc := range c.counters {
		ch <- rc.desc
	}
	ch <- c.cached
	ch <- c.latency
}

func (c *remoteCollector) Collect(ch chan<- prometheus.Metric) {
	byImage := map[string]*cache.Snapshot{}
	var names []string
	cache.Each(func(d *cache.Disk) {
		s := d.Stats().Snapshot()
		if t, ok := byImage[s.Name]; ok {
			t.Add(s)
			return
		}
		byImage[s.Name] = &s
		names = append(names, s.Name)
	})
	for _, name := range names {
		s := byImage[name]
		for _, rc := range c.counters {
			ch <- prometheus.MustNewConstMetric(rc.desc, prometheus.CounterValue, float64(rc.get(*s)), name)
		}
		ch <- prometheus.MustNewConstMetric(c.cached, prometheus.GaugeValue, float64(s.Cached), name)
		buckets := map[float64]uint64{}
		var cum uint64
		for i, le := range cache.LatencyBuckets {
			cum += s.LatencyCounts[i]
			buckets[le] = cum
		}
		ch <- prometheus.MustNewConstHistogram(c.latency, s.LatencyObserved, s.LatencySeconds, buckets, name)
	}
}
