package qcow2_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/qcow2"
)

// TestCrashStatesUnderConcurrentFlushes runs allocating writes and
// discards on four goroutines while a fifth flushes after each, so
// that flushes write metadata that the others are changing, with a
// metadata cache small enough to flush when full and to evict. Every
// state a crash could leave must open with no refcount below its
// references, and the image reads as the model says at the end.
func TestCrashStatesUnderConcurrentFlushes(t *testing.T) {
	const size = 4 << 20
	path := filepath.Join(t.TempDir(), "img.qcow2")
	if err := qcow2.Create(path, qcow2.CreateOptions{Size: size, ClusterSize: 4096}); err != nil {
		t.Fatal(err)
	}
	fresh, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	file := &recordingFile{growable: &growable{b: bytes.Clone(fresh)}, recording: true}
	opts := memOptions("img", nil)
	opts.ReadOnly = false
	opts.MetadataCache = 16 * 4096
	opts.OpenFile = func(string, bool) (diskserve.DiskFile, error) { return file, nil }
	d, err := diskserve.Open("img", opts)
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)    // each writer owns a quarter of it
	kick := make(chan struct{}, 1) // a write is done: flush
	var writers sync.WaitGroup
	errs := make(chan error, 5)
	for g := range 4 {
		writers.Add(1)
		go func() {
			defer writers.Done()
			rnd := rand.New(rand.NewPCG(uint64(g), 3))
			base := int64(g) * size / 4
			for range 150 {
				off := base + rnd.Int64N(size/4/512-32)*512
				n := (1 + rnd.Int64N(32)) * 512
				var err error
				if rnd.IntN(5) == 0 {
					err = diskserve.WriteZeroes(d, off, n, diskserve.ZeroMayUnmap)
					clear(model[off : off+n])
				} else {
					p := bytes.Repeat([]byte{byte(1 + rnd.IntN(255))}, int(n))
					_, err = d.WriteAt(p, off)
					copy(model[off:], p)
				}
				if err != nil {
					errs <- err
					return
				}
				select {
				case kick <- struct{}{}:
				default:
				}
			}
		}()
	}
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				errs <- nil
				return
			case <-kick:
			}
			if err := diskserve.Flush(d); err != nil {
				errs <- err
				return
			}
		}
	}()
	writers.Wait()
	close(stop)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}

	states := 0
	err = crashStates(fresh, file.ops, rand.New(rand.NewPCG(5, 6)), func(st []byte) error {
		states++
		c, err := diskserve.Open("img", memOptions("img", st))
		if err != nil {
			return fmt.Errorf("state %d: does not open: %w", states, err)
		}
		defer c.Close()
		r, err := diskserve.Check(c, diskserve.RepairNone)
		if err != nil {
			return fmt.Errorf("state %d: check: %w", states, err)
		}
		for _, m := range r.Messages {
			if !strings.HasPrefix(m, "Leaked cluster") {
				return fmt.Errorf("state %d: %s", states, m)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d file operations, %d crash states", len(file.ops), states)
	got := make([]byte, size)
	if err := diskserve.ReadFullAt(memDisk(t, file.b), got, 0); err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if got[i] != model[i] {
			t.Fatalf("byte %d reads %d, want %d", i, got[i], model[i])
		}
	}
}

// memDisk opens the qcow2 image b read-only.
func memDisk(t *testing.T, b []byte) diskserve.DiskFile {
	t.Helper()
	d, err := diskserve.Open("img", memOptions("img", b))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}
