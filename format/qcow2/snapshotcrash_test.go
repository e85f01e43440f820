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
	"github.com/diskserve/diskserve/internal/disktest"
)

// recordingFile is an image file in memory that records the writes,
// resizes and flushes it sees while recording is on, in the order they
// complete.
type recordingFile struct {
	*growable
	mu        sync.Mutex
	recording bool
	ops       []fileOp
}

// fileOp is a write (data set), a resize (data nil) or a flush barrier.
type fileOp struct {
	off   int64
	data  []byte
	size  int64
	flush bool
}

func (f *recordingFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.recording {
		f.ops = append(f.ops, fileOp{off: off, data: bytes.Clone(p)})
	}
	return f.growable.WriteAt(p, off)
}

func (f *recordingFile) Resize(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.recording {
		f.ops = append(f.ops, fileOp{size: size})
	}
	return f.growable.Resize(size)
}

func (f *recordingFile) Flush() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.recording {
		f.ops = append(f.ops, fileOp{flush: true})
	}
	return nil
}

// crashStates calls fn with each file content a crash during ops could
// leave on base, until fn fails: every epoch between flushes before the
// crash complete, and of the epoch the crash cut, each prefix and some
// random subsets (the storage may reorder writes between flushes). fn may
// not keep the content.
func crashStates(base []byte, ops []fileOp, rnd *rand.Rand, fn func(state []byte) error) error {
	apply := func(b []byte, op fileOp) []byte {
		switch {
		case op.flush:
		case op.data == nil:
			if op.size <= int64(len(b)) {
				return b[:op.size]
			}
			return append(b, make([]byte, op.size-int64(len(b)))...)
		default:
			if end := op.off + int64(len(op.data)); end > int64(len(b)) {
				b = append(b, make([]byte, end-int64(len(b)))...)
			}
			copy(b[op.off:], op.data)
		}
		return b
	}
	durable := bytes.Clone(base)
	var b []byte
	for start := 0; start <= len(ops); {
		end := start
		for end < len(ops) && !ops[end].flush {
			end++
		}
		epoch := ops[start:end]
		b = append(b[:0], durable...)
		for n := range len(epoch) + 1 {
			if n > 0 {
				b = apply(b, epoch[n-1])
			}
			if err := fn(b); err != nil {
				return err
			}
		}
		for range 6 {
			b = append(b[:0], durable...)
			for _, op := range epoch {
				if op.data == nil || rnd.IntN(2) == 0 {
					b = apply(b, op)
				}
			}
			if err := fn(b); err != nil {
				return err
			}
		}
		for _, op := range epoch {
			durable = apply(durable, op)
		}
		start = end + 1
	}
	return nil
}

// TestSnapshotCrashStates runs each snapshot operation on an image whose
// active layer shares some clusters with a snapshot and owns others, and
// opens every state a crash during it could leave. Each must open, no
// refcount may be below its references (leaks, and COPIED flags still
// clear on clusters whose refcount fell to 1, are allowed: they cost space
// and copies, not data), the active layer must read as before or after the
// operation, and every snapshot listed must read as it was taken.
func TestSnapshotCrashStates(t *testing.T) {
	const size = 256 << 10
	path := filepath.Join(t.TempDir(), "base.qcow2")
	if err := qcow2.Create(path, qcow2.CreateOptions{Size: size, ClusterSize: 4096}); err != nil {
		t.Fatal(err)
	}
	fresh, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		op   func(diskserve.DiskFile) error
	}{
		{"create", func(d diskserve.DiskFile) error { _, err := diskserve.CreateSnapshot(d, "b"); return err }},
		{"apply", func(d diskserve.DiskFile) error { return diskserve.ApplySnapshot(d, "a") }},
		{"delete", func(d diskserve.DiskFile) error { return diskserve.DeleteSnapshot(d, "a") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := &recordingFile{growable: &growable{b: bytes.Clone(fresh)}}
			opts := memOptions("img", nil)
			opts.ReadOnly = false
			opts.OpenFile = func(string, bool) (diskserve.DiskFile, error) { return file, nil }
			d, err := diskserve.Open("img", opts)
			if err != nil {
				t.Fatal(err)
			}
			models := map[string][]byte{}
			want := make([]byte, size)
			disktest.Workload(t, d, want, 1, 40)
			if _, err := diskserve.CreateSnapshot(d, "a"); err != nil {
				t.Fatal(err)
			}
			models["a"] = bytes.Clone(want)
			disktest.Workload(t, d, want, 2, 40)
			if err := diskserve.Flush(d); err != nil {
				t.Fatal(err)
			}
			before := bytes.Clone(want)
			base := bytes.Clone(file.b)
			file.recording = true
			if err := tc.op(d); err != nil {
				t.Fatal(err)
			}
			file.recording = false
			after := before
			switch tc.name {
			case "create":
				models["b"] = before
			case "apply":
				after = models["a"]
			}

			states := 0
			err = crashStates(base, file.ops, rand.New(rand.NewPCG(3, 4)), func(st []byte) error {
				i := states
				states++
				ro := memOptions("img", st)
				c, err := diskserve.Open("img", ro)
				if err != nil {
					return fmt.Errorf("state %d: does not open: %w", i, err)
				}
				defer c.Close()
				r, err := diskserve.Check(c, diskserve.RepairNone)
				if err != nil {
					return fmt.Errorf("state %d: check: %w", i, err)
				}
				for _, m := range r.Messages {
					if !strings.HasPrefix(m, "Leaked cluster") && !strings.HasPrefix(m, "ERROR OFLAG_COPIED") {
						return fmt.Errorf("state %d: %s", i, m)
					}
				}
				got := make([]byte, size)
				if err := diskserve.ReadFullAt(c, got, 0); err != nil || !bytes.Equal(got, before) && !bytes.Equal(got, after) {
					return fmt.Errorf("state %d: the active layer reads neither as before nor as after (%v)", i, err)
				}
				for _, s := range diskserve.Describe(c).Snapshots {
					ro.Snapshot = s.ID
					sd, err := diskserve.Open("img", ro)
					if err != nil {
						return fmt.Errorf("state %d: snapshot %s: %w", i, s.Name, err)
					}
					err = diskserve.ReadFullAt(sd, got, 0)
					sd.Close()
					if err != nil || !bytes.Equal(got, models[s.Name]) {
						return fmt.Errorf("state %d: snapshot %s does not read as taken (%v)", i, s.Name, err)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d file operations, %d crash states", len(file.ops), states)
		})
	}
}
