package qcow2_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
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
	"github.com/diskserve/diskserve/internal/testtool"
)

func openRW(t *testing.T, path string) diskserve.DiskFile {
	t.Helper()
	opts := options()
	opts.ReadOnly = false
	d, err := diskserve.Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestInteropWriteWorkload runs a random workload through diskserve on
// fresh images, overlays and compressed images, replays it on the content
// qemu-img read before, and requires qemu-img to read the same bytes and
// to find no error and no leak.
func TestInteropWriteWorkload(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir string) string
	}{
		{"fresh", func(t *testing.T, dir string) string { return create(t, dir, "16M") }},
		{"fresh 512 B clusters", func(t *testing.T, dir string) string {
			return create(t, dir, "16M", "-o", "cluster_size=512") // outgrows its refcount table
		}},
		{"fresh 4 KiB clusters refcount_bits 1", func(t *testing.T, dir string) string {
			return create(t, dir, "16M", "-o", "cluster_size=4096,refcount_bits=1")
		}},
		{"version 2", func(t *testing.T, dir string) string { return create(t, dir, "16M", "-o", "compat=0.10") }},
		{"preallocated metadata", func(t *testing.T, dir string) string {
			return create(t, dir, "16M", "-o", "preallocation=metadata")
		}},
		{"compressed", func(t *testing.T, dir string) string {
			img := filepath.Join(dir, "img.qcow2")
			testtool.Run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", rawBase(t, dir), img)
			return img
		}},
		{"created by diskserve", func(t *testing.T, dir string) string {
			return diskserveCreate(t, dir, qcow2.CreateOptions{Size: 16 << 20})
		}},
		{"created by diskserve, 512 B clusters, version 2", func(t *testing.T, dir string) string {
			return diskserveCreate(t, dir, qcow2.CreateOptions{Size: 16 << 20, ClusterSize: 512, Compat: "0.10"})
		}},
		{"created by diskserve over raw", func(t *testing.T, dir string) string {
			rawBase(t, dir)
			return diskserveCreate(t, dir, qcow2.CreateOptions{Size: 9 << 20, BackingFile: "base.raw", BackingFormat: "raw"})
		}},
		{"overlay over raw", func(t *testing.T, dir string) string {
			rawBase(t, dir)
			return create(t, dir, "8M", "-b", "base.raw", "-F", "raw")
		}},
		{"extended L2", func(t *testing.T, dir string) string { return create(t, dir, "16M", "-o", "extended_l2=on") }},
		{"extended L2, 16 KiB clusters", func(t *testing.T, dir string) string {
			return create(t, dir, "16M", "-o", "extended_l2=on,cluster_size=16384")
		}},
		{"extended L2 overlay over raw", func(t *testing.T, dir string) string {
			rawBase(t, dir)
			return create(t, dir, "9M", "-b", "base.raw", "-F", "raw", "-o", "extended_l2=on")
		}},
		{"extended L2, compressed", func(t *testing.T, dir string) string {
			img := filepath.Join(dir, "img.qcow2")
			testtool.Run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on", rawBase(t, dir), img)
			return img
		}},
		{"extended L2 overlay over an extended L2 qcow2", func(t *testing.T, dir string) string {
			mid := filepath.Join(dir, "mid.qcow2")
			testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=32768", rawBase(t, dir), mid)
			return create(t, dir, "12M", "-b", "mid.qcow2", "-F", "qcow2", "-o", "extended_l2=on")
		}},
		{"overlay over a shorter qcow2, version 2", func(t *testing.T, dir string) string {
			mid := filepath.Join(dir, "mid.qcow2")
			testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawBase(t, dir), mid)
			return create(t, dir, "12M", "-b", "mid.qcow2", "-F", "qcow2", "-o", "compat=0.10")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := tc.setup(t, t.TempDir())
			want := testtool.QemuRaw(t, img)
			d := openRW(t, img)
			disktest.Workload(t, d, want, 7, 300)
			if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions+r.Leaks != 0 {
				t.Fatalf("diskserve's own check: %v %q", err, r.Messages)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			testtool.QemuCheck(t, img)
			got := testtool.QemuRaw(t, img)
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("qemu-img reads byte %d (%#x) as %#x, want %#x", i, i, got[i], want[i])
				}
			}
			// And diskserve reads back what qemu-img does.
			d = openFile(t, img)
			disktest.Check(t, d, want)
		})
	}
}

func diskserveCreate(t *testing.T, dir string, o qcow2.CreateOptions) string {
	t.Helper()
	img := filepath.Join(dir, "img.qcow2")
	if err := qcow2.Create(img, o); err != nil {
		t.Fatal(err)
	}
	testtool.QemuCheck(t, img)
	return img
}

func create(t *testing.T, dir, size string, args ...string) string {
	t.Helper()
	img := filepath.Join(dir, "img.qcow2")
	testtool.Run(t, "qemu-img", append(append([]string{"create", "-q", "-f", "qcow2"}, args...), img, size)...)
	return img
}

// TestConformanceWritable runs the conformance suite, which writes, zeroes,
// punches and resizes, on a fresh image and on an overlay, then has
// qemu-img check them.
func TestConformanceWritable(t *testing.T) {
	for _, backing := range []bool{false, true} {
		t.Run(fmt.Sprintf("backing=%v", backing), func(t *testing.T) {
			dir := t.TempDir()
			var img string
			if backing {
				rawBase(t, dir)
				img = create(t, dir, "8M", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw")
			} else {
				img = create(t, dir, "8M", "-o", "cluster_size=4096")
			}
			want := testtool.QemuRaw(t, img)
			d := openRW(t, img)
			disktest.Check(t, d, want)
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			testtool.QemuCheck(t, img)
		})
	}
}

// TestConformanceDirect runs the conformance suite on an overlay and its
// backing file opened with O_DIRECT: the format's metadata and data I/O,
// much of it unaligned, goes through the direct path, and qemu-img check
// finds the result clean.
func TestConformanceDirect(t *testing.T) {
	dir := t.TempDir()
	rawBase(t, dir)
	img := create(t, dir, "8M", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw")
	want := testtool.QemuRaw(t, img)
	opts := options()
	opts.ReadOnly, opts.OpenFile = false, raw.OpenFileDirect
	d, err := diskserve.Open(img, opts)
	if err != nil {
		t.Fatal(err)
	}
	disktest.CheckWith(t, d, want, disktest.Options{ByteReads: 8 << 10})
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	testtool.QemuCheck(t, img)
}

// TestInteropResize grows an image past what its L1 table maps, so that
// the table moves, then shrinks it back, and checks both with qemu-img.
func TestInteropResize(t *testing.T) {
	img := create(t, t.TempDir(), "1M", "-o", "cluster_size=512")
	d := openRW(t, img)
	if _, err := d.WriteAt([]byte("before"), 1000); err != nil {
		t.Fatal(err)
	}
	if err := diskserve.Resize(d, 3<<30); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt([]byte("after"), 3<<30-5); err != nil {
		t.Fatal(err)
	}
	d.Close()
	testtool.QemuCheck(t, img)
	out := string(testtool.Run(t, "qemu-io", "-c", "read -v 1000 6", "-c", fmt.Sprintf("read -v %d 5", 3<<30-5), img))
	if !strings.Contains(out, "before") || !strings.Contains(out, "after") {
		t.Fatalf("qemu-io after resize:\n%s", out)
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	json.Unmarshal(testtool.Run(t, "qemu-img", "info", "--output=json", img), &info)
	if info.VirtualSize != 3<<30 {
		t.Fatalf("virtual size %d after resize", info.VirtualSize)
	}

	// Shrunk back, the data past the end is gone and the file with it.
	d = openRW(t, img)
	if err := diskserve.Resize(d, 1<<20); err != nil {
		t.Fatal(err)
	}
	d.Close()
	testtool.QemuCheck(t, img)
	testtool.Run(t, "qemu-io", "-c", "read -P 0 0 1000", "-c", "read -P 0 1006 1047570", img)
	out = string(testtool.Run(t, "qemu-io", "-c", "read -v 1000 6", img))
	if !strings.Contains(out, "before") {
		t.Fatalf("qemu-io after the shrink:\n%s", out)
	}
	if st, err := os.Stat(img); err != nil || st.Size() > 1<<20 {
		t.Fatalf("the file is %d bytes after the shrink to 1 MiB (%v)", st.Size(), err)
	}
}

// TestWriteRefusals opens for writing an image this writer leaves alone:
// one marked corrupt.
func TestWriteRefusals(t *testing.T) {
	img := filepath.Join(t.TempDir(), "corrupt.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{2}, 79) // the corrupt bit of the incompatible features
	f.Close()
	opts := options()
	opts.ReadOnly = false
	_, err = diskserve.Open(img, opts)
	if err == nil || !strings.Contains(err.Error(), "corrupt") || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("read-write open of an image marked corrupt: %v", err)
	}
	d := openFile(t, img)
	d.Close()
}

// TestDirtyImageRepairedOnOpen crashes qemu (qemu-io's abort) while it
// writes an image with lazy refcounts, which leaves the image dirty with
// refcounts behind its tables. Opened read-only, diskserve leaves it as it
// is; opened for writing, it rebuilds the refcounts and goes on, and qemu
// then finds the image clean, with both writers' data.
func TestDirtyImageRepairedOnOpen(t *testing.T) {
	img := filepath.Join(t.TempDir(), "lazy.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
	exec.Command(testtool.Need(t, "qemu-io"), "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 4M 64k", "-c", "abort", img).Run()
	if out, err := exec.Command(testtool.Need(t, "qemu-img"), "check", img).CombinedOutput(); err == nil {
		t.Fatalf("qemu-img check finds the crashed image clean; the test crashed nothing:\n%s", out)
	}
	before, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	ro := openFile(t, img)
	if !diskserve.Describe(ro).Dirty {
		t.Error("the crashed image is not described as dirty")
	}
	ro.Close()
	if after, _ := os.ReadFile(img); !bytes.Equal(before, after) {
		t.Fatal("a read-only open changed the dirty image")
	}

	d := openRW(t, img)
	if diskserve.Describe(d).Dirty {
		t.Error("the image is still dirty after a read-write open")
	}
	if _, err := d.WriteAt(bytes.Repeat([]byte{0x33}, 70000), 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	testtool.QemuCheck(t, img)
	want := make([]byte, 16<<20)
	copy(want, bytes.Repeat([]byte{0x11}, 1<<20))
	copy(want[4<<20:], bytes.Repeat([]byte{0x22}, 64<<10))
	copy(want[8<<20:], bytes.Repeat([]byte{0x33}, 70000))
	d = openFile(t, img)
	defer d.Close()
	if got := readAll(t, d); !bytes.Equal(got, want) {
		t.Fatal("the repaired image does not read as both writers wrote it")
	}
}

// countingFile counts the bytes read from a file.
type countingFile struct {
	diskserve.DiskFile
	read atomic.Int64
}

func (c *countingFile) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.DiskFile.ReadAt(p, off)
	c.read.Add(int64(n))
	return n, err
}

// TestSubclusterCopyOnWrite writes 4 KiB, aligned and not, into an
// extended-L2 overlay of 64 KiB clusters (2 KiB subclusters): an aligned
// write reads nothing from the backing file, an unaligned one reads at most
// its two edge subclusters, and the image reads as the model, also to
// qemu, with qemu-img check clean.
func TestSubclusterCopyOnWrite(t *testing.T) {
	dir := t.TempDir()
	rawBase(t, dir)
	img := create(t, dir, "8M", "-b", "base.raw", "-F", "raw", "-o", "extended_l2=on")
	want := testtool.QemuRaw(t, img)
	var base *countingFile
	opts := options()
	opts.ReadOnly = false
	opts.OpenFile = func(path string, readOnly bool) (diskserve.DiskFile, error) {
		f, err := raw.OpenFile(path, readOnly)
		if err == nil && filepath.Base(path) == "base.raw" {
			base = &countingFile{DiskFile: f}
			return base, nil
		}
		return f, err
	}
	d, err := diskserve.Open(img, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		off     int64
		maxRead int64
	}{
		{1 << 20, 0},                // whole subclusters
		{2<<20 + 1000, 2 * 2048},    // partial edges at both ends
		{3<<20 + 2048, 0},           // aligned to a subcluster
		{4<<20 + 65536 - 2048, 0},   // across a cluster boundary, aligned
		{5<<20 + 65536 - 100, 4096}, // across a cluster boundary, an edge in each
	} {
		before := base.read.Load()
		p := bytes.Repeat([]byte{0xee}, 4096)
		if _, err := d.WriteAt(p, tc.off); err != nil {
			t.Fatal(err)
		}
		copy(want[tc.off:], p)
		if got := base.read.Load() - before; got > tc.maxRead {
			t.Errorf("4 KiB write at %#x read %d bytes of the backing file, want at most %d", tc.off, got, tc.maxRead)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	testtool.QemuCheck(t, img)
	if got := testtool.QemuRaw(t, img); !bytes.Equal(got, want) {
		t.Fatal("qemu reads the overlay differently from the model")
	}
}

// barrierFile holds every read until n reads are in progress at once, or
// gives up after a while and reports it: the reads of a writer that held
// the image's lock across its copy-on-write could never all be in
// progress at once.
type barrierFile struct {
	diskserve.DiskFile
	n       int64
	waiting atomic.Int64
	all     chan struct{}
	once    sync.Once
	missed  atomic.Bool
}

func (b *barrierFile) ReadAt(p []byte, off int64) (int, error) {
	if b.waiting.Add(1) == b.n {
		b.once.Do(func() { close(b.all) })
	}
	select {
	case <-b.all:
	case <-time.After(5 * time.Second):
		b.missed.Store(true)
	}
	return b.DiskFile.ReadAt(p, off)
}

// TestParallelCopyOnWrite writes 16 clusters of an overlay at once, each
// in part, so that each copies the rest of its cluster from the backing
// file: the 16 backing reads run at the same time (no lock is held across
// them). Then 16 writers fill disjoint pieces of one cluster at once. The
// overlay reads as the model, and checks clean. Plain and extended L2.
func TestParallelCopyOnWrite(t *testing.T) {
	for _, ext := range []bool{false, true} {
		t.Run(fmt.Sprintf("extended_l2=%v", ext), func(t *testing.T) {
			dir := t.TempDir()
			rawBase(t, dir)
			opt := "extended_l2=off"
			if ext {
				opt = "extended_l2=on"
			}
			img := create(t, dir, "8M", "-b", "base.raw", "-F", "raw", "-o", opt)
			want := testtool.QemuRaw(t, img)
			var base *barrierFile
			opts := options()
			opts.ReadOnly = false
			opts.OpenFile = func(path string, readOnly bool) (diskserve.DiskFile, error) {
				f, err := raw.OpenFile(path, readOnly)
				if err == nil && filepath.Base(path) == "base.raw" {
					base = &barrierFile{DiskFile: f, n: 16, all: make(chan struct{})}
					return base, nil
				}
				return f, err
			}
			d, err := diskserve.Open(img, opts)
			if err != nil {
				t.Fatal(err)
			}
			writeConcurrently(t, d, want, 16, func(i int64) (int64, []byte) {
				// A partial write: the rest comes from the backing file.
				return i<<16 + 1000, bytes.Repeat([]byte{byte(0x80 + i)}, 3000)
			})
			if base.missed.Load() {
				t.Error("the 16 copy-on-write reads of the backing file did not run at the same time")
			}
			writeConcurrently(t, d, want, 16, func(i int64) (int64, []byte) {
				// 16 disjoint pieces of one cluster.
				return 2<<20 + 1000 + i*4000, bytes.Repeat([]byte{byte(0x40 + i)}, 4000)
			})
			checkModel(t, d, img, want)
		})
	}
}

// writeCounter counts the writes of at least a cluster that reach the
// image file.
type writeCounter struct {
	diskserve.Passthrough
	large atomic.Int64
}

func (c *writeCounter) WriteAt(p []byte, off int64) (int, error) {
	if len(p) >= 64<<10 {
		c.large.Add(1)
	}
	return c.Passthrough.WriteAt(p, off)
}

// TestWriteRuns writes whole clusters in runs: 1 MiB into fresh clusters
// reaches the image file as one write, and so does 1 MiB over the
// clusters it then owns. Then 8 writers at once, each a partial cluster,
// three whole ones and a partial one, where each writer's last cluster is
// the next one's first, over clusters in every state (unallocated over
// the backing file, owned, zero, compressed, shared with a snapshot): the
// image reads as the model and checks clean, by diskserve and by qemu.
func TestWriteRuns(t *testing.T) {
	dir := t.TempDir()
	rawBase(t, dir)
	img := create(t, dir, "8M", "-b", "base.raw", "-F", "raw")
	qemuIO(t, img, "qcow2", "write -P 1 0 128k", "write -z 256k 64k", "write -P 2 1M 64k")
	testtool.Run(t, "qemu-img", "snapshot", "-c", "s1", img)
	qemuIO(t, img, "qcow2", "write -P 3 2M 192k")
	want := testtool.QemuRaw(t, img)

	var file *writeCounter
	opts := options()
	opts.ReadOnly = false
	opts.OpenFile = func(path string, readOnly bool) (diskserve.DiskFile, error) {
		f, err := raw.OpenFile(path, readOnly)
		if err == nil && filepath.Base(path) == "img.qcow2" {
			file = &writeCounter{Passthrough: diskserve.Passthrough{D: f}}
			return file, nil
		}
		return f, err
	}
	d, err := diskserve.Open(img, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	write := func(p []byte, off int64) {
		t.Helper()
		copy(want[off:], p)
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	for _, fill := range []byte{0x11, 0x22} {
		before := file.large.Load()
		write(bytes.Repeat([]byte{fill}, 1<<20), 4<<20)
		if n := file.large.Load() - before; n != 1 {
			t.Errorf("a 1 MiB write of 16 whole clusters reached the file in %d writes, want 1", n)
		}
	}

	writeConcurrently(t, d, want, 8, func(i int64) (int64, []byte) {
		return i*(4<<16) + 1<<15, bytes.Repeat([]byte{byte(0x80 + i)}, 4<<16)
	})
	checkModel(t, d, img, want)
}

// writeConcurrently makes n writes at once, write i of piece(i), and
// applies them to the model want.
func writeConcurrently(t *testing.T, d diskserve.DiskFile, want []byte, n int64, piece func(i int64) (int64, []byte)) {
	t.Helper()
	var wg sync.WaitGroup
	for i := range n {
		off, p := piece(i)
		copy(want[off:], p)
		wg.Go(func() {
			if _, err := d.WriteAt(p, off); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
}

// checkModel checks d clean, reading as the model want, then closes it
// and has qemu check img and read it as want too.
func checkModel(t *testing.T, d diskserve.DiskFile, img string, want []byte) {
	t.Helper()
	if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions+r.Leaks != 0 {
		t.Fatalf("check: %v %q", err, r.Messages)
	}
	if got := readAll(t, d); !bytes.Equal(got, want) {
		t.Error("the image does not read as the model")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	testtool.QemuCheck(t, img)
	if got := testtool.QemuRaw(t, img); !bytes.Equal(got, want) {
		t.Error("qemu does not read the image as the model")
	}
}
