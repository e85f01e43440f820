package control

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/diskserve/diskserve"
)

// Metrics are the Prometheus metrics of every export's requests, and of
// the block caches of remote images.
type Metrics struct {
	requests *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	errors   *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	remote   *remoteCollector
}

// NewMetrics registers the metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	labels := []string{"export", "op"}
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "diskserve_requests_total", Help: "Requests served, by export and operation."}, labels),
		bytes:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "diskserve_bytes_total", Help: "Bytes read or written, by export and operation."}, labels),
		errors:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "diskserve_errors_total", Help: "Requests that failed, by export and operation."}, labels),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "diskserve_request_seconds", Help: "Time to serve a request, by export and operation.",
			Buckets: prometheus.ExponentialBuckets(1e-6, 4, 12), // 1 µs to 4 s
		}, labels),
	}
	m.remote = newRemoteCollector()
	reg.MustRegister(m.requests, m.bytes, m.errors, m.latency, m.remote)
	return m
}

// Metered counts the requests to d as those of the export called name.
func (m *Metrics) Metered(name string, d diskserve.DiskFile) diskserve.DiskFile {
	md := &metered{Passthrough: diskserve.Passthrough{D: d}}
	for op := range numOps {
		l := prometheus.Labels{"export": name, "op": opNames[op]}
		md.ops[op] = opMetrics{m.requests.With(l), m.bytes.With(l), m.errors.With(l), m.latency.With(l)}
	}
	return md
}

type op int

const (
	opRead op = iota
	opWrite
	opFlush
	opZero
	opPunch
	numOps
)

var opNames = [numOps]string{"read", "write", "flush", "write_zeroes", "punch_hole"}

type opMetrics struct {
	requests, bytes, errors prometheus.Counter
	latency                 prometheus.Observer
}

// metered is a disk whose requests are counted.
type metered struct {
	diskserve.Passthrough
	ops [numOps]opMetrics
}

func (m *metered) done(o op, start time.Time, n int64, err error) {
	om := &m.ops[o]
	om.requests.Inc()
	om.bytes.Add(float64(n))
	if err != nil {
		om.errors.Inc()
	}
	om.latency.Observe(time.Since(start).Seconds())
}

func (m *metered) ReadAt(p []byte, off int64) (int, error) {
	start := time.Now()
	n, err := m.D.ReadAt(p, off)
	if err != nil && n == len(p) { // io.EOF at the very end is a full read
		m.done(opRead, start, int64(n), nil)
		return n, err
	}
	m.done(opRead, start, int64(n), err)
	return n, err
}

func (m *metered) WriteAt(p []byte, off int64) (int, error) {
	start := time.Now()
	n, err := m.D.WriteAt(p, off)
	m.done(opWrite, start, int64(n), err)
	return n, err
}

func (m *metered) Flush() error {
	start := time.Now()
	err := m.Passthrough.Flush()
	m.done(opFlush, start, 0, err)
	return err
}

func (m *metered) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	start := time.Now()
	err := m.Passthrough.WriteZeroesAt(off, n, flags)
	m.done(opZero, start, n, err)
	return err
}

func (m *metered) PunchHole(off, n int64) error {
	start := time.Now()
	err := m.Passthrough.PunchHole(off, n)
	m.done(opPunch, start, n, err)
	return err
}
