package cache_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/remote/cache"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv("CACHE_TEST_CHILD"); dir != "" {
		prefetchForever(dir)
		return
	}
	goleak.VerifyTestMain(m)
}

const chunk = 64 << 10

// source is an object in memory that counts what is fetched of it.
type source struct {
	data     []byte
	version  string
	delay    time.Duration // per 16 KiB delivered
	fetches  atomic.Int64
	bytes    atomic.Int64
	fail     atomic.Bool
	gate     chan struct{} // when set, fetches wait for it to close
	heads    chan struct{} // when set, fetches from a chunk's start wait for it to close
	mu       sync.Mutex
	requests [][2]int64 // off, len
}

func newSource(n int, seed uint64) *source {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed)}).Read(b)
	return &source{data: b, version: fmt.Sprint(seed)}
}

func (s *source) Fetch(ctx context.Context, p []byte, off int64, progress func(int)) error {
	s.fetches.Add(1)
	s.mu.Lock()
	s.requests = append(s.requests, [2]int64{off, int64(len(p))})
	s.mu.Unlock()
	if s.gate != nil {
		<-s.gate
	}
	if s.heads != nil && off%chunk == 0 {
		<-s.heads
	}
	if s.fail.Load() {
		return errors.New("injected failure")
	}
	for done := 0; done < len(p); {
		n := min(16<<10, len(p)-done)
		copy(p[done:done+n], s.data[off+int64(done):])
		done += n
		s.bytes.Add(int64(n))
		if s.delay > 0 {
			time.Sleep(s.delay)
		}
		progress(done)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return nil
}

func (s *source) Size() int64 { return int64(len(s.data)) }
func (s *source) Identity() cache.Identity {
	return cache.Identity{Name: "mem://object", Key: "mem://object", Validator: s.version}
}
func (s *source) Close() error { return nil }

func open(t *testing.T, src cache.Source, cfg cache.Config) *cache.Disk {
	t.Helper()
	if cfg.ChunkSize == 0 {
		cfg.ChunkSize = chunk
	}
	d, err := cache.Open(src, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func readAll(t *testing.T, d diskserve.DiskFile, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if err := diskserve.ReadFullAt(d, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, want))
	}
}

// TestConformance runs the conformance suite on a cached object with
// chunks of zeroes and a short last chunk.
func TestConformance(t *testing.T) {
	src := newSource(20*chunk+777, 1)
	clear(src.data[3*chunk : 6*chunk])
	d := open(t, src, cache.Config{Dir: t.TempDir()})
	defer d.Close()
	disktest.Check(t, d, src.data)
}

// TestReuse closes a filled cache and opens it again: nothing is fetched
// again, and the bytes are the object's.
func TestReuse(t *testing.T) {
	dir := t.TempDir()
	src := newSource(40*chunk+5, 2)
	d := open(t, src, cache.Config{Dir: dir})
	readAll(t, d, src.data)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	fetched := src.bytes.Load()
	if fetched != int64(len(src.data)) {
		t.Errorf("fetched %d bytes of %d", fetched, len(src.data))
	}
	d = open(t, src, cache.Config{Dir: dir, ChunkSize: 1 << 20}) // the directory keeps its chunk size
	defer d.Close()
	readAll(t, d, src.data)
	if src.bytes.Load() != fetched {
		t.Errorf("a reopened cache fetched %d bytes", src.bytes.Load()-fetched)
	}
	if st := d.State(); st.Chunks != 41 {
		t.Errorf("state %+v", st)
	}
	if bad, err := cache.Verify(d.Dir()); err != nil || len(bad) != 0 {
		t.Errorf("verify: %v %v", bad, err)
	}

	// Another version of the object gets a directory of its own.
	src2 := newSource(len(src.data), 3)
	d2 := open(t, src2, cache.Config{Dir: dir})
	defer d2.Close()
	readAll(t, d2, src2.data)
	if entries, err := cache.List(dir); err != nil || len(entries) != 2 {
		t.Errorf("entries %+v, %v", entries, err)
	}
}

// TestSingleFlight reads one chunk from many goroutines at once: one
// fetch serves them all. The reads start in the chunk's first eighth,
// which a miss fetches with one GET (TestSplitMiss has the others).
func TestSingleFlight(t *testing.T) {
	src := newSource(8*chunk, 4)
	src.gate = make(chan struct{})
	d := open(t, src, cache.Config{Dir: t.TempDir()})
	defer d.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		wg.Go(func() {
			p := make([]byte, 4096)
			off := int64(3*chunk + i*512)
			if _, err := d.ReadAt(p, off); err != nil || !bytes.Equal(p, src.data[off:off+4096]) {
				errs <- fmt.Errorf("read at %d: %v", off, err)
			}
		})
	}
	time.Sleep(50 * time.Millisecond) // let the readers queue up behind the fetch
	close(src.gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := src.fetches.Load(); n != 1 {
		t.Errorf("%d fetches", n)
	}
}

// TestConcurrentReaders reads random ranges from many goroutines while
// chunks are fetched, committed and their GET buffers recycled (poisoned
// under the race detector): every read returns the object's bytes.
func TestConcurrentReaders(t *testing.T) {
	src := newSource(64*chunk+300, 6)
	src.delay = 20 * time.Microsecond
	for round := range 3 {
		d := open(t, src, cache.Config{Dir: t.TempDir(), MaxFetch: 4 * chunk, Fetches: 4})
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := range 8 {
			wg.Go(func() {
				rnd := rand.New(rand.NewPCG(uint64(round), uint64(g)))
				for range 200 {
					off := rnd.Int64N(int64(len(src.data)))
					p := make([]byte, min(1+rnd.Int64N(3*chunk), int64(len(src.data))-off))
					if _, err := d.ReadAt(p, off); err != nil || !bytes.Equal(p, src.data[off:off+int64(len(p))]) {
						errs <- fmt.Errorf("round %d: read %d at %d: %v", round, len(p), off, err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSplitMiss reads 4 KiB near the end of an absent chunk of 256 KiB:
// the chunk comes in two GETs, and the read returns while the one for the
// chunk's head is held back. The chunk is then cached whole, its sum
// right.
func TestSplitMiss(t *testing.T) {
	const c = 4 * chunk // chunks smaller than 256 KiB are fetched whole
	src := newSource(8*c, 7)
	src.heads = make(chan struct{})
	d := open(t, src, cache.Config{Dir: t.TempDir(), ChunkSize: c})
	off := int64(3*c + 50000)
	p := make([]byte, 4096)
	read := make(chan error, 1)
	go func() {
		_, err := d.ReadAt(p, off)
		read <- err
	}()
	select {
	case err := <-read:
		if err != nil || !bytes.Equal(p, src.data[off:off+4096]) {
			t.Errorf("read: %v", err)
		}
	case <-time.After(10 * time.Second): // the read waits for the held head
		t.Error("the read did not return while the chunk's head was held back")
	}
	close(src.heads)
	readAll(t, d, src.data)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	var got [][2]int64
	src.mu.Lock()
	for _, r := range src.requests {
		if r[0] >= 3*c && r[0] < 4*c {
			got = append(got, r)
		}
	}
	src.mu.Unlock()
	slices.SortFunc(got, func(a, b [2]int64) int { return int(b[0] - a[0]) })
	if want := [][2]int64{{3*c + 49152, c - 49152}, {3 * c, 49152}}; !slices.Equal(got, want) {
		t.Errorf("requests for chunk 3 %v, want %v", got, want)
	}
	if bad, err := cache.Verify(d.Dir()); err != nil || len(bad) != 0 {
		t.Errorf("verify: %v %v", bad, err)
	}
}

// TestCrowdFetchesGroups misses chunks of five 1 MiB groups at once, one
// after another: the first four misses, with fewer than four others on
// their way, fetch their own 64 KiB chunk; the fifth, in a crowd, fetches
// the whole group around its chunk, in a GET from its chunk to the
// group's end and one for the group's head.
func TestCrowdFetchesGroups(t *testing.T) {
	const group = 1 << 20 / chunk // chunks per group
	src := newSource(8*group*chunk, 8)
	src.gate = make(chan struct{})
	d := open(t, src, cache.Config{Dir: t.TempDir()})
	var wg sync.WaitGroup
	for g := range int64(5) {
		i := g*group + g // a chunk inside group g
		wg.Go(func() {
			p := make([]byte, 4096)
			if _, err := d.ReadAt(p, i*chunk); err != nil || !bytes.Equal(p, src.data[i*chunk:i*chunk+4096]) {
				t.Errorf("read chunk %d: %v", i, err)
			}
		})
		for deadline := time.Now().Add(10 * time.Second); src.fetches.Load() <= g; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("miss %d started no fetch", g)
			}
		}
	}
	close(src.gate)
	wg.Wait()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	src.mu.Lock()
	got := slices.Clone(src.requests)
	src.mu.Unlock()
	slices.SortFunc(got, func(a, b [2]int64) int { return int(a[0] - b[0]) })
	want := [][2]int64{{0, chunk}, {(group + 1) * chunk, chunk}, {(2*group + 2) * chunk, chunk}, {(3*group + 3) * chunk, chunk},
		{4 * group * chunk, 4 * chunk}, {(4*group + 4) * chunk, (group - 4) * chunk}}
	if !slices.Equal(got, want) {
		t.Errorf("requests %v, want %v", got, want)
	}
}

// TestCoalesce reads a range of several absent chunks: one fetch for them
// all, as long as MaxFetch allows.
func TestCoalesce(t *testing.T) {
	src := newSource(32*chunk, 5)
	d := open(t, src, cache.Config{Dir: t.TempDir(), MaxFetch: 4 * chunk})
	defer d.Close()
	p := make([]byte, 10*chunk)
	if _, err := d.ReadAt(p, 2*chunk+100); err != nil || !bytes.Equal(p, src.data[2*chunk+100:12*chunk+100]) {
		t.Fatal(err)
	}
	// 11 chunks in runs of at most 4: 3 fetches.
	if n := src.fetches.Load(); n != 3 {
		t.Errorf("%d fetches: %v", n, src.requests)
	}
}

// TestSharedDirectory reads one object through two opens of one cache
// directory at once (their locks conflict as two processes' would): each
// chunk is fetched once.
func TestSharedDirectory(t *testing.T) {
	dir := t.TempDir()
	src := newSource(64*chunk, 6)
	src.delay = time.Millisecond
	a := open(t, src, cache.Config{Dir: dir, MaxFetch: chunk})
	defer a.Close()
	b := open(t, src, cache.Config{Dir: dir, MaxFetch: chunk})
	defer b.Close()
	var wg sync.WaitGroup
	for _, d := range []*cache.Disk{a, b, a, b} {
		wg.Go(func() {
			p := make([]byte, 4096)
			for _, i := range rand.Perm(64) {
				off := int64(i)*chunk + 512
				if _, err := d.ReadAt(p, off); err != nil || !bytes.Equal(p, src.data[off:off+4096]) {
					t.Errorf("read at %d: %v", off, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if n := src.bytes.Load(); n != int64(len(src.data)) {
		t.Errorf("fetched %d bytes of an object of %d", n, len(src.data))
	}
}

// TestEviction reads an object four times the cache's limit, with the
// first chunk pinned: the cache stays within its limit, keeps the pinned
// chunk and reads right.
func TestEviction(t *testing.T) {
	src := newSource(64*chunk, 7)
	limit := int64(16 * chunk)
	root := t.TempDir()
	d := open(t, src, cache.Config{Dir: root, Limit: limit, MaxFetch: chunk})
	d.Pin(0, 100)
	readAll(t, d, src.data)
	d.Close() // commits, and so evicts
	d = open(t, src, cache.Config{Dir: root, Limit: limit})
	defer d.Close()
	st := d.State()
	if st.Bytes > limit {
		t.Errorf("%d bytes cached, limit %d", st.Bytes, limit)
	}
	before := src.bytes.Load()
	p := make([]byte, 100)
	d.ReadAt(p, 0)
	if src.bytes.Load() != before {
		t.Errorf("the pinned first chunk was evicted")
	}
	readAll(t, d, src.data)
}

// TestZeroChunks: chunks of zeroes are holes, reported as zero extents.
func TestZeroChunks(t *testing.T) {
	src := newSource(8*chunk, 8)
	clear(src.data[2*chunk : 5*chunk])
	root := t.TempDir()
	d := open(t, src, cache.Config{Dir: root})
	readAll(t, d, src.data)
	d.Close() // commits
	d = open(t, src, cache.Config{Dir: root})
	defer d.Close()
	ext, err := diskserve.Extents(d, nil, 0, d.Size())
	if err != nil {
		t.Fatal(err)
	}
	want := []diskserve.Extent{{Off: 0, Len: 2 * chunk}, {Off: 2 * chunk, Len: 3 * chunk, Flags: diskserve.ExtentZero}, {Off: 5 * chunk, Len: 3 * chunk}}
	if fmt.Sprint(diskserve.MergeExtents(ext)) != fmt.Sprint(want) {
		t.Errorf("extents %v, want %v", ext, want)
	}
}

// TestFailure fails fetches: reads fail with the error, and succeed once
// the source recovers.
func TestFailure(t *testing.T) {
	src := newSource(8*chunk, 9)
	src.fail.Store(true)
	d := open(t, src, cache.Config{Dir: t.TempDir()})
	defer d.Close()
	p := make([]byte, 4096)
	if _, err := d.ReadAt(p, chunk); err == nil {
		t.Fatal("a read of a failing source succeeded")
	}
	src.fail.Store(false)
	readAll(t, d, src.data)
}

// TestReadahead reads sequentially in small requests: fetches run ahead,
// and nothing is fetched twice.
func TestReadahead(t *testing.T) {
	src := newSource(256*chunk, 10)
	d := open(t, src, cache.Config{Dir: t.TempDir(), MaxFetch: 4 * chunk})
	defer d.Close()
	p := make([]byte, 16<<10)
	for off := int64(0); off < d.Size(); off += int64(len(p)) {
		if _, err := d.ReadAt(p, off); err != nil || !bytes.Equal(p, src.data[off:off+int64(len(p))]) {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	s := d.Stats().Snapshot()
	if s.Readahead == 0 || src.bytes.Load() != d.Size() {
		t.Errorf("readahead fetches %d, fetched %d of %d", s.Readahead, src.bytes.Load(), d.Size())
	}
	if s.HitBytes < d.Size()/2 {
		t.Errorf("only %d of %d bytes read found their chunk fetched ahead", s.HitBytes, d.Size())
	}
}

// TestReadaheadOutOfOrder reads chunks in swapped pairs, as a client
// with several requests in flight delivers them: still one stream, read
// ahead in long GETs.
func TestReadaheadOutOfOrder(t *testing.T) {
	src := newSource(256*chunk, 13)
	d := open(t, src, cache.Config{Dir: t.TempDir(), MaxFetch: 4 * chunk})
	defer d.Close()
	p := make([]byte, chunk)
	for i := int64(0); i < 256; i++ {
		off := (i ^ 1) * chunk
		if _, err := d.ReadAt(p, off); err != nil || !bytes.Equal(p, src.data[off:off+chunk]) {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	s := d.Stats().Snapshot()
	if s.Readahead == 0 || src.fetches.Load() > 256/2 {
		t.Errorf("%d readahead fetches, %d fetches for 256 chunks", s.Readahead, src.fetches.Load())
	}
}

// TestPrefetch fills the whole cache in the background.
func TestPrefetch(t *testing.T) {
	src := newSource(100*chunk+1, 11)
	d := open(t, src, cache.Config{Dir: t.TempDir(), Prefetch: true})
	defer d.Close()
	for deadline := time.Now().Add(20 * time.Second); d.State().Chunks < 101; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("prefetch stuck at %+v", d.State())
		}
	}
	before := src.bytes.Load()
	readAll(t, d, src.data)
	if src.bytes.Load() != before || before != d.Size() {
		t.Errorf("fetched %d then %d, size %d", before, src.bytes.Load(), d.Size())
	}
}

// TestVerifyFindsDamage damages a present chunk's bytes: Verify names it.
func TestVerifyFindsDamage(t *testing.T) {
	src := newSource(8*chunk, 12)
	d := open(t, src, cache.Config{Dir: t.TempDir()})
	readAll(t, d, src.data)
	dir := d.Dir()
	d.Close()
	f, err := os.OpenFile(filepath.Join(dir, "data"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{1, 2, 3}, 5*chunk+10)
	f.Close()
	if bad, err := cache.Verify(dir); err != nil || fmt.Sprint(bad) != "[5]" {
		t.Errorf("verify: %v, %v", bad, err)
	}
	if ok, err := cache.Remove(dir); !ok || err != nil {
		t.Errorf("remove: %v %v", ok, err)
	}
}

// TestKilledDuringPrefetch kills a process while it fills a cache, again
// and again on the same directory: every chunk marked present holds the
// object's bytes, and the directory stays usable.
func TestKilledDuringPrefetch(t *testing.T) {
	dir := t.TempDir()
	for round := range 4 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "CACHE_TEST_CHILD="+dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if _, err := out.Read(make([]byte, 1)); err != nil { // the child has the cache open
			t.Fatal(err)
		}
		time.Sleep(time.Duration(50+rand.IntN(300)) * time.Millisecond)
		cmd.Process.Kill()
		cmd.Wait()
		entries, err := cache.List(dir)
		if err != nil || len(entries) != 1 {
			t.Fatalf("round %d: entries %v, %v", round, entries, err)
		}
		if bad, err := cache.Verify(entries[0].Dir); err != nil || len(bad) != 0 {
			t.Fatalf("round %d: chunks %v do not match their sums (%v)", round, bad, err)
		}
		t.Logf("round %d: %d chunks present", round, entries[0].Chunks)
	}
	src := crashSource()
	d := open(t, src, cache.Config{Dir: dir})
	defer d.Close()
	readAll(t, d, src.data) // the present chunks match the object, not just their sums
}

// crashSource is the object the killed child fetches: slow enough that a
// kill lands mid-fill.
func crashSource() *source {
	s := newSource(512*chunk, 13)
	clear(s.data[100*chunk : 120*chunk])
	s.delay = 200 * time.Microsecond
	return s
}

func prefetchForever(dir string) {
	d, err := cache.Open(crashSource(), cache.Config{Dir: dir, ChunkSize: chunk, Prefetch: true, PrefetchRate: 8 << 20, MaxFetch: 4 * chunk})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_ = d
	fmt.Println("open")
	select {}
}
