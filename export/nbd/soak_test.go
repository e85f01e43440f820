package nbd

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/format/zstd"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/faultdisk"
)

var soakTime = flag.Duration("soak", 2*time.Minute, "how long TestSoak runs")

// Soak layout: every client owns a slot of each writable export, which
// only it writes, so that it can model the slot's content exactly.
const (
	soakClients  = 64
	soakSlot     = 256 << 10
	soakDiskSize = soakClients * soakSlot
)

// soakExport is an export of the soak test: its disk, the fault injector
// beneath the engine, and the content it started with.
type soakExport struct {
	name     string
	faults   *faultdisk.Disk
	initial  []byte
	writable bool
}

// TestSoak serves a raw, a qcow2 and a seekable zstd image to 64 clients
// for -soak (2 minutes by default), each mixing reads, writes, zeroes,
// trims, flushes and disconnects, with some connections sending garbage
// instead and faults injected into the disks now and then. Afterwards
// nothing has panicked, goroutines and memory are back to where they were,
// and every write the server acknowledged reads back.
func TestSoak(t *testing.T) {
	dir := t.TempDir()
	initial := make([]byte, soakDiskSize)
	rand.NewChaCha8([32]byte{3}).Read(initial)
	rawPath := filepath.Join(dir, "soak.raw")
	if err := os.WriteFile(rawPath, initial, 0o644); err != nil {
		t.Fatal(err)
	}
	qcowPath := filepath.Join(dir, "soak.qcow2")
	if err := qcow2.Create(qcowPath, qcow2.CreateOptions{Size: soakDiskSize}); err != nil {
		t.Fatal(err)
	}
	zstdPath := filepath.Join(dir, "soak.zst")
	zf, err := os.Create(zstdPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := zstd.Write(context.Background(), zf, disktest.NewMemory(initial, true), zstd.WriteOptions{FrameSize: 64 << 10}, nil); err != nil {
		t.Fatal(err)
	}
	zf.Close()

	baseGoroutines, baseHeap := settle()
	var exports []Export
	var soaks []*soakExport
	for _, e := range []struct {
		name, path string
		initial    []byte
		readOnly   bool
	}{{"raw", rawPath, initial, false}, {"qcow2", qcowPath, make([]byte, soakDiskSize), false}, {"zstd", zstdPath, initial, true}} {
		d, err := format.Open(e.path, diskserve.Options{ReadOnly: e.readOnly})
		if err != nil {
			t.Fatal(err)
		}
		fd := faultdisk.New(d)
		w, err := async.Wrap(fd, async.Options{Mode: async.Pool})
		if err != nil {
			t.Fatal(err)
		}
		exports = append(exports, Export{Name: e.name, Disk: w})
		soaks = append(soaks, &soakExport{name: e.name, faults: fd, initial: e.initial, writable: !e.readOnly})
	}
	srv, path := start(t, exports, Options{HandshakeTimeout: 2 * time.Second})

	deadline := time.Now().Add(*soakTime)
	var ops, failed, hostile atomic.Int64
	var wg sync.WaitGroup
	// Faults: now and then, for a moment, one kind of request fails with
	// EIO on one disk after a few more succeed.
	stopFaults := make(chan struct{})
	wg.Go(func() {
		rnd := rand.New(rand.NewPCG(1, 1))
		for {
			select {
			case <-stopFaults:
				for _, s := range soaks {
					for op := faultdisk.Read; op <= faultdisk.Flush; op++ {
						s.faults.Fail(op, nil, 0)
					}
				}
				return
			case <-time.After(time.Duration(50+rnd.IntN(150)) * time.Millisecond):
			}
			for _, s := range soaks { // heal, then maybe break one
				for op := faultdisk.Read; op <= faultdisk.Flush; op++ {
					s.faults.Fail(op, nil, 0)
				}
			}
			if rnd.IntN(4) == 0 {
				s := soaks[rnd.IntN(len(soaks))]
				s.faults.Fail(faultdisk.Op(rnd.IntN(3)), errors.New("injected fault"), int64(rnd.IntN(100)))
			}
		}
	})
	models := make([][][]byte, soakClients) // [client][export] slot content as acknowledged
	for c := range soakClients {
		models[c] = make([][]byte, len(soaks))
		for i, s := range soaks {
			models[c][i] = bytes.Clone(s.initial[c*soakSlot : (c+1)*soakSlot])
		}
		wg.Go(func() {
			rnd := rand.New(rand.NewPCG(uint64(c), 7))
			buf := make([]byte, 64<<10)
			for time.Now().Before(deadline) {
				if rnd.IntN(40) == 0 { // a hostile connection instead
					hostile.Add(1)
					if conn, err := net.Dial("unix", path); err == nil {
						junk := make([]byte, 1+rnd.IntN(2048))
						rand.NewChaCha8([32]byte{byte(rnd.Uint32())}).Read(junk)
						conn.SetDeadline(time.Now().Add(5 * time.Second))
						conn.Write(junk)
						conn.Read(make([]byte, 64))
						conn.Close()
					}
					continue
				}
				i := rnd.IntN(len(soaks))
				s := soaks[i]
				cl, err := Dial("unix", path, s.name)
				if err != nil {
					t.Errorf("client %d: %v", c, err)
					return
				}
				model := models[c][i]
				base := int64(c * soakSlot)
				for range 1 + rnd.IntN(200) { // then disconnect
					off := rnd.Int64N(soakSlot - 1)
					n := 1 + rnd.Int64N(min(int64(len(buf)), soakSlot-off))
					p := buf[:n]
					ops.Add(1)
					var err error
					switch k := rnd.IntN(10); {
					case k < 4 || !s.writable:
						if _, err = cl.ReadAt(p, base+off); err == nil && !bytes.Equal(p, model[off:off+n]) {
							t.Errorf("client %d, %s: read of %d bytes at %d differs from what was written", c, s.name, n, off)
						}
					case k < 7:
						for j := range p {
							p[j] = byte(rnd.Uint32())
						}
						if _, err = cl.WriteAt(p, base+off); err == nil {
							copy(model[off:], p)
						}
					case k < 8:
						if err = cl.WriteZeroes(base+off, uint32(n)); err == nil {
							clear(model[off : off+n])
						}
					case k < 9:
						if err = cl.Trim(base+off, uint32(n)); err == nil {
							clear(model[off : off+n])
						}
					default:
						err = cl.Flush()
					}
					var nerr *Error
					switch {
					case err == nil:
					case errors.As(err, &nerr) && nerr.Errno == errIO:
						failed.Add(1) // an injected fault: the request did nothing
					default:
						t.Errorf("client %d, %s: %v", c, s.name, err)
						cl.Close()
						return
					}
				}
				cl.Close()
			}
		})
	}
	time.Sleep(time.Until(deadline))
	close(stopFaults)
	wg.Wait()
	t.Logf("%d requests, %d failed by injected faults, %d hostile connections", ops.Load(), failed.Load(), hostile.Load())
	if t.Failed() {
		return
	}

	// Every acknowledged write is there, after a flush of each export.
	for i, s := range soaks {
		cl, err := Dial("unix", path, s.name)
		if err != nil {
			t.Fatal(err)
		}
		if s.writable {
			if err := cl.Flush(); err != nil {
				t.Fatalf("%s: flush: %v", s.name, err)
			}
		}
		got := make([]byte, soakSlot)
		for c := range soakClients {
			if _, err := cl.ReadAt(got, int64(c*soakSlot)); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, models[c][i]) {
				t.Errorf("%s: slot %d does not hold what its client wrote", s.name, c)
			}
		}
		cl.Close()
	}
	if err := srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, e := range exports {
		if err := e.Disk.Close(); err != nil {
			t.Errorf("close %s: %v", e.Name, err)
		}
	}
	goroutines, heap := settle()
	if goroutines > baseGoroutines+2 {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines before, %d after:\n%s", baseGoroutines, goroutines, buf[:runtime.Stack(buf, true)])
	}
	if heap > baseHeap+64<<20 {
		t.Errorf("heap in use grew from %d to %d MiB", baseHeap>>20, heap>>20)
	}
	t.Logf("goroutines %d then %d; heap in use %d then %d MiB; peak resident memory of the test process %s", baseGoroutines, goroutines, baseHeap>>20, heap>>20, peakRSS())
}

// peakRSS returns the process's peak resident memory (VmHWM), as the
// kernel reports it.
func peakRSS() string {
	status, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}
