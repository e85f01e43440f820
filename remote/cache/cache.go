// Package cache keeps the bytes of remote objects in a persistent local
// block cache, and serves them as read-only disks.
//
// An object's cache is a directory named by the object's identity (its
// URL without credentials, its ETag or Last-Modified, its size), holding
// the object's bytes at their own offsets in a sparse file, one state word
// per chunk (absent, present, all zeroes) and a CRC-32C per chunk. Several
// processes may use one directory at once: they share the states through
// a shared mapping and take a byte-range lock per chunk while fetching it,
// so each chunk is fetched once per host.
//
// A chunk is marked present only after its bytes are durable (fdatasync
// of the data file comes first), so a crash at any moment leaves at worst
// chunks that are fetched again, never a chunk marked present with wrong
// bytes. Marking is batched: fetched chunks are served from the data file
// at once and become present at the next commit, a fraction of a second
// later.
package cache

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve"
)

// A Source is a remote object: read-only bytes fetched by range.
type Source interface {
	// Fetch fills p with the object's bytes from off, which lie inside
	// the object, retrying as it sees fit. It calls progress with the
	// number of leading bytes of p filled so far, whenever more have
	// arrived, so that the cache can hand out chunks before the whole
	// range is in. It returns an error if p is not filled.
	Fetch(ctx context.Context, p []byte, off int64, progress func(n int)) error
	// Size is the object's size in bytes.
	Size() int64
	// Identity names the object and its version.
	Identity() Identity
	// Close releases the source's connections.
	Close() error
}

// An Identity names one version of an object.
type Identity struct {
	// Name is how messages show the object: a URL without credentials.
	Name string
	// Key names the object independently of credentials and signatures:
	// the URL without user information or query (but with an S3
	// version ID).
	Key string
	// Validator is the ETag or, without one, the Last-Modified time of
	// the version opened; empty when the server gives neither, and then
	// the cache is not kept beyond Close.
	Validator string
}

// Defaults of [Config].
const (
	DefaultChunkSize    = 1 << 20
	DefaultFetches      = 8
	DefaultMaxFetch     = 4 << 20
	DefaultPrefetchRate = 256 << 20
)

const (
	commitInterval  = 200 * time.Millisecond
	commitBytes     = 16 << 20        // fetched bytes that make a commit start early
	maxPending      = 3 * commitBytes // fetched bytes at most not yet resident (a commit marks a batch while the next gathers): new GETs wait
	splitMin        = 8               // a read that misses a chunk past its first 1/splitMin gets its own GET (getSplit)
	splitAlign      = 4096
	splitChunk      = 256 << 10 // chunks smaller than this are fetched whole: a second GET costs more than their transfer
	storeBatch      = 1 << 20   // fetched chunks are written to the data file this many bytes at a time
	prefetchStreams = 2

	// A miss that finds crowdMisses others on their way fetches the
	// whole groupBytes-aligned group around its chunk (with chunks
	// smaller than that). Many misses at once are a client reading much
	// of the object at random (a scan, a copy, several guests): the link
	// bounds it, and whole groups fill the cache in the fewest GETs. A
	// lone miss is on a client's critical path (a boot reads one small
	// piece after another): it fetches its own chunk, the fewest bytes
	// and the shortest transfer.
	crowdMisses = 4
	groupBytes  = 1 << 20
)

// Config configures [Open]. Zero fields take the defaults.
type Config struct {
	// Dir is the root under which each object gets its directory.
	Dir string
	// ChunkSize is the unit of fetching and of presence, a power of two
	// from 64 KiB to 64 MiB; a directory that exists keeps its own.
	ChunkSize int64
	// Limit bounds the bytes of data the cache keeps for one object;
	// 0 means no bound. Chunks are evicted, least recently used first,
	// keeping pinned ones (format metadata).
	Limit int64
	// Fetches bounds the GETs in flight for one object.
	Fetches int
	// MaxFetch bounds the bytes one GET asks for, when adjacent missing
	// chunks are fetched together.
	MaxFetch int64
	// Prefetch fills the whole cache in the background, at PrefetchRate
	// bytes per second at most.
	Prefetch     bool
	PrefetchRate int64
	// Logger receives progress and trouble; nil discards.
	Logger *slog.Logger
}

// A Disk is a remote object served through its block cache: a read-only
// [diskserve.DiskFile].
type Disk struct {
	src     Source
	s       *store
	id      Identity
	size    int64
	chunk   int64
	n       int64 // chunks
	limit   int64
	maxRun  int64 // chunks one GET fetches at most
	fetches int64 // GETs in flight at most
	log     *slog.Logger
	temp    bool // the directory goes at Close: the object had no validator
	stats   *Stats
	sem     *semaphore.Weighted // GETs in flight
	ctx     context.Context     // ends at Close, for prefetch
	cancel  context.CancelFunc
	demand  context.Context // ends closeGrace after Close, for fetches readers started (readahead too)
	stopDem context.CancelFunc
	bg      sync.WaitGroup // fetches and the prefetcher
	bufs    runBuffers     // GET buffers
	wake    chan struct{}  // asks the committer for an early commit
	stop    chan struct{}  // stops the committer
	stopped chan struct{}  // closed when it has
	evictMu sync.Mutex
	hand    int64 // eviction's clock hand

	mu       sync.Mutex
	inflight map[int64]*fetch // chunks being fetched or fetched and not yet committed
	pending  []run            // fetched runs not yet committed
	pendingN int64            // their bytes, and those of the runs a commit is marking
	drained  *sync.Cond       // on mu: a commit marked runs
	resident atomic.Int64     // bytes of present chunks, as this process counts them
	missing  atomic.Int64     // fetches that reads started (not readahead) on their way

	refs   []atomic.Uint64 // a bit per chunk: read since the clock hand passed
	pinned []atomic.Uint64 // a bit per chunk: never evicted

	ra readahead
}

var (
	_ diskserve.DiskFile     = (*Disk)(nil)
	_ diskserve.Describer    = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.HostMapper   = (*Disk)(nil)
	_ diskserve.Pinner       = (*Disk)(nil)
)

// A fetch is one chunk on its way. Its bytes arrive in buf, filled of
// them so far; readers that need only the first bytes of the chunk go as
// soon as those are in (a 4 KiB read does not wait for the whole chunk).
// done closes once the chunk is in the data file, or err says why not.
// buf stays until the chunk is committed, so that readers right behind a
// fetch (a sequential stream, readahead) copy from memory rather than
// read the file back.
type fetch struct {
	done   chan struct{}
	err    error
	buf    []byte  // the chunk's bytes, in the buffer of its GET
	st     *stream // signals arrivals; filled and tail are guarded by st.mu
	filled int     // leading bytes of buf arrived; stays 0 if another process fetched the chunk
	split  int     // where a second GET fetches the rest of the chunk from (see splitMin); len(buf) if none does
	tail   int     // bytes arrived from split on
}

// has reports whether bytes [lo, hi) of f's chunk have arrived. f.st.mu
// is held.
func (f *fetch) has(lo, hi int) bool {
	return (lo >= f.split || f.filled >= min(hi, f.split)) && (hi <= f.split || f.split+f.tail >= hi)
}

// A stream is one claimed run of chunks on its way: the buffer its GET
// fills, and the signal of arrivals.
type stream struct {
	mu   sync.Mutex
	cond sync.Cond
	buf  []byte       // the run's bytes, from Disk.bufs
	refs atomic.Int32 // the run's fetches in inflight, its fetcher, and readers copying from buf
}

// hold keeps st's buffer from being reused until release. d.mu is held,
// and st is the stream of a fetch in d.inflight.
func (st *stream) hold() { st.refs.Add(1) }

// release drops a hold, and recycles the buffer with the last one.
func (d *Disk) release(st *stream) {
	if st.refs.Add(-1) == 0 {
		d.bufs.put(st.buf)
	}
}

// finish ends f: its waiters see done closed.
func (f *fetch) finish(err error) {
	f.err = err
	close(f.done)
	f.st.mu.Lock()
	f.st.cond.Broadcast()
	f.st.mu.Unlock()
}

// A run is fetched chunks [first, first+len(kinds)) waiting to be
// committed, with the state each gets, and their bytes.
type run struct {
	first int64
	kinds []uint32
	bytes int64
}

// Open opens src through its cache under cfg.Dir, reusing what an earlier
// process fetched of the same version of the object.
func Open(src Source, cfg Config) (*Disk, error) {
	if cfg.ChunkSize == 0 {
		cfg.ChunkSize = DefaultChunkSize
	}
	if !ValidChunkSize(cfg.ChunkSize) {
		return nil, fmt.Errorf("cache chunk size %d is not a power of two from 64 KiB to 64 MiB", cfg.ChunkSize)
	}
	if cfg.Fetches <= 0 {
		cfg.Fetches = DefaultFetches
	}
	if cfg.MaxFetch <= 0 {
		cfg.MaxFetch = DefaultMaxFetch
	}
	if cfg.PrefetchRate <= 0 {
		cfg.PrefetchRate = DefaultPrefetchRate
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Dir == "" {
		return nil, errors.New("no cache directory")
	}
	id := src.Identity()
	size := src.Size()
	dir := filepath.Join(cfg.Dir, dirName(id, size))
	temp := id.Validator == ""
	if temp {
		// Nothing tells a later open whether the object changed: use a
		// directory of this process only.
		var err error
		if err = os.MkdirAll(cfg.Dir, 0o700); err == nil {
			dir, err = os.MkdirTemp(cfg.Dir, "unversioned-")
		}
		if err != nil {
			return nil, fmt.Errorf("cache of %s: %w", id.Name, err)
		}
		cfg.Logger.Warn("the server gives no ETag or Last-Modified: the cache is not kept after exit", "image", id.Name)
	}
	s, err := openStore(dir, Meta{Version: layoutVersion, Name: id.Name, Key: id.Key, Validator: id.Validator, Size: size, ChunkSize: cfg.ChunkSize, Created: time.Now().UTC()})
	if err != nil {
		if temp {
			os.RemoveAll(dir)
		}
		return nil, fmt.Errorf("cache of %s: %w (choose another directory with --cache-dir)", id.Name, err)
	}
	chunk := s.meta.ChunkSize
	n := chunks(size, chunk)
	d := &Disk{
		src: src, s: s, id: id, size: size, chunk: chunk, n: n,
		limit:    cfg.Limit,
		maxRun:   max(1, cfg.MaxFetch/chunk),
		fetches:  int64(cfg.Fetches),
		log:      cfg.Logger,
		temp:     temp,
		stats:    newStats(src),
		sem:      semaphore.NewWeighted(int64(cfg.Fetches)),
		wake:     make(chan struct{}, 1),
		inflight: map[int64]*fetch{},
		refs:     make([]atomic.Uint64, (n+63)/64),
		pinned:   make([]atomic.Uint64, (n+63)/64),
	}
	d.drained = sync.NewCond(&d.mu)
	d.bufs = newRunBuffers(chunk, d.maxRun)
	d.ra.max = max(1, 4*cfg.MaxFetch/chunk)
	d.ra.last = -reorder - 2 // no stream yet: the first read starts one
	for i := range n {
		switch s.state(i) & kindMask {
		case present:
			d.resident.Add(d.chunkLen(i))
		case absent, zero:
		default: // no such state: a damaged file; fetch the chunk again
			s.setState(i, absent)
		}
	}
	d.stats.cached.Store(d.resident.Load())
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.demand, d.stopDem = context.WithCancel(context.Background())
	d.stop, d.stopped = make(chan struct{}), make(chan struct{})
	go d.committer()
	if cfg.Prefetch {
		d.bg.Add(1)
		go d.prefetchAll(cfg.PrefetchRate)
	}
	register(d)
	return d, nil
}

// Size returns the object's size.
func (d *Disk) Size() int64 { return d.size }

// ReadOnly is true: remote objects are only read.
func (d *Disk) ReadOnly() bool { return true }

// WriteAt fails: the disk is read-only.
func (d *Disk) WriteAt([]byte, int64) (int, error) {
	return 0, fmt.Errorf("write %s: %w", d.id.Name, diskserve.ErrReadOnly)
}

// Identity names the object and the version cached.
func (d *Disk) Identity() Identity { return d.id }

// ChunkSize returns the cache's chunk size.
func (d *Disk) ChunkSize() int64 { return d.chunk }

// Chunks returns the number of chunks of the object.
func (d *Disk) Chunks() int64 { return d.n }

// Dir returns the object's cache directory.
func (d *Disk) Dir() string { return d.s.dir }

// closeGrace is how long Close lets the GETs that readers started go on
// (their own and readahead): a reader that got its bytes early leaves the
// rest of its chunk coming, and cutting that off would only make the next
// run fetch it again.
const closeGrace = 5 * time.Second

// Close stops prefetch at once, lets the fetches readers started finish
// (for closeGrace at most), commits what was fetched and releases the
// cache and the source.
func (d *Disk) Close() error {
	wakeWaiters := func() {
		d.mu.Lock()
		d.drained.Broadcast() // fetches waiting for a commit see the cancel
		d.mu.Unlock()
	}
	d.cancel()
	wakeWaiters()
	grace := time.AfterFunc(closeGrace, func() {
		d.stopDem()
		wakeWaiters()
	})
	d.bg.Wait()
	grace.Stop()
	d.stopDem()
	close(d.stop)
	<-d.stopped
	err := d.commit()
	unregister(d)
	err = errors.Join(err, d.s.close(), d.src.Close())
	if d.temp {
		os.RemoveAll(d.s.dir)
	}
	return err
}

// ReadAt reads from the cache, fetching the chunks that are not there.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(d.size, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	d.readahead(off/d.chunk, (off+int64(len(p))-1)/d.chunk)
	done := 0
	for done < len(p) {
		n, err := d.read(p[done:], off+int64(done))
		done += n
		if err != nil {
			return done, fmt.Errorf("read %s at %d: %w", d.id.Name, off+int64(done), err)
		}
	}
	return done, eof
}

// read reads a leading part of p from off: a run of chunks in the cache,
// or the first chunk once it is fetched. It may return 0, nil when a
// chunk was evicted under it; the caller asks again.
func (d *Disk) read(p []byte, off int64) (int, error) {
	first := off / d.chunk
	last := (off + int64(len(p)) - 1) / d.chunk
	var words [64]uint32
	i := first
	for ; i <= last && i-first < int64(len(words)); i++ {
		w := d.s.state(i)
		if w&kindMask == absent {
			break
		}
		words[i-first] = w
	}
	if i > first {
		n := min(int64(len(p)), i*d.chunk-off)
		if _, err := d.s.data.ReadAt(p[:n], off); err != nil {
			return 0, err
		}
		for j := first; j < i; j++ {
			if d.s.state(j) != words[j-first] {
				return 0, nil // evicted while read
			}
			d.touch(j)
		}
		d.stats.hitBytes.Add(n)
		return int(n), nil
	}
	in := off - first*d.chunk
	n := min(int64(len(p)), d.chunk-in)
	f, inMemory, waited, err := d.await(first, last, in, in+n)
	if f == nil {
		return 0, err
	}
	if inMemory {
		copy(p[:n], f.buf[in:in+n])
	}
	d.release(f.st)
	if err != nil {
		return 0, err
	}
	if !inMemory {
		if _, err := d.s.data.ReadAt(p[:n], off); err != nil {
			return 0, err
		}
	}
	d.touch(first)
	if waited {
		d.stats.missBytes.Add(n)
	} else {
		d.stats.hitBytes.Add(n)
	}
	return int(n), nil
}

// await returns once bytes [in, need) of chunk first have arrived, or
// the chunk is in the data file: inMemory says which. It starts a fetch
// of chunks first to last that nobody fetches yet (at most maxRun of
// them, with one GET; or one chunk with two, see splitMin), and says
// whether it had to wait. It returns a nil fetch when the chunk turned
// out to be present; otherwise the caller releases the fetch's stream
// when done with its buffer.
func (d *Disk) await(first, last, in, need int64) (f *fetch, inMemory, waited bool, err error) {
	d.mu.Lock()
	f, ok := d.inflight[first]
	if !ok {
		if d.s.state(first)&kindMask != absent {
			d.mu.Unlock()
			return nil, false, false, nil
		}
		want := min(last+1, first+d.maxRun)
		lo, hi := d.group(first)
		crowd := d.missing.Load() >= crowdMisses && hi > first+1
		if crowd {
			want = max(want, min(hi, first+d.maxRun))
		}
		end, st := d.claim(first, want)
		f = d.inflight[first]
		if end == first+1 && d.chunk >= splitChunk && in >= d.chunk/splitMin {
			f.split = int(in &^ (splitAlign - 1))
		}
		f.st.hold()
		d.bg.Add(1)
		d.missing.Add(1)
		d.mu.Unlock()
		// The GET goes on in the background once the bytes this read
		// needs are in: the rest of the run may be read next.
		go func() {
			defer d.bg.Done()
			defer d.missing.Add(-1)
			d.sem.Acquire(context.Background(), 1) // cannot fail: no deadline
			d.fetchRun(d.demand, st, first, end)
			d.sem.Release(1)
		}()
		if crowd && lo < first {
			d.fetchAhead(lo, first, nil) // the group's head, if a GET slot is free
		}
		waited = true
	} else {
		f.st.hold()
		d.mu.Unlock()
	}
	f.st.mu.Lock()
	for !f.has(int(in), int(need)) && !isClosed(f.done) {
		waited = true
		f.st.cond.Wait()
	}
	inMemory = f.has(int(in), int(need))
	f.st.mu.Unlock()
	if inMemory {
		return f, true, waited, nil
	}
	<-f.done
	return f, false, waited, f.err
}

// group returns the chunks [lo, hi) of the fill group holding chunk i:
// the groupBytes-aligned span a crowd of misses fetches whole.
func (d *Disk) group(i int64) (lo, hi int64) {
	per := max(1, groupBytes/d.chunk)
	lo = i &^ (per - 1)
	return lo, min(lo+per, d.n)
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// claim enters fetches for the absent chunks from first, up to end, that
// nobody fetches yet, with a buffer for their GET, and returns the end of
// the run claimed and its stream, held for the caller, who passes both to
// fetchRun. d.mu is held; chunk first is absent and not in flight.
func (d *Disk) claim(first, end int64) (int64, *stream) {
	i := first + 1
	for i < end {
		if _, busy := d.inflight[i]; busy || d.s.state(i)&kindMask != absent {
			break
		}
		i++
	}
	st := &stream{buf: d.bufs.get(min(i*d.chunk, d.size) - first*d.chunk)}
	st.cond.L = &st.mu
	st.refs.Store(int32(i-first) + 1)
	for j := first; j < i; j++ {
		lo := (j - first) * d.chunk
		n := d.chunkLen(j)
		d.inflight[j] = &fetch{done: make(chan struct{}), st: st, buf: st.buf[lo : lo+n], split: int(n)}
	}
	return i, st
}

// fetchRun fetches the claimed chunks [first, end) of stream st: it takes
// their fetch lock shared with other processes, skips what another
// process fetched meanwhile, and GETs the rest. It releases the caller's
// hold on st.
func (d *Disk) fetchRun(ctx context.Context, st *stream, first, end int64) {
	defer d.release(st)
	d.mu.Lock()
	for d.pendingN >= maxPending && ctx.Err() == nil { // the disk is behind: wait for it
		d.drained.Wait()
	}
	d.mu.Unlock()
	if err := d.s.lockChunks(first, end); err != nil {
		d.fail(first, end, err)
		return
	}
	for i := first; i < end; {
		if d.s.state(i)&kindMask != absent { // another process fetched it
			d.mu.Lock()
			f := d.inflight[i]
			delete(d.inflight, i)
			d.mu.Unlock()
			d.release(f.st)
			f.finish(nil)
			d.s.unlockChunks(i, i+1)
			i++
			continue
		}
		j := i + 1
		for j < end && d.s.state(j)&kindMask == absent {
			j++
		}
		d.get(ctx, i, j)
		i = j
	}
}

// get fetches chunks [first, end), which are claimed and locked, with one
// GET, handing each chunk out as it arrives.
func (d *Disk) get(ctx context.Context, first, end int64) {
	off := first * d.chunk
	n := min(end*d.chunk, d.size) - off
	fs := make([]*fetch, end-first)
	d.mu.Lock()
	for i := range fs {
		fs[i] = d.inflight[first+int64(i)]
	}
	d.mu.Unlock()
	st := fs[0].st
	p := fs[0].buf[:n] // the chunks are consecutive in their run's buffer
	if f := fs[0]; len(fs) == 1 && f.split < len(f.buf) {
		if d.sem.TryAcquire(1) {
			d.getSplit(ctx, first, f)
			d.sem.Release(1)
			return
		}
		// No second GET slot: one GET, whose bytes readers wait for.
		st.mu.Lock()
		f.split = len(f.buf)
		st.mu.Unlock()
	}
	kinds := make([]uint32, 0, end-first)
	sums := make([]uint32, end-first)
	summed := 0 // bytes of p summed
	deliver := func(upto int) {
		// Sum the bytes that just arrived while the CPU's cache has them.
		for summed < upto {
			c := summed / int(d.chunk)
			hi := min((c+1)*int(d.chunk), upto)
			sums[c] = crc32.Update(sums[c], castagnoli, p[summed:hi])
			summed = hi
		}
		st.mu.Lock()
		for i, f := range fs[len(kinds):] {
			f.filled = int(min(max(int64(upto)-int64(len(kinds)+i)*d.chunk, 0), int64(len(f.buf))))
		}
		st.cond.Broadcast()
		st.mu.Unlock()
		// Store the chunks that have arrived whole, a batch at a time
		// (readers take their bytes from the buffer meanwhile).
		from := first + int64(len(kinds))
		to := min(first+int64(upto)/d.chunk, end)
		if int64(upto) == n {
			to = end
		}
		if to <= from || to < end && (to-from)*d.chunk < storeBatch {
			return
		}
		var err error
		kinds, err = d.store(kinds, from, p[(from-first)*d.chunk:min((to-first)*d.chunk, n)], sums[from-first:to-first])
		if err != nil {
			d.fail(from, end, err)
			end = from
			return
		}
		for i := from; i < to; i++ {
			fs[i-first].finish(nil)
		}
	}
	start := time.Now()
	d.stats.gets.Add(1)
	err := d.src.Fetch(ctx, p, off, deliver)
	d.stats.observe(time.Since(start))
	got := int64(len(kinds))
	d.stats.fetched.Add(min(got*d.chunk, n))
	if got > 0 {
		d.addPending(run{first, kinds, got * d.chunk})
	}
	if first+got < end {
		if err == nil {
			err = errors.New("fetch ended early")
		}
		d.fail(first+got, end, err)
	}
}

// getSplit fetches chunk i, which is claimed and locked, with two GETs
// at once: one from f.split, where the read that missed it starts, to
// the chunk's end, and one for the bytes before. The read waits for its
// own bytes, not for the chunk's head to stream past: where a link's
// bandwidth, not its latency, bounds a miss, streaming half a chunk ahead
// of the read's bytes costs more than a second GET.
func (d *Disk) getSplit(ctx context.Context, i int64, f *fetch) {
	arrived := func(field *int) func(int) {
		return func(k int) {
			f.st.mu.Lock()
			*field = k
			f.st.cond.Broadcast()
			f.st.mu.Unlock()
		}
	}
	start := time.Now()
	d.stats.gets.Add(2)
	var tailErr error
	var tail sync.WaitGroup
	tail.Go(func() {
		tailErr = d.src.Fetch(ctx, f.buf[f.split:], i*d.chunk+int64(f.split), arrived(&f.tail))
	})
	err := d.src.Fetch(ctx, f.buf[:f.split], i*d.chunk, arrived(&f.filled))
	tail.Wait()
	d.stats.observe(time.Since(start))
	var kinds []uint32
	if err = errors.Join(err, tailErr); err == nil {
		kinds, err = d.store(nil, i, f.buf, []uint32{crc32.Checksum(f.buf, castagnoli)})
	}
	if err != nil {
		d.fail(i, i+1, err)
		return
	}
	d.stats.fetched.Add(int64(len(f.buf)))
	f.finish(nil)
	d.addPending(run{i, kinds, int64(len(f.buf))})
}

// addPending enters fetched chunks for the next commit, and wakes the
// committer early once many wait.
func (d *Disk) addPending(r run) {
	d.mu.Lock()
	d.pending = append(d.pending, r)
	d.pendingN += r.bytes
	early := d.pendingN >= commitBytes
	d.mu.Unlock()
	if early {
		select {
		case d.wake <- struct{}{}:
		default:
		}
	}
}

// store writes fetched chunks from first on, whose bytes are b, into the
// data file with their CRC-32Cs, sums, and appends to kinds the state each
// gets at commit. Chunks of data that follow each other go in one write; a
// chunk of zeroes becomes a hole. On an error kinds comes back as given.
func (d *Disk) store(kinds []uint32, first int64, b []byte, sums []uint32) ([]uint32, error) {
	given := len(kinds)
	for j, sum := range sums {
		d.s.setSum(first+int64(j), sum)
		k := uint32(present)
		if diskserve.IsZero(d.chunkOf(b, j)) {
			k = zero
		}
		kinds = append(kinds, k)
	}
	added := kinds[given:]
	for j := 0; j < len(added); {
		off := (first + int64(j)) * d.chunk
		if added[j] == zero {
			// The file may hold bytes of a fetch cut short by a crash.
			if err := d.s.punch(off, int64(len(d.chunkOf(b, j)))); err != nil {
				return kinds[:given], err
			}
			j++
			continue
		}
		k := j + 1
		for k < len(added) && added[k] == present {
			k++
		}
		lo := int64(j) * d.chunk
		if err := d.s.writeChunk(b[lo:min(int64(k)*d.chunk, int64(len(b)))], off); err != nil {
			return kinds[:given], err
		}
		j = k
	}
	return kinds, nil
}

// chunkOf returns the bytes of the j-th chunk of b, a run of chunks.
func (d *Disk) chunkOf(b []byte, j int) []byte {
	lo := int64(j) * d.chunk
	return b[lo:min(lo+d.chunk, int64(len(b)))]
}

// fail ends the claimed chunks [first, end) with err: their waiters get
// it, later reads try again.
func (d *Disk) fail(first, end int64, err error) {
	d.mu.Lock()
	fs := make([]*fetch, 0, end-first)
	for i := first; i < end; i++ {
		fs = append(fs, d.inflight[i])
		delete(d.inflight, i)
	}
	d.mu.Unlock()
	d.s.unlockChunks(first, end)
	d.stats.failures.Add(1)
	for _, f := range fs {
		d.release(f.st)
		f.finish(err)
	}
}

// committer commits fetched chunks every commitInterval, or sooner when
// many are waiting, until Close.
func (d *Disk) committer() {
	defer close(d.stopped)
	t := time.NewTicker(commitInterval)
	defer t.Stop()
	for {
		select {
		case <-d.stop:
			return
		case <-t.C:
		case <-d.wake:
		}
		if err := d.commit(); err != nil {
			d.log.Error("cannot commit fetched chunks to the cache; they will be fetched again", "image", d.id.Name, "err", err)
		}
	}
}

// commit makes the fetched chunks durable, then marks them present and
// lets other processes at them.
func (d *Disk) commit() error {
	d.mu.Lock()
	runs := d.pending
	d.pending = nil
	d.mu.Unlock()
	if len(runs) == 0 {
		return nil
	}
	err := unix.Fdatasync(int(d.s.data.Fd()))
	var added, committed int64
	for _, r := range runs {
		end := r.first + int64(len(r.kinds))
		committed += r.bytes
		if err == nil {
			for j, k := range r.kinds {
				i := r.first + int64(j)
				d.s.setState(i, k)
				if k == present {
					added += d.chunkLen(i)
				}
			}
		}
		d.mu.Lock()
		for i := r.first; i < end; i++ {
			d.release(d.inflight[i].st)
			delete(d.inflight, i)
		}
		d.mu.Unlock()
		d.s.unlockChunks(r.first, end)
	}
	d.resident.Add(added)
	d.stats.cached.Store(d.resident.Load())
	if d.limit > 0 && d.resident.Load()+d.uncommitted() > d.limit {
		d.evict()
	}
	// Only now do the runs stop counting as pending: until they are
	// resident and room is made, new GETs must not take their room.
	d.mu.Lock()
	d.pendingN -= committed
	d.drained.Broadcast()
	d.mu.Unlock()
	return err
}

// uncommitted bounds the bytes of fetched chunks in the data file that are
// not yet committed, and so not counted as resident: those awaiting a
// commit (new GETs wait past maxPending of them) and what the GETs in
// flight bring meanwhile.
func (d *Disk) uncommitted() int64 { return maxPending + d.fetches*d.maxRun*d.chunk }

// chunkLen is the length of chunk i: chunk, or less for the last one.
func (d *Disk) chunkLen(i int64) int64 { return min(d.chunk, d.size-i*d.chunk) }

// touch notes that chunk i was read, for eviction.
func (d *Disk) touch(i int64) {
	if d.limit > 0 {
		w := &d.refs[i/64]
		if bit := uint64(1) << (i % 64); w.Load()&bit == 0 {
			w.Or(bit)
		}
	}
}

// Pin keeps the chunks of [off, off+n) in the cache: eviction passes them
// by. Formats pin their metadata.
func (d *Disk) Pin(off, n int64) {
	if n <= 0 || off < 0 || off >= d.size {
		return
	}
	for i := off / d.chunk; i <= min(off+n-1, d.size-1)/d.chunk; i++ {
		d.pinned[i/64].Or(1 << (i % 64))
	}
}

// evict drops chunks, least recently read first (an approximation: a
// clock over read bits), until the cache holds at most 90% of its limit
// less what may arrive before the next commit, so that the data file
// never holds more than the limit.
// Chunks another process is fetching, or reading through a shared lock,
// are passed by.
func (d *Disk) evict() {
	if !d.evictMu.TryLock() {
		return
	}
	defer d.evictMu.Unlock()
	var resident int64 // recount: other processes may have added chunks
	for i := range d.n {
		if d.s.state(i)&kindMask == present {
			resident += d.chunkLen(i)
		}
	}
	target := max(0, d.limit/10*9-d.uncommitted())
	for scanned := int64(0); resident > target && scanned < 2*d.n; scanned++ {
		i := d.hand
		d.hand = (d.hand + 1) % d.n
		bit := uint64(1) << (i % 64)
		if d.s.state(i)&kindMask != present || d.pinned[i/64].Load()&bit != 0 {
			continue
		}
		if d.refs[i/64].Load()&bit != 0 {
			d.refs[i/64].And(^bit)
			continue
		}
		if !d.s.tryLockChunks(i, i+1) {
			continue
		}
		if d.s.state(i)&kindMask == present {
			d.s.setState(i, absent) // before the hole: readers see the change
			d.s.punch(i*d.chunk, d.chunkLen(i))
			resident -= d.chunkLen(i)
			d.stats.evictions.Add(1)
		}
		d.s.unlockChunks(i, i+1)
	}
	d.resident.Store(resident)
	d.stats.cached.Store(resident)
}

// MapHost maps ranges whose chunks are all in the cache onto the data
// file, so that exporters send them with sendfile or io_uring. A cache
// with a limit maps nothing: eviction could punch a mapped range.
func (d *Disk) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	if write || d.limit > 0 {
		return diskserve.HostRange{}, false
	}
	for i := off / d.chunk; i <= (off+n-1)/d.chunk; i++ {
		if d.s.state(i)&kindMask == absent {
			return diskserve.HostRange{}, false
		}
	}
	d.stats.hitBytes.Add(n)
	return diskserve.HostRange{FD: int(d.s.data.Fd()), Off: off}, true
}

// AppendExtents reports chunks known to be all zeroes as zero, and the
// rest as data.
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	end := off + n
	for off < end {
		i := off / d.chunk
		next := min(end, (i+1)*d.chunk)
		var flags diskserve.ExtentFlags
		if d.s.state(i)&kindMask == zero {
			flags = diskserve.ExtentZero
		}
		dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: off, Len: next - off, Flags: flags})
		off = next
	}
	return dst, nil
}

// Describe names the object, its version and the cache's state.
func (d *Disk) Describe(info *diskserve.Info) {
	info.Filename = d.id.Name
	st := d.State()
	info.Specific = map[string]any{
		"url":           d.id.Name,
		"validator":     d.id.Validator,
		"cache":         d.s.dir,
		"chunk-size":    d.chunk,
		"chunks":        d.n,
		"chunks-cached": st.Chunks,
		"bytes-cached":  st.Bytes,
	}
}

// A State is how much of an object a cache holds.
type State struct {
	Chunks int64 // present or known to be zero
	Bytes  int64 // of data in present chunks
}

// State counts the chunks in the cache, committing those fetched first.
func (d *Disk) State() State {
	d.commit()
	return countState(d.s, d.n, d.chunkLen)
}

func countState(s *store, n int64, chunkLen func(int64) int64) State {
	var st State
	for i := range n {
		switch s.state(i) & kindMask {
		case present:
			st.Chunks++
			st.Bytes += chunkLen(i)
		case zero:
			st.Chunks++
		}
	}
	return st
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)
