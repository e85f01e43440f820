package qcow2_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/internal/disktest"
)

// options opens qcow2 and raw images from files, read-only.
func options() diskserve.Options {
	return diskserve.Options{Formats: []diskserve.Format{qcow2.Format, raw.Format}, OpenFile: raw.OpenFile, ReadOnly: true}
}

func openFile(t *testing.T, path string) diskserve.DiskFile {
	t.Helper()
	d, err := diskserve.Open(path, options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func readAll(t *testing.T, d diskserve.DiskFile) []byte {
	t.Helper()
	b, err := io.ReadAll(io.NewSectionReader(d, 0, d.Size()))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGolden reads every qcow2 image of testdata (made by qemu-img, see
// testdata/gen.sh) and compares it with the sha256 of qemu-img's own
// conversion, then runs the conformance suite on it.
func TestGolden(t *testing.T) {
	images, _ := filepath.Glob("../../testdata/qcow2/*.qcow2")
	if len(images) < 6 {
		t.Fatalf("only %d golden images", len(images))
	}
	for _, img := range images {
		t.Run(filepath.Base(img), func(t *testing.T) {
			d := openFile(t, img)
			data := readAll(t, d)
			sum, err := os.ReadFile(img + ".sha256")
			if err != nil {
				t.Fatal(err)
			}
			if got := sha256.Sum256(data); hex.EncodeToString(got[:]) != strings.TrimSpace(string(sum)) {
				t.Fatalf("content differs from qemu-img's")
			}
			disktest.Check(t, d, data)
		})
	}
}

// memOptions opens the image from memory: a fuzz input or a mutated
// golden image. Any other path (a backing file) does not exist.
func memOptions(name string, image []byte) diskserve.Options {
	return diskserve.Options{
		Formats:  []diskserve.Format{qcow2.Format},
		ReadOnly: true,
		OpenFile: func(path string, _ bool) (diskserve.DiskFile, error) {
			if filepath.Base(path) != name {
				return nil, os.ErrNotExist
			}
			return disktest.NewMemory(image, true), nil
		},
	}
}

// l2Table returns the offset of the first L2 table of a golden image.
func l2Table(b []byte) int64 {
	l1 := binary.BigEndian.Uint64(b[40:])
	return int64(binary.BigEndian.Uint64(b[l1:]) & 0x00ff_ffff_ffff_fe00)
}

// TestCorruptL2 points an L2 entry at host offset 0, where the header is:
// reading that cluster must fail as corrupt, not return the header.
func TestCorruptL2(t *testing.T) {
	b, err := os.ReadFile("../../testdata/qcow2/tiny-c4k-rc1.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	binary.BigEndian.PutUint64(b[l2Table(b):], 1<<63) // COPIED, offset 0
	d, err := diskserve.Open("img", memOptions("img", b))
	if err != nil {
		t.Fatal(err)
	}
	_, err = d.ReadAt(make([]byte, 512), 0)
	if !errors.Is(err, diskserve.ErrCorrupt) || !strings.Contains(err.Error(), "host offset 0") {
		t.Fatalf("read of a cluster at host offset 0: %v", err)
	}
	if _, err := diskserve.Extents(d, nil, 0, 4096); !errors.Is(err, diskserve.ErrCorrupt) {
		t.Fatalf("extents of a cluster at host offset 0: %v", err)
	}
}

// FuzzOpen opens arbitrary bytes as a qcow2 image. Whatever opens must
// keep the DiskFile contract: reads stay in bounds and return whole
// ranges or errors, extents tile the range, ranges claimed to read as
// zeroes do, and a read in pieces equals a read in one go.
func FuzzOpen(f *testing.F) {
	addTinyImages(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := diskserve.Open("img", memOptions("img", b))
		if err != nil {
			return
		}
		defer d.Close()
		size := d.Size()
		if size < 0 {
			t.Fatalf("size %d", size)
		}
		n := min(size, 256<<10) // bound the work per input
		whole := make([]byte, n)
		if got, err := d.ReadAt(whole, 0); int64(got) != n && err == nil {
			t.Fatalf("short read without an error: %d of %d", got, n)
		} else if err != nil && err != io.EOF {
			return // a corrupt table somewhere: reported, fine
		}
		piece := make([]byte, 1000)
		for off := int64(0); off < n; off += int64(len(piece)) {
			k, err := d.ReadAt(piece, off)
			if err != nil && err != io.EOF {
				t.Fatalf("piece at %d failed after the whole read worked: %v", off, err)
			}
			if !bytes.Equal(piece[:min(int64(k), n-off)], whole[off:min(off+int64(k), n)]) {
				t.Fatalf("piece at %d differs from the whole read", off)
			}
		}
		ext, err := diskserve.Extents(d, nil, 0, n)
		if err != nil {
			return
		}
		disktest.CheckExtents(t, ext, whole, 0, n)
	})
}

// FuzzWrite opens images that the checker calls clean for writing, takes
// an internal snapshot where the refcounts allow one, writes across
// cluster boundaries, flushes and closes them; reopened, each must read
// what was written, its snapshot what was there before, and still check
// clean. (A target of its own: it runs far fewer inputs per second than
// FuzzOpen.)
func FuzzWrite(f *testing.F) {
	addTinyImages(f)
	f.Fuzz(fuzzWrite)
}

// addTinyImages seeds a fuzz target with the tiny golden images.
func addTinyImages(f *testing.F) {
	images, _ := filepath.Glob("../../testdata/qcow2/tiny-*.qcow2")
	for _, img := range images {
		b, err := os.ReadFile(img)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

func fuzzWrite(t *testing.T, b []byte) {
	// The check walks every refcount block and L2 table the header
	// claims; keep to images whose tables are small.
	if len(b) < 64 || binary.BigEndian.Uint32(b[36:]) > 4096 || binary.BigEndian.Uint32(b[56:]) > 4 {
		return
	}
	ro, err := diskserve.Open("img", memOptions("img", b))
	if err != nil {
		return
	}
	n := min(ro.Size(), 256<<10)
	r, err := diskserve.Check(ro, diskserve.RepairNone)
	ro.Close()
	if err != nil || r.Corruptions != 0 || r.Leaks != 0 || n < 8192 {
		return
	}
	file := &growable{b: bytes.Clone(b)}
	opts := memOptions("img", nil)
	opts.ReadOnly = false
	opts.OpenFile = func(string, bool) (diskserve.DiskFile, error) { return file, nil }
	d, err := diskserve.Open("img", opts)
	if err != nil {
		return // refused for writing: snapshots, extended L2, dirty
	}
	want := make([]byte, n)
	if err := diskserve.ReadFullAt(d, want, 0); err != nil {
		d.Close()
		return
	}
	// Refcounts too narrow or near overflow refuse the snapshot, which
	// must leave the image as clean as it was.
	_, snapErr := diskserve.CreateSnapshot(d, "fuzz")
	before := bytes.Clone(want)
	data := bytes.Repeat([]byte("fuzz"), 1500)
	for _, off := range []int64{0, n/2 - 3000, n - int64(len(data))} {
		if _, err := d.WriteAt(data, off); err != nil {
			d.Close()
			return // the file may not grow, say
		}
		copy(want[off:], data)
	}
	if err := errors.Join(diskserve.Flush(d), d.Close()); err != nil {
		return
	}
	opts.ReadOnly = true
	back, err := diskserve.Open("img", opts)
	if err != nil {
		t.Fatalf("a clean image written by diskserve does not reopen: %v", err)
	}
	defer back.Close()
	got := make([]byte, n)
	if err := diskserve.ReadFullAt(back, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("reopened, a clean image does not read what was written (%v)", err)
	}
	if r, err := diskserve.Check(back, diskserve.RepairNone); err != nil || r.Corruptions != 0 {
		t.Fatalf("a clean image written by diskserve checks %+v, %v", r, err)
	}
	if snapErr != nil {
		return
	}
	opts.Snapshot = "fuzz"
	snap, err := diskserve.Open("img", opts)
	if err != nil {
		t.Fatalf("the snapshot taken does not open: %v", err)
	}
	defer snap.Close()
	if err := diskserve.ReadFullAt(snap, got, 0); err != nil || !bytes.Equal(got, before) {
		t.Fatalf("the snapshot does not read what was there before the writes (%v)", err)
	}
}

// growable is an image file in memory that grows, as the writer needs.
type growable struct {
	mu sync.Mutex
	b  []byte
}

func (g *growable) Size() int64    { g.mu.Lock(); defer g.mu.Unlock(); return int64(len(g.b)) }
func (g *growable) ReadOnly() bool { return false }
func (g *growable) Close() error   { return nil }

func (g *growable) ReadAt(p []byte, off int64) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if off >= int64(len(g.b)) {
		return 0, io.EOF
	}
	n := copy(p, g.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (g *growable) WriteAt(p []byte, off int64) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if off+int64(len(p)) > int64(len(g.b)) {
		return 0, diskserve.ErrOutOfRange
	}
	return copy(g.b[off:], p), nil
}

func (g *growable) Resize(size int64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if size > 64<<20 {
		return fmt.Errorf("resize to %d: %w", size, diskserve.ErrOutOfRange)
	}
	if size <= int64(len(g.b)) {
		g.b = g.b[:size]
		return nil
	}
	g.b = append(g.b, make([]byte, size-int64(len(g.b)))...)
	return nil
}

// gatedFile is an image file whose reads of one range wait for a gate.
type gatedFile struct {
	diskserve.Passthrough
	off  int64
	gate chan struct{}
}

func (g *gatedFile) ReadAt(p []byte, off int64) (int, error) {
	if off <= g.off && g.off < off+int64(len(p)) {
		<-g.gate
	}
	return g.D.ReadAt(p, off)
}

// imageWithTables returns the bytes of a qcow2 image of size bytes in
// 4 KiB clusters (one L2 table maps 2 MiB), with 8 KiB of the byte k+1
// written at the k-th offset of offs.
func imageWithTables(t *testing.T, size int64, offs ...int64) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tables.qcow2")
	if err := qcow2.Create(path, qcow2.CreateOptions{Size: size, ClusterSize: 4096}); err != nil {
		t.Fatal(err)
	}
	w, err := diskserve.Open(path, diskserve.Options{Formats: []diskserve.Format{qcow2.Format}, OpenFile: raw.OpenFile})
	if err != nil {
		t.Fatal(err)
	}
	for k, off := range offs {
		if _, err := w.WriteAt(bytes.Repeat([]byte{byte(k + 1)}, 8192), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// l2Offset returns where the L2 table of L1 entry i of image b lies.
func l2Offset(b []byte, i int) int64 {
	l1 := int64(binary.BigEndian.Uint64(b[40:]))
	return int64(binary.BigEndian.Uint64(b[l1+int64(i)*8:]) & 0x00ff_ffff_ffff_fe00)
}

// TestSlowL2DoesNotStallReads makes the read of one L2 table hang, as a
// cold fetch of a remote image may: reads through other, cached tables go
// on meanwhile, and the stalled read completes once the table arrives.
func TestSlowL2DoesNotStallReads(t *testing.T) {
	b := imageWithTables(t, 8<<20, 0, 6<<20)
	g := &gatedFile{Passthrough: diskserve.Passthrough{D: disktest.NewMemory(b, true)}, off: l2Offset(b, 3), gate: make(chan struct{})}
	opts := memOptions("img", b)
	opts.OpenFile = func(string, bool) (diskserve.DiskFile, error) { return g, nil }
	d, err := diskserve.Open("img", opts)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	p := make([]byte, 4096)
	if _, err := d.ReadAt(p, 0); err != nil || p[0] != 1 {
		t.Fatal(err)
	}
	stalled := make(chan error, 1)
	go func() {
		q := make([]byte, 4096)
		_, err := d.ReadAt(q, 6<<20)
		if err == nil && q[0] != 2 {
			err = fmt.Errorf("read %d", q[0])
		}
		stalled <- err
	}()
	time.Sleep(20 * time.Millisecond) // the stalled read waits for its table
	done := make(chan error, 1)
	go func() {
		_, err := d.ReadAt(p, 4096)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil || p[0] != 1 {
			t.Fatalf("read through a cached table: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a read through a cached table waited for another table's slow read")
	}
	close(g.gate)
	if err := <-stalled; err != nil {
		t.Fatal(err)
	}
}

// TestSlowL2DoesNotStallWrites is TestSlowL2DoesNotStallReads for a write
// that allocates: while it waits for its L2 table, or for the refcount
// block that counts the cluster it allocates, reads and writes through a
// cached table go on.
func TestSlowL2DoesNotStallWrites(t *testing.T) {
	b := imageWithTables(t, 8<<20, 0, 6<<20)
	refblock := int64(binary.BigEndian.Uint64(b[binary.BigEndian.Uint64(b[48:]):]))
	for name, slow := range map[string]int64{"L2 table": l2Offset(b, 3), "refcount block": refblock} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "img.qcow2")
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			g := &gatedFile{off: slow, gate: make(chan struct{})}
			opts := options()
			opts.ReadOnly = false
			opts.OpenFile = func(p string, readOnly bool) (diskserve.DiskFile, error) {
				f, err := raw.OpenFile(p, readOnly)
				g.D = f
				return g, err
			}
			d, err := diskserve.Open(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			p := make([]byte, 4096)
			if _, err := d.ReadAt(p, 0); err != nil || p[0] != 1 { // caches the first table
				t.Fatal(err)
			}
			stalled := make(chan error, 1)
			go func() {
				_, err := d.WriteAt(bytes.Repeat([]byte{3}, 4096), 6<<20+64<<10)
				stalled <- err
			}()
			time.Sleep(20 * time.Millisecond) // the stalled write waits for its table
			done := make(chan error, 1)
			go func() {
				if _, err := d.WriteAt(bytes.Repeat([]byte{4}, 4096), 4096); err != nil {
					done <- err
					return
				}
				_, err := d.ReadAt(p, 4096)
				done <- err
			}()
			select {
			case err := <-done:
				if err != nil || p[0] != 4 {
					t.Fatalf("write and read through a cached table: %v, read %d", err, p[0])
				}
			case <-time.After(5 * time.Second):
				close(g.gate) // so that the test can end
				t.Fatalf("a write through a cached table waited for a slow read of the %s", name)
			}
			close(g.gate)
			if err := <-stalled; err != nil {
				t.Fatal(err)
			}
			if _, err := d.ReadAt(p, 6<<20+64<<10); err != nil || p[0] != 3 {
				t.Fatalf("the stalled write: %v, read %d", err, p[0])
			}
		})
	}
}

// syncGatedFile holds every Flush until its gate opens, as a slow device
// would.
type syncGatedFile struct {
	diskserve.Passthrough
	gate    chan struct{}
	waiting chan struct{} // closed when a Flush starts waiting
	once    sync.Once
}

func (g *syncGatedFile) Flush() error {
	g.once.Do(func() { close(g.waiting) })
	<-g.gate
	return diskserve.Flush(g.D)
}

// TestSlowSyncDoesNotStall flushes an image while its syncs hang, once
// with its metadata clean and once with a table and a refcount block to
// write: reads and writes of allocated clusters, and a write that
// allocates, go on meanwhile, and what they did is in the image once the
// flush is over.
func TestSlowSyncDoesNotStall(t *testing.T) {
	for _, metadata := range []string{"clean", "dirty"} {
		t.Run(metadata, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "img.qcow2")
			if err := qcow2.Create(path, qcow2.CreateOptions{Size: 8 << 20}); err != nil {
				t.Fatal(err)
			}
			var g *syncGatedFile
			opts := options()
			opts.ReadOnly = false
			opts.OpenFile = func(p string, readOnly bool) (diskserve.DiskFile, error) {
				f, err := raw.OpenFile(p, readOnly)
				if err != nil {
					return nil, err
				}
				g = &syncGatedFile{Passthrough: diskserve.Passthrough{D: f}, gate: make(chan struct{}), waiting: make(chan struct{})}
				return g, nil
			}
			d, err := diskserve.Open(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			fill := func(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }
			if _, err := d.WriteAt(fill(1), 0); err != nil { // allocates: metadata to flush
				t.Fatal(err)
			}
			close(g.gate)
			if metadata == "clean" {
				if err := diskserve.Flush(d); err != nil {
					t.Fatal(err)
				}
			}
			g.gate, g.waiting, g.once = make(chan struct{}), make(chan struct{}), sync.Once{}
			flushed := make(chan error, 1)
			go func() { flushed <- diskserve.Flush(d) }()
			<-g.waiting
			done := make(chan error, 1)
			go func() {
				done <- func() error {
					if _, err := d.WriteAt(fill(2), 4096); err != nil {
						return err
					}
					if _, err := d.WriteAt(fill(3), 4<<20); err != nil {
						return err
					}
					p := make([]byte, 4096)
					if _, err := d.ReadAt(p, 4<<20); err != nil || p[0] != 3 {
						return fmt.Errorf("read back %d: %v", p[0], err)
					}
					return nil
				}()
			}()
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(5 * time.Second):
				close(g.gate)
				t.Fatal("reads and writes waited for another request's flush")
			}
			close(g.gate)
			if err := <-flushed; err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			ro, err := diskserve.Open(path, options())
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			if r, err := diskserve.Check(ro, diskserve.RepairNone); err != nil || r.Corruptions+r.Leaks != 0 {
				t.Fatalf("check: %+v, %v", r, err)
			}
			for off, want := range map[int64]byte{0: 1, 4096: 2, 4 << 20: 3} {
				p := make([]byte, 4096)
				if _, err := ro.ReadAt(p, off); err != nil || !bytes.Equal(p, fill(want)) {
					t.Fatalf("at %d: read %d, want %d (%v)", off, p[0], want, err)
				}
			}
		})
	}
}

// TestParallelColdL2Reads reads 16 clusters mapped by 16 L2 tables that
// are not cached yet, at once: the 16 table reads run at the same time
// (the barrier holds each until all 16 are in progress), where reads under
// the image's lock would come one after another.
func TestParallelColdL2Reads(t *testing.T) {
	var offs []int64
	for i := range int64(16) {
		offs = append(offs, i<<21) // one cluster in each table's span
	}
	b := imageWithTables(t, 32<<20, offs...)
	tables := map[int64]bool{}
	for i := range 16 {
		tables[l2Offset(b, i)] = true
	}
	f := &tableBarrier{DiskFile: disktest.NewMemory(b, true), tables: tables, all: make(chan struct{})}
	opts := memOptions("img", b)
	opts.OpenFile = func(string, bool) (diskserve.DiskFile, error) { return f, nil }
	d, err := diskserve.Open("img", opts)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var wg sync.WaitGroup
	for i := range int64(16) {
		wg.Go(func() {
			p := make([]byte, 4096)
			if _, err := d.ReadAt(p, i<<21); err != nil || p[0] != byte(i+1) {
				t.Errorf("read of table %d: %v, %d", i, err, p[0])
			}
		})
	}
	wg.Wait()
	if f.missed.Load() {
		t.Error("the 16 L2 table reads did not run at the same time")
	}
}

// tableBarrier holds the reads of the L2 tables at tables until all of
// them are in progress, or gives up after a while and says so.
type tableBarrier struct {
	diskserve.DiskFile
	tables  map[int64]bool
	waiting atomic.Int64
	all     chan struct{}
	missed  atomic.Bool
}

func (f *tableBarrier) ReadAt(p []byte, off int64) (int, error) {
	if f.tables[off] {
		if f.waiting.Add(1) == int64(len(f.tables)) {
			close(f.all)
		}
		select {
		case <-f.all:
		case <-time.After(3 * time.Second):
			f.missed.Store(true)
		}
	}
	return f.DiskFile.ReadAt(p, off)
}
