package diskserve_test

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// syncRecorder is a memory disk that notes, on one clock, when each write
// completes and when each flush starts and ends.
type syncRecorder struct {
	*disktest.Memory
	clock    atomic.Int64
	mu       sync.Mutex
	written  map[int64]int64 // offset: the tick its write completed
	flushes  [][2]int64      // start and end ticks
	flushErr error
}

func newSyncRecorder(size int) *syncRecorder {
	return &syncRecorder{Memory: disktest.NewMemory(make([]byte, size), false), written: map[int64]int64{}}
}

func (r *syncRecorder) WriteAt(p []byte, off int64) (int, error) {
	n, err := r.Memory.WriteAt(p, off)
	r.mu.Lock()
	r.written[off] = r.clock.Add(1)
	r.mu.Unlock()
	return n, err
}

func (r *syncRecorder) Flush() error {
	start := r.clock.Add(1)
	time.Sleep(100 * time.Microsecond) // as a device takes its time
	end := r.clock.Add(1)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.flushes = append(r.flushes, [2]int64{start, end})
	return r.flushErr
}

// coveredBy reports whether a flush started after tick done and ended
// before tick ret.
func (r *syncRecorder) coveredBy(done, ret int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range r.flushes {
		if f[0] > done && f[1] < ret {
			return true
		}
	}
	return false
}

// TestWriteThroughSyncs has concurrent writers write through writethrough
// and directsync disks: every write returns only after a flush that began
// once the write was done, and flushes are shared between writers.
func TestWriteThroughSyncs(t *testing.T) {
	for _, mode := range []diskserve.CacheMode{diskserve.CacheWritethrough, diskserve.CacheDirectSync} {
		t.Run(string(mode), func(t *testing.T) {
			const writers, each = 8, 50
			r := newSyncRecorder(writers * each * 512)
			d := diskserve.WithCache(r, mode)
			var wg sync.WaitGroup
			for g := range writers {
				wg.Go(func() {
					p := make([]byte, 512)
					for i := range each {
						off := int64(g*each+i) * 512
						if _, err := d.WriteAt(p, off); err != nil {
							t.Error(err)
							return
						}
						ret := r.clock.Add(1)
						r.mu.Lock()
						done := r.written[off]
						r.mu.Unlock()
						if !r.coveredBy(done, ret) {
							t.Errorf("the write at %d returned before a flush covered it", off)
							return
						}
					}
				})
			}
			wg.Wait()
			t.Logf("%d writes, %d flushes", writers*each, len(r.flushes))
			if len(r.flushes) >= writers*each {
				t.Errorf("%d flushes for %d concurrent writes: none shared", len(r.flushes), writers*each)
			}
			before := len(r.flushes)
			if err := diskserve.WriteZeroes(d, 0, 4096, 0); err != nil {
				t.Fatal(err)
			}
			if err := diskserve.PunchHole(d, 4096, 4096); err != nil {
				t.Fatal(err)
			}
			if len(r.flushes) < before+2 {
				t.Errorf("write zeroes and punch hole made %d flushes", len(r.flushes)-before)
			}
			r.flushErr = errors.New("device gone")
			if _, err := d.WriteAt(make([]byte, 512), 0); err == nil {
				t.Error("a write whose flush failed succeeded")
			}
		})
	}
}

// TestUnsafeIgnoresFlush flushes an unsafe disk: nothing reaches the disk
// below.
func TestUnsafeIgnoresFlush(t *testing.T) {
	r := newSyncRecorder(4096)
	d := diskserve.WithCache(r, diskserve.CacheUnsafe)
	if _, err := d.WriteAt(make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	if err := diskserve.Flush(d); err != nil {
		t.Fatal(err)
	}
	if len(r.flushes) != 0 {
		t.Errorf("%d flushes reached the disk", len(r.flushes))
	}
}

// TestWithCacheConformance runs the conformance suite through each cache
// mode's wrapper.
func TestWithCacheConformance(t *testing.T) {
	for _, mode := range diskserve.CacheModes {
		t.Run(string(mode), func(t *testing.T) {
			data := make([]byte, 1<<20+3)
			for i := range data {
				data[i] = byte(i * 5)
			}
			disktest.Check(t, diskserve.WithCache(disktest.NewMemory(data, false), mode), data)
		})
	}
}

func TestParseCacheMode(t *testing.T) {
	for _, m := range diskserve.CacheModes {
		if got, err := diskserve.ParseCacheMode(string(m)); got != m || err != nil {
			t.Errorf("ParseCacheMode(%q) = %q, %v", m, got, err)
		}
	}
	if got, _ := diskserve.ParseCacheMode(""); got != diskserve.CacheWriteback {
		t.Errorf("the default is %q", got)
	}
	if _, err := diskserve.ParseCacheMode("directio"); err == nil {
		t.Error("an unknown mode parsed")
	}
}
