package remotetest

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A Proxy forwards requests to a server, keeping the Host header (so that
// signed S3 requests stay valid), counts them, and injects latency and
// faults as the test sets them.
type Proxy struct {
	URL string

	Requests atomic.Int64 // requests received
	GETs     atomic.Int64 // GETs with a Range
	Bytes    atomic.Int64 // bytes of response bodies sent
	Faults   atomic.Int64 // requests failed on purpose

	latency  atomic.Int64 // nanoseconds slept before each request
	failRate atomic.Uint64
	stall    atomic.Bool

	target    *url.URL
	transport *http.Transport
	mu        sync.Mutex
	rnd       *rand.Rand
	ranges    [][2]int64 // [first, last] of each ranged GET answered in full
}

// Ranges returns the byte ranges, [first, last], of the ranged GETs
// answered in full so far.
func (p *Proxy) Ranges() [][2]int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([][2]int64(nil), p.ranges...)
}

// NewProxy starts a proxy to target until the test ends.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	p, stop, err := StartProxy(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return p
}

// StartProxy starts a proxy to target, until stop.
func StartProxy(target string) (p *Proxy, stop func(), err error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, nil, err
	}
	p = &Proxy{target: u, rnd: rand.New(rand.NewPCG(1, 2))}
	p.transport = http.DefaultTransport.(*http.Transport).Clone()
	p.transport.MaxIdleConnsPerHost = 64
	s := httptest.NewServer(p)
	p.URL = s.URL
	return p, func() {
		p.stall.Store(false)
		s.CloseClientConnections()
		s.Close()
		p.transport.CloseIdleConnections()
	}, nil
}

// SetLatency makes every request wait d before it is forwarded.
func (p *Proxy) SetLatency(d time.Duration) { p.latency.Store(int64(d)) }

// SetFailRate fails that fraction of ranged GETs: a third each with 503,
// a connection reset before the answer, and a body cut short.
func (p *Proxy) SetFailRate(rate float64) { p.failRate.Store(uint64(rate * 1e6)) }

// SetStalled makes requests hang, unanswered, until it is set back or
// the client gives up.
func (p *Proxy) SetStalled(stall bool) { p.stall.Store(stall) }

// copyBuffers are large, so that the proxy costs the benchmarks little
// CPU per byte.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

type fault int

const (
	noFault fault = iota
	fail503
	failReset
	failShort
)

func (p *Proxy) fault(r *http.Request) fault {
	rate := p.failRate.Load()
	if rate == 0 || r.Method != http.MethodGet || r.Header.Get("Range") == "" {
		return noFault
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.rnd.Uint64N(1e6) >= rate {
		return noFault
	}
	return fault(1 + p.rnd.IntN(3))
}

func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.Requests.Add(1)
	if r.Method == http.MethodGet && r.Header.Get("Range") != "" {
		p.GETs.Add(1)
	}
	if d := p.latency.Load(); d > 0 {
		time.Sleep(time.Duration(d))
	}
	for p.stall.Load() {
		select {
		case <-r.Context().Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
	f := p.fault(r)
	switch f {
	case fail503:
		p.Faults.Add(1)
		http.Error(w, "injected", http.StatusServiceUnavailable)
		return
	case failReset:
		p.Faults.Add(1)
		panic(http.ErrAbortHandler) // the connection closes, unanswered
	}
	out := r.Clone(r.Context())
	out.RequestURI = ""
	out.URL.Scheme, out.URL.Host = p.target.Scheme, p.target.Host
	out.Host = r.Host
	resp, err := p.transport.RoundTrip(out)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	if f == failShort && resp.ContentLength > 1 {
		p.Faults.Add(1)
		n, _ := io.CopyN(w, resp.Body, resp.ContentLength/2)
		p.Bytes.Add(n)
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the body ends early
	}
	buf := copyBuffers.Get().(*[]byte)
	n, err := io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{resp.Body}, *buf) // not the 32 KiB ReadFrom uses
	copyBuffers.Put(buf)
	p.Bytes.Add(n)
	var first, last int64
	if _, serr := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/", &first, &last); serr == nil && err == nil && resp.StatusCode == http.StatusPartialContent {
		p.mu.Lock()
		p.ranges = append(p.ranges, [2]int64{first, last})
		p.mu.Unlock()
	}
}
