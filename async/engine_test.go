package async

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/format/zstd"
	"github.com/diskserve/diskserve/internal/aligned"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/testtool"
)

// engines are the constructors every test runs with.
var engines = []struct {
	name string
	new  func(t testing.TB, d diskserve.DiskFile) Engine
}{
	{"pool", func(t testing.TB, d diskserve.DiskFile) Engine { return NewPool(d, 0) }},
	{"uring", func(t testing.TB, d diskserve.DiskFile) Engine {
		needUring(t)
		e, err := NewUring(d, 0)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}},
}

// needUring skips a test where the kernel refuses io_uring, except under
// DISKSERVE_REQUIRE_INTEROP=1, where that is a failure.
func needUring(t testing.TB) {
	t.Helper()
	if err := uringSupported(); err != nil {
		if os.Getenv(testtool.RequireEnv) == "1" {
			t.Fatalf("io_uring is required (%s=1): %v", testtool.RequireEnv, err)
		}
		t.Skipf("io_uring unavailable: %v", err)
	}
}

// pattern is the content of testdata/raw/pattern.img, which the other
// golden images of that directory hold too.
func pattern(t testing.TB) []byte {
	b, err := os.ReadFile("../testdata/raw/pattern.img")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// copyFile copies a golden image into dir, so tests may write it.
func copyFile(t testing.TB, src, dir string) string {
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, filepath.Base(src))
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return dst
}

// images returns, per format, a fresh image of want's content, and
// want.
func images(t *testing.T) (map[string]string, []byte) {
	dir := t.TempDir()
	want := pattern(t)
	paths := map[string]string{
		"raw":    copyFile(t, "../testdata/raw/pattern.img", dir),
		"qcow2":  copyFile(t, "../testdata/qcow2/pattern.qcow2", dir),
		"sparse": copyFile(t, "../testdata/sparse/pattern.simg", dir),
	}
	src := disktest.NewMemory(want, true)
	var z bytes.Buffer
	if err := zstd.Write(context.Background(), &z, src, zstd.WriteOptions{FrameSize: 64 << 10}, nil); err != nil {
		t.Fatal(err)
	}
	paths["zstd"] = filepath.Join(dir, "pattern.zst")
	os.WriteFile(paths["zstd"], z.Bytes(), 0o644)

	// A composite of two raw halves and the qcow2 image's second half, so
	// that requests map, cross components and fall back.
	half := int64(len(want) / 2)
	os.WriteFile(filepath.Join(dir, "c0"), want[:half/2], 0o644)
	os.WriteFile(filepath.Join(dir, "c1"), want[half/2:half], 0o644)
	q := filepath.Join(dir, "c2.qcow2")
	os.WriteFile(q, mustRead(t, paths["qcow2"]), 0o644)
	spec := &composite.Spec{Version: 2, Length: int64(len(want)), Components: []composite.Component{
		{Path: "c0", Offset: 0, Writable: true},
		{Path: "c1", Offset: half / 2, Writable: true},
		{Path: "c2.qcow2", Offset: half, FileOffset: half, Writable: true},
	}}
	paths["composite"] = filepath.Join(dir, "disk.composite")
	os.WriteFile(paths["composite"], spec.Marshal(), 0o644)
	return paths, want
}

func mustRead(t testing.TB, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestConformance runs the conformance suite through each engine on each
// format, read-write where the format writes.
func TestConformance(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			paths, want := images(t)
			for _, f := range []string{"raw", "qcow2", "composite", "sparse", "zstd"} {
				t.Run(f, func(t *testing.T) {
					d, err := format.Open(paths[f], diskserve.Options{})
					if errors.Is(err, diskserve.ErrReadOnly) || err != nil && strings.Contains(err.Error(), "read-only") {
						d, err = format.Open(paths[f], diskserve.Options{ReadOnly: true})
					}
					if err != nil {
						t.Fatal(err)
					}
					v := NewDisk(eng.new(t, d), d)
					defer v.Close()
					disktest.Check(t, v, want)
				})
			}
		})
	}
}

// TestConformanceDirect runs the conformance suite through each engine on
// images whose files are open with O_DIRECT: io_uring takes the reads whose
// offset, length and buffer are aligned, the disk the others.
func TestConformanceDirect(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			paths, want := images(t)
			for _, f := range []string{"raw", "composite"} {
				t.Run(f, func(t *testing.T) {
					d, err := format.Open(paths[f], diskserve.Options{OpenFile: raw.OpenFileDirect})
					if err != nil {
						t.Fatal(err)
					}
					v := NewDisk(eng.new(t, d), d)
					defer v.Close()
					disktest.CheckWith(t, v, want, disktest.Options{ByteReads: 8 << 10})
				})
			}
		})
	}
}

// TestDirectRingWritesAndReadModifyWrites has io_uring write whole
// blocks of an O_DIRECT disk while the disk reads, modifies and writes back
// blocks for unaligned writes beside them, into the same blocks: neither
// may undo the other.
func TestDirectRingWritesAndReadModifyWrites(t *testing.T) {
	if err := uringSupported(); err != nil {
		t.Skip(err)
	}
	const blocks, block = 32, 4096
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, make([]byte, blocks*block), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := raw.OpenFileDirect(path, false)
	if err != nil {
		t.Fatal(err)
	}
	e, err := NewUring(d, 0)
	if err != nil {
		t.Fatal(err)
	}
	v := NewDisk(e, d)
	defer v.Close()
	// Each block's first 64 bytes take unaligned writes, and then the
	// whole block is rewritten aligned, over and over; the last writer
	// of each leaves a known pattern.
	var wg sync.WaitGroup
	for b := range int64(blocks) {
		wg.Go(func() {
			whole := aligned.Bytes(block)
			for r := range 20 {
				for i := range whole {
					whole[i] = byte(r)
				}
				if _, err := v.WriteAt(whole, b*block); err != nil {
					t.Error(err)
					return
				}
			}
		})
		wg.Go(func() {
			for r := range 20 {
				p := bytes.Repeat([]byte{byte(100 + r)}, 7)
				if _, err := v.WriteAt(p, b*block+int64(r%8)*8+1); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	got := make([]byte, blocks*block)
	if _, err := v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for b := range blocks {
		blk := got[b*block : (b+1)*block]
		// Bytes past the unaligned writers' reach hold the last aligned
		// write's byte, 19, whatever the order.
		for i := 128; i < block; i++ {
			if blk[i] != 19 {
				t.Fatalf("block %d byte %d is %d, want 19: a read-modify-write undid an aligned write", b, i, blk[i])
			}
		}
	}
}

// TestAutoPerCacheMode: auto picks io_uring for a disk open with O_DIRECT
// and the pool for one in the page cache.
func TestAutoPerCacheMode(t *testing.T) {
	if err := uringSupported(); err != nil {
		t.Skip(err)
	}
	paths, _ := images(t)
	for _, tc := range []struct {
		open func(string, bool) (diskserve.DiskFile, error)
		want string
	}{{raw.OpenFile, "pool"}, {raw.OpenFileDirect, "uring"}} {
		d, err := tc.open(paths["raw"], false)
		if err != nil {
			t.Fatal(err)
		}
		e, err := New(d, Options{Mode: Auto})
		if err != nil {
			t.Fatal(err)
		}
		if e.Name() != tc.want {
			t.Errorf("auto chose %s, want %s", e.Name(), tc.want)
		}
		e.Close()
		d.Close()
	}
}

// rawDisk returns a raw image of size random bytes, open read-write, and
// its content.
func rawDisk(t testing.TB, dir string, size int) (diskserve.DiskFile, []byte) {
	want := make([]byte, size)
	rand.NewChaCha8([32]byte{1}).Read(want)
	path := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(path, want, 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := format.Open(path, diskserve.Options{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	return d, want
}

// evict drops a raw disk's file from the page cache, so that writes to it
// are pwrites (on the ring, with io_uring) until their pages are cached
// again, and stores into the mapping after that.
func evict(t testing.TB, d diskserve.DiskFile) {
	t.Helper()
	hr, ok := diskserve.MapHost(d, 0, 1, false)
	if !ok {
		t.Fatal("a raw disk maps no read")
	}
	if err := diskserve.Flush(d); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(hr.FD, 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentSubmit keeps many requests in flight from many goroutines:
// reads of one half of each goroutine's range, checked byte for byte, and
// writes to the other half, each in-flight slot on its own blocks; then
// the whole disk is compared with the model. The disk starts out of the
// page cache, so that writes take both paths of raw: pwrite and stores.
func TestConcurrentSubmit(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			d, want := rawDisk(t, t.TempDir(), 8<<20)
			defer d.Close()
			evict(t, d)
			e := eng.new(t, d)
			const workers, perWorker, depth, bs = 8, 400, 16, 4096
			region := int64(len(want) / workers)
			var wg sync.WaitGroup
			for w := range workers {
				wg.Go(func() {
					rnd := rand.New(rand.NewPCG(uint64(w), 7))
					fill := rand.NewChaCha8([32]byte{byte(w)})
					base := int64(w) * region
					results := make(chan *Request, depth)
					slots := map[*Request]int64{}
					for k := range depth {
						r := &Request{Buf: make([]byte, bs), Off: -1, Done: func(r *Request) { results <- r }}
						slots[r] = int64(k)
						results <- r
					}
					for range perWorker {
						r := <-results
						if r.Err != nil {
							t.Errorf("%v at %d: %v", r.Op, r.Off, r.Err)
						}
						if r.Op == OpRead && r.Off >= 0 && !bytes.Equal(r.Buf, want[r.Off:r.Off+bs]) {
							t.Errorf("read at %d returned the wrong bytes", r.Off)
						}
						if rnd.IntN(3) == 0 {
							blocks := region / 2 / bs / depth
							r.Op = OpWrite
							r.Off = base + region/2 + (rnd.Int64N(blocks)*depth+slots[r])*bs
							fill.Read(r.Buf)
							copy(want[r.Off:], r.Buf) // no other request touches this block now
						} else {
							r.Op = OpRead
							r.Off = base + rnd.Int64N(region/2-bs)
						}
						e.Submit(r)
					}
					for range depth {
						if r := <-results; r.Err != nil {
							t.Errorf("%v at %d: %v", r.Op, r.Off, r.Err)
						}
					}
				})
			}
			wg.Wait()
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(want))
			if _, err := d.ReadAt(got, 0); err != nil && err != io.EOF {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("content differs after concurrent writes")
			}
		})
	}
}

// TestCloseInFlight closes engines while goroutines keep submitting: every
// request completes exactly once, successfully or with ErrClosed, nothing
// hangs, and no goroutine is left behind.
func TestCloseInFlight(t *testing.T) {
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			before := runtime.NumGoroutine()
			d, _ := rawDisk(t, t.TempDir(), 4<<20)
			defer d.Close()
			for round := range 20 {
				e := eng.new(t, d)
				var submitted, completed, failed atomic.Int64
				var wg sync.WaitGroup
				stop := make(chan struct{})
				for w := range 4 {
					wg.Go(func() {
						calls := make([]atomic.Int32, 64)
						var pending sync.WaitGroup
						for i := 0; ; i++ {
							select {
							case <-stop:
								pending.Wait()
								for k := range calls {
									if n := calls[k].Load(); n > 1 {
										t.Errorf("request %d completed %d times", k, n)
									}
								}
								return
							default:
							}
							k := i % len(calls)
							calls[k].Store(0)
							op := OpRead
							if (w+i)%4 == 0 {
								op = OpWrite
							}
							r := &Request{Op: op, Off: int64(k) * 4096, Buf: make([]byte, 4096), Done: func(r *Request) {
								calls[k].Add(1)
								completed.Add(1)
								if r.Err != nil {
									if !errors.Is(r.Err, ErrClosed) {
										t.Errorf("%v: %v", r.Op, r.Err)
									}
									failed.Add(1)
								}
								pending.Done()
							}}
							pending.Add(1)
							submitted.Add(1)
							e.Submit(r)
							pending.Wait() // one in flight per slot, so calls[k] counts one request
						}
					})
				}
				time.Sleep(time.Duration(round%5) * time.Millisecond)
				closed := make(chan error)
				go func() { closed <- e.Close() }()
				select {
				case err := <-closed:
					if err != nil {
						t.Fatal(err)
					}
				case <-time.After(10 * time.Second):
					t.Fatal("Close hangs")
				}
				close(stop)
				wg.Wait()
				if submitted.Load() != completed.Load() {
					t.Fatalf("round %d: %d submitted, %d completed", round, submitted.Load(), completed.Load())
				}
			}
			waitGoroutines(t, before)
		})
	}
}

// waitGoroutines fails if more goroutines than before are still running a
// moment after a test's engines closed.
func waitGoroutines(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines before, %d after:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestForcedFallback makes io_uring look missing: asking for uring falls
// back to the pool and says so once, and NewUring fails with the reason.
func TestForcedFallback(t *testing.T) {
	saved := uringProbe
	t.Cleanup(func() { uringProbe = saved; fallbackOnce = sync.Once{} })
	uringProbe = func() error { return fmt.Errorf("io_uring_setup: %w", syscall.ENOSYS) }
	fallbackOnce = sync.Once{}

	d, want := rawDisk(t, t.TempDir(), 1<<20)
	defer d.Close()
	var log bytes.Buffer
	for range 2 {
		e, err := New(d, Options{Mode: Uring, Logger: slog.New(slog.NewTextHandler(&log, nil))})
		if err != nil {
			t.Fatal(err)
		}
		if e.Name() != "pool" {
			t.Fatalf("got the %s engine with io_uring missing", e.Name())
		}
		v := NewDisk(e, d)
		got := make([]byte, 4096)
		if _, err := v.ReadAt(got, 8192); err != nil || !bytes.Equal(got, want[8192:8192+4096]) {
			t.Fatalf("read through the fallback: %v", err)
		}
		e.Close()
	}
	if n := strings.Count(log.String(), "io_uring unavailable"); n != 1 || !strings.Contains(log.String(), "function not implemented") {
		t.Fatalf("fallback logged %d times, want once with the reason:\n%s", n, log.String())
	}
	if _, err := NewUring(d, 0); !errors.Is(err, syscall.ENOSYS) {
		t.Fatalf("NewUring without io_uring: %v", err)
	}
}

// TestENOSPC writes to a raw image on a tmpfs too small to hold it: the
// kernel's ENOSPC reaches the caller through each engine.
func TestENOSPC(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv(testtool.RequireEnv) == "1" {
			t.Fatal("mounting a tmpfs needs root")
		}
		t.Skip("mounting a tmpfs needs root")
	}
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
			path := filepath.Join(dir, "disk.raw")
			if err := os.Truncate(path, 0); err != nil && !os.IsNotExist(err) {
				t.Fatal(err)
			}
			f, _ := os.Create(path)
			f.Truncate(8 << 20)
			f.Close()
			d, err := format.Open(path, diskserve.Options{Format: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			v := NewDisk(eng.new(t, d), d)
			defer v.Close()
			buf := bytes.Repeat([]byte{0xab}, 64<<10)
			var werr error
			for off := int64(0); off < v.Size() && werr == nil; off += int64(len(buf)) {
				_, werr = v.WriteAt(buf, off)
			}
			if !errors.Is(werr, syscall.ENOSPC) {
				t.Fatalf("filling a 1 MiB tmpfs: %v, want ENOSPC", werr)
			}
		})
	}
}

// TestNoAllocs pins the request path: a read or write through the Disk
// view allocates nothing in the steady state.
func TestNoAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, eng := range engines {
		t.Run(eng.name, func(t *testing.T) {
			d, _ := rawDisk(t, t.TempDir(), 1<<20)
			v := NewDisk(eng.new(t, d), d)
			defer v.Close()
			buf := make([]byte, 4096)
			for _, op := range []string{"read", "write"} {
				allocs := testing.AllocsPerRun(200, func() {
					var err error
					if op == "read" {
						_, err = v.ReadAt(buf, 4096)
					} else {
						_, err = v.WriteAt(buf, 8192)
					}
					if err != nil {
						t.Fatal(err)
					}
				})
				if allocs != 0 {
					t.Errorf("%s: %v allocations per request", op, allocs)
				}
			}
		})
	}
}

// TestDiskIsAWrapper holds the engine's disk to the capability list: it
// forwards every capability, and maps reads (so that exporters can send
// cached data from the host file) by choice.
func TestDiskIsAWrapper(t *testing.T) {
	w, err := Wrap(disktest.NewMemory(make([]byte, 1<<20), false), Options{Mode: Pool})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	disktest.CheckWrapper(t, w, true)
}
