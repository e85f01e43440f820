package control

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/prometheus/client_golang/prometheus"
)

// TestOverlayUnderLoad puts overlays on and commits a Live disk while goroutines
// read and write it: no request fails, each goroutine reads back its own
// last write, and afterwards the image holds every write.
func TestOverlayUnderLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(path, make([]byte, 8<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := diskserve.Options{Format: "raw"}
	d, err := format.Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	l := NewLive(d, opts)
	const workers = 8
	want := make([][]byte, workers) // each worker's 64 KiB slot
	var stop atomic.Bool
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			rnd := rand.New(rand.NewPCG(uint64(w), 5))
			buf := make([]byte, 64<<10)
			got := make([]byte, len(buf))
			off := int64(w) << 20
			for !stop.Load() {
				for i := range buf {
					buf[i] = byte(rnd.Uint32())
				}
				if _, err := l.WriteAt(buf, off); err != nil {
					t.Errorf("write during snapshots: %v", err)
					return
				}
				if err := diskserve.ReadFullAt(l, got, off); err != nil || !bytes.Equal(got, buf) {
					t.Errorf("read back during snapshots: %v", err)
					return
				}
				want[w] = bytes.Clone(buf)
			}
		})
	}
	for i := range 3 {
		if err := l.Overlay(filepath.Join(dir, "ov"+string(rune('a'+i))+".qcow2")); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Overlay(filepath.Join(dir, "ova.qcow2")); err == nil {
		t.Error("a snapshot onto an existing file succeeded")
	}
	for range 3 {
		if err := l.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Commit(); err == nil {
		t.Error("a commit of a raw image succeeded")
	}
	stop.Store(true)
	wg.Wait()
	if info := diskserve.Describe(l); info.Format != "raw" || info.Filename != path {
		t.Fatalf("after three commits the export is %s %s", info.Format, info.Filename)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	for w := range workers {
		if !bytes.Equal(b[w<<20:w<<20+64<<10], want[w]) {
			t.Fatalf("worker %d's last write is not in the image", w)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "ov*.qcow2")); len(left) != 0 {
		t.Errorf("overlays left after commit: %v", left)
	}
}

// TestWrappersForward holds Live and the metrics wrapper to the capability
// list: each forwards every capability and maps no host range, so that no
// request passes the lock or the counters.
func TestWrappersForward(t *testing.T) {
	mem := disktest.NewMemory(make([]byte, 1<<20), false)
	disktest.CheckWrapper(t, NewLive(mem, diskserve.Options{}), false)
	disktest.CheckWrapper(t, NewMetrics(prometheus.NewRegistry()).Metered("x", mem), false)
}
