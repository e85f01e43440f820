package zstd

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"runtime"
	"runtime/metrics"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sync/semaphore"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// image writes data as a seekable image of frameSize frames.
func image(t testing.TB, data []byte, frameSize int64) []byte {
	t.Helper()
	var out bytes.Buffer
	if err := Write(context.Background(), &out, disktest.NewMemory(data, true), WriteOptions{FrameSize: frameSize, Level: 1}, nil); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// TestHugeFrameRefused opens an image of a few hundred bytes whose seek
// table claims a frame of 1 GiB, within the format's limit: it is refused
// at open, naming the cap and the conversion that fixes it, without
// allocating anything near what it claims. (It used to open, and every
// read allocated a gigabyte before failing.)
func TestHugeFrameRefused(t *testing.T) {
	b := image(t, make([]byte, 4096), 4096)
	binary.LittleEndian.PutUint32(b[len(b)-9-12+4:], 1<<30) // the one frame's decompressed size
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := parse(disktest.NewMemory(b, true))
	runtime.ReadMemStats(&after)
	if err == nil || !strings.Contains(err.Error(), "frame_size=") || !strings.Contains(err.Error(), "32 MiB") {
		t.Fatalf("open: %v", err)
	}
	if grown := after.TotalAlloc - before.TotalAlloc; grown > 1<<20 {
		t.Errorf("refusing it allocated %d bytes", grown)
	}
}

// TestReadAheadEndsWithClose opens, reads up to a frame's end (which
// starts a read-ahead of the next frame) and closes an image 20 times:
// when Close returns, no goroutine of the image is left. (Close used to
// return with the read-ahead still decompressing, on a decoder it had
// just closed.)
func TestReadAheadEndsWithClose(t *testing.T) {
	const line = "diskserve read-ahead, frame after frame "
	text := make([]byte, 32<<20)
	for i := range text {
		text[i] = line[i%len(line)] ^ byte(i>>12)
	}
	b := image(t, text, 8<<20)
	p := make([]byte, 8<<20)
	cycle := func() {
		d, err := parse(disktest.NewMemory(b, true))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.ReadAt(p, 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 1<<20)
	for i := range 20 {
		cycle()
		// Right after Close, no goroutine may still run the image's code.
		stacks := string(buf[:runtime.Stack(buf, true)])
		for _, g := range strings.Split(stacks, "\n\n") {
			if strings.Contains(g, "zstd.(*Disk).") && !strings.Contains(g, "TestReadAheadEndsWithClose") {
				t.Fatalf("cycle %d: a goroutine of the image runs after Close:\n%s", i, g)
			}
		}
	}
}

// TestExtentsDoNotDependOnReads asks a fresh image for its extents: its
// frames of zeroes are zero ranges before anything was read, and the
// answer is the same after every frame was read. (Zero frames used to be
// found only by reading them.)
func TestExtentsDoNotDependOnReads(t *testing.T) {
	data := make([]byte, 4<<20)
	rand.NewChaCha8([32]byte{1}).Read(data[1<<20 : 2<<20])
	b := image(t, data, 256<<10)
	d, err := parse(disktest.NewMemory(b, true))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	first, err := diskserve.Extents(d, nil, 0, d.Size())
	if err != nil {
		t.Fatal(err)
	}
	want := []diskserve.Extent{{Off: 0, Len: 1 << 20, Flags: diskserve.ExtentZero}, {Off: 1 << 20, Len: 1 << 20}, {Off: 2 << 20, Len: 2 << 20, Flags: diskserve.ExtentZero}}
	if !equalExtents(first, want) {
		t.Fatalf("extents of a fresh image: %+v, want %+v", first, want)
	}
	if _, err := d.ReadAt(make([]byte, d.Size()), 0); err != nil {
		t.Fatal(err)
	}
	if again, _ := diskserve.Extents(d, nil, 0, d.Size()); !equalExtents(again, want) {
		t.Fatalf("extents after reading: %+v", again)
	}
}

func equalExtents(a, b []diskserve.Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestParallelReadersBounded reads an image of large frames from 16
// goroutines at random, with the process-wide cache and budget shrunk to
// 8 MiB each: the heap a collection finds live never holds more than the
// two and a little, where frames decompressed in parallel by every reader
// would hold 16 frames and a cache per image all 48.
func TestParallelReadersBounded(t *testing.T) {
	const readers = 16
	const frameSize = 2 << 20
	oldFrames, oldUse := frames, inUse
	frames, inUse = newFrameCache(8<<20), semaphore.NewWeighted(8<<20)
	defer func() { frames, inUse = oldFrames, oldUse }()
	data := make([]byte, 48*frameSize)
	for i := range data {
		data[i] = byte(i / 4096 % 251)
	}
	b := image(t, data, frameSize)
	data = nil
	d, err := parse(disktest.NewMemory(b, true))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	base := liveHeap()

	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if live := liveHeap(); live > peak.Load() {
				peak.Store(live)
			}
		}
	}()
	var wg sync.WaitGroup
	for r := range readers {
		wg.Go(func() {
			rnd := rand.New(rand.NewPCG(uint64(r), 9))
			p := make([]byte, 4096)
			for range 40 {
				off := rnd.Int64N(d.Size()-4096) &^ 4095
				if _, err := d.ReadAt(p, off); err != nil {
					t.Error(err)
					return
				}
				if p[0] != byte(off/4096%251) {
					t.Errorf("read at %d: wrong data", off)
					return
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	<-sampled
	grown := int64(peak.Load()) - int64(base)
	t.Logf("peak live heap over the base: %d MiB", grown>>20)
	if limit := int64(8<<20 + 8<<20 + 4*frameSize); grown > limit {
		t.Errorf("16 readers kept %d MiB live, more than the cache, the budget and some slack (%d MiB)", grown>>20, limit>>20)
	}
}

// liveHeap collects garbage and returns the bytes of heap the collection
// found live (allocations since do not count, unlike HeapAlloc's).
func liveHeap() uint64 {
	runtime.GC()
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}
