// Package formatbench measures what a disk format costs: it builds images
// of the same content in each format, runs read and write patterns through
// the I/O engine for a fixed time each, and reports throughput, IOPS and
// latency percentiles side by side, as a table, JSON, or a chart
// (`diskserve bench`).
package formatbench

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/aligned"
)

// A Pattern is an access pattern: which operation, how large, where.
type Pattern struct {
	Name      string
	Write     bool
	Random    bool
	BlockSize int64
}

// Patterns are the patterns Run knows, by name.
var Patterns = []Pattern{
	{Name: "seqread", BlockSize: 1 << 20},
	{Name: "seqwrite", Write: true, BlockSize: 1 << 20},
	{Name: "randread", Random: true, BlockSize: 4 << 10},
	{Name: "randwrite", Write: true, Random: true, BlockSize: 4 << 10},
}

// PatternByName returns the pattern called name.
func PatternByName(name string) (Pattern, error) {
	for _, p := range Patterns {
		if p.Name == name {
			return p, nil
		}
	}
	return Pattern{}, fmt.Errorf("unknown pattern %q (seqread, seqwrite, randread, randwrite)", name)
}

// Config says what to measure.
type Config struct {
	Formats  []string
	Patterns []Pattern
	Depths   []int         // queue depths: requests in flight
	Runtime  time.Duration // per pattern, format and depth
	Engine   async.Mode
	Via      string // ViaEngine, ViaNBD or ViaFUSE
	// Self is the diskserve binary, which ViaFUSE runs as `diskserve
	// mount`: a process must not read its own FUSE mount (the Go runtime
	// can deadlock stopping a thread blocked in it).
	Self   string
	Source diskserve.DiskFile // the content every image holds
	Dir    string             // where images are built
	// Open holds the formats images are built and opened with; package
	// format's built-in ones when it leaves them empty.
	Open diskserve.Options
	// Progress, if not nil, is called after each measurement with the
	// number done and the total.
	Progress func(done, total int)
}

// A Result is one measurement, or why there is none.
type Result struct {
	Format    string  `json:"format"`
	Pattern   string  `json:"pattern"`
	QueueDep  int     `json:"queue_depth"`
	BlockSize int64   `json:"block_size"`
	Skipped   string  `json:"skipped,omitempty"` // why the pattern does not apply
	Ops       int64   `json:"ops"`
	Seconds   float64 `json:"seconds"`
	IOPS      float64 `json:"iops"`
	MiBps     float64 `json:"mib_per_s"`
	P50us     float64 `json:"latency_p50_us"`
	P99us     float64 `json:"latency_p99_us"`
	P999us    float64 `json:"latency_p999_us"`
}

// Report is the outcome of Run.
type Report struct {
	Size    int64    `json:"size"`
	Runtime float64  `json:"runtime_s"`
	Engine  string   `json:"engine"`
	Via     string   `json:"via"`
	Results []Result `json:"results"`
}

// formats returns the formats c builds and opens images with.
func (c *Config) formats() []diskserve.Format {
	return format.Options(c.Open).Formats
}

// Run builds an image of each format and measures every pattern at every
// depth on it.
func Run(ctx context.Context, c Config) (*Report, error) {
	rep := &Report{Size: c.Source.Size(), Runtime: c.Runtime.Seconds(), Via: cmp.Or(c.Via, ViaEngine)}
	total := len(c.Formats) * len(c.Patterns) * len(c.Depths)
	for _, f := range c.Formats {
		v, err := variantOf(c.formats(), f)
		if err != nil {
			return nil, err
		}
		path, err := build(ctx, v, c.Source, c.Dir, c.Open)
		if err != nil {
			return nil, fmt.Errorf("build the %s image: %w", f, err)
		}
		t, size, engine, detach, err := attach(c, path, v.format.Name, !v.writable())
		if err != nil {
			return nil, fmt.Errorf("%s via %s: %w", f, rep.Via, err)
		}
		rep.Engine = engine
		// Reads first: a write pattern changes the image (it overwrites
		// compressed clusters with plain ones, say), and reads after it
		// would measure that instead of the format as built.
		patterns := slices.Clone(c.Patterns)
		slices.SortStableFunc(patterns, func(a, b Pattern) int { return cmp.Compare(b2i(a.Write), b2i(b.Write)) })
		for _, p := range patterns {
			for _, qd := range c.Depths {
				r := Result{Format: f, Pattern: p.Name, QueueDep: qd, BlockSize: p.BlockSize}
				if p.Write && !v.writable() {
					r.Skipped = "the format is read-only"
				} else if err := measure(ctx, t, size, p, qd, c.Runtime, &r); err != nil {
					detach()
					return nil, fmt.Errorf("%s %s at depth %d: %w", f, p.Name, qd, err)
				}
				rep.Results = append(rep.Results, r)
				if c.Progress != nil {
					c.Progress(len(rep.Results), total)
				}
			}
		}
		if err := detach(); err != nil {
			return nil, err
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		os.RemoveAll(filepath.Dir(path))
	}
	return rep, nil
}

// measure runs p at depth qd on d, of size bytes, for runtime: qd
// goroutines, each with one request in flight.
func measure(ctx context.Context, d target, size int64, p Pattern, qd int, runtime time.Duration, r *Result) error {
	blocks := size / p.BlockSize
	if blocks == 0 {
		return fmt.Errorf("the image is smaller than one %d-byte block", p.BlockSize)
	}
	ctx, cancel := context.WithTimeout(ctx, runtime)
	defer cancel()
	var (
		next   atomic.Int64 // the next sequential block
		mu     sync.Mutex
		lat    []time.Duration
		firstE error
		wg     sync.WaitGroup
	)
	start := time.Now()
	for w := range qd {
		wg.Go(func() {
			buf := aligned.Bytes(int(p.BlockSize))
			rand.NewChaCha8([32]byte{byte(w)}).Read(buf)
			rnd := rand.New(rand.NewPCG(uint64(w), 1))
			var mine []time.Duration
			for ctx.Err() == nil {
				bi := next.Add(1) - 1
				if p.Random {
					bi = rnd.Int64N(blocks)
				}
				off := bi % blocks * p.BlockSize
				t := time.Now()
				var err error
				if p.Write {
					_, err = d.WriteAt(buf, off)
				} else {
					err = diskserve.ReadFullAt(d, buf, off)
				}
				if err != nil {
					mu.Lock()
					firstE = cmp.Or(firstE, err)
					mu.Unlock()
					cancel()
					break
				}
				mine = append(mine, time.Since(t))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	if firstE != nil {
		return firstE
	}
	elapsed := time.Since(start).Seconds()
	slices.Sort(lat)
	r.Ops = int64(len(lat))
	r.Seconds = elapsed
	r.IOPS = float64(r.Ops) / elapsed
	r.MiBps = r.IOPS * float64(p.BlockSize) / (1 << 20)
	r.P50us, r.P99us, r.P999us = percentile(lat, 0.5), percentile(lat, 0.99), percentile(lat, 0.999)
	return nil
}

// percentile returns the q-quantile of the sorted latencies in
// microseconds.
func percentile(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := min(len(sorted)-1, int(q*float64(len(sorted))))
	return float64(sorted[i].Nanoseconds()) / 1e3
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
