package raw_test

import (
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/internal/disktest"
)

// makeImage writes a sparse image of size bytes with random data in a few
// places and returns its path and content.
func makeImage(t *testing.T, dir string, size int64) (string, []byte) {
	t.Helper()
	want := make([]byte, size)
	rnd := rand.New(rand.NewPCG(3, 4))
	for _, r := range [][2]int64{{0, 4096}, {1 << 20, 100 << 10}, {size - 5000, 5000}} {
		for i := r[0]; i < r[0]+r[1]; i++ {
			want[i] = byte(rnd.Uint32())
		}
	}
	path := filepath.Join(dir, "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{0, 4096}, {1 << 20, 100 << 10}, {size - 5000, 5000}} {
		if _, err := f.WriteAt(want[r[0]:r[0]+r[1]], r[0]); err != nil {
			t.Fatal(err)
		}
	}
	return path, want
}

func open(t *testing.T, path string, readOnly bool) diskserve.DiskFile {
	t.Helper()
	d, err := raw.OpenFile(path, readOnly)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestConformance(t *testing.T) {
	path, want := makeImage(t, t.TempDir(), 4<<20+512)
	disktest.Check(t, open(t, path, false), want)
}

func TestConformanceReadOnly(t *testing.T) {
	path, want := makeImage(t, t.TempDir(), 4<<20+512)
	disktest.Check(t, open(t, path, true), want)
}

// TestConformanceTmpfs runs on tmpfs, which has no FALLOC_FL_ZERO_RANGE, so
// write zeroes takes the punch-and-allocate path.
func TestConformanceTmpfs(t *testing.T) {
	var st syscall.Statfs_t
	if err := syscall.Statfs("/dev/shm", &st); err != nil || st.Type != 0x01021994 {
		t.Skip("/dev/shm is not a tmpfs")
	}
	dir, err := os.MkdirTemp("/dev/shm", "diskserve-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path, want := makeImage(t, dir, 4<<20)
	disktest.Check(t, open(t, path, false), want)
}

// TestConformanceBlockDevice runs on a loop device, where punch and zero go
// to the block layer.
func TestConformanceBlockDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	path, want := makeImage(t, t.TempDir(), 4<<20)
	out, err := exec.Command("losetup", "--find", "--show", path).Output()
	if err != nil {
		t.Skipf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	d := open(t, dev, false)
	disktest.Check(t, d, want)
	if err := diskserve.Resize(d, 8<<20); !errors.Is(err, diskserve.ErrUnsupported) {
		t.Errorf("Resize of a block device: %v, want ErrUnsupported", err)
	}
}

func TestExtents(t *testing.T) {
	size := int64(4 << 20)
	path, _ := makeImage(t, t.TempDir(), size)
	d := open(t, path, false)
	const hole = diskserve.ExtentHole | diskserve.ExtentZero
	want := []diskserve.Extent{
		{Off: 0, Len: 4096},
		{Off: 4096, Len: 1<<20 - 4096, Flags: hole},
		{Off: 1 << 20, Len: 100 << 10},
		{Off: 1<<20 + 100<<10, Len: size - 8192 - (1<<20 + 100<<10), Flags: hole},
		{Off: size - 8192, Len: 8192}, // 5000 bytes of data fill two 4 KiB blocks
	}
	got, err := diskserve.Extents(d, nil, 0, size)
	if err != nil {
		t.Fatal(err)
	}
	if !equalExtents(got, want) {
		t.Fatalf("extents:\n got %+v\nwant %+v", got, want)
	}
	// A sub-range is clipped, and a punched hole shows up.
	if err := diskserve.PunchHole(d, 1<<20, 64<<10); err != nil {
		t.Fatal(err)
	}
	got, err = diskserve.Extents(d, nil, 1<<20-100, 64<<10+200)
	if err != nil {
		t.Fatal(err)
	}
	want = []diskserve.Extent{{Off: 1<<20 - 100, Len: 64<<10 + 100, Flags: hole}, {Off: 1<<20 + 64<<10, Len: 100}}
	if !equalExtents(got, want) {
		t.Fatalf("extents after punch:\n got %+v\nwant %+v", got, want)
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

func TestLock(t *testing.T) {
	path, _ := makeImage(t, t.TempDir(), 2<<20)
	rw := open(t, path, false)
	for _, readOnly := range []bool{false, true} {
		if d, err := raw.OpenFile(path, readOnly); err == nil || !strings.Contains(err.Error(), "in use by another process") {
			if d != nil {
				d.Close()
			}
			t.Errorf("second open (read-only %v) of a writable image: %v, want a lock error", readOnly, err)
		}
	}
	rw.Close()
	open(t, path, true)
	open(t, path, true) // shared
	if _, err := raw.OpenFile(path, false); err == nil {
		t.Error("read-write open of an image open read-only elsewhere succeeded")
	}
}

// TestLockOutlivesClose: a child that shares the open file of an image
// (as any child forked while the image is open does, until it executes
// its program) keeps the image's lock after the image's Close; an open
// then waits for the child rather than failing at once, and still fails
// while the child holds on.
func TestLockOutlivesClose(t *testing.T) {
	path, _ := makeImage(t, t.TempDir(), 2<<20)
	// closeShared opens the image read-write, lets a child share its
	// open file for seconds, and closes it.
	closeShared := func(seconds string) *exec.Cmd {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		d, err := raw.FromFile(f, path, false)
		if err != nil {
			t.Fatal(err)
		}
		child := exec.Command("sleep", seconds)
		child.ExtraFiles = []*os.File{f}
		if err := child.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			child.Process.Kill()
			child.Wait()
		})
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		return child
	}

	closeShared("0.3")
	start := time.Now()
	again, err := raw.OpenFile(path, true)
	if err != nil {
		t.Fatalf("open after Close, while a child held the lock for 0.3 s: %v", err)
	}
	if waited := time.Since(start); waited < 100*time.Millisecond {
		t.Errorf("the open waited %v for a lock held 0.3 s", waited)
	}
	again.Close()

	closeShared("5")
	if again, err := raw.OpenFile(path, true); err == nil || !strings.Contains(err.Error(), "in use by another process") {
		if again != nil {
			again.Close()
		}
		t.Errorf("open while a child held the lock for 5 s: %v, want a lock error", err)
	}
}

func TestOpenSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := raw.OpenFile(fifo, true)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file or block device") {
			t.Errorf("open of a FIFO: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("open of a FIFO blocked")
	}
	if _, err := raw.OpenFile("/dev/null", true); err == nil || !strings.Contains(err.Error(), "/dev/null") {
		t.Errorf("open of a character device: %v", err)
	}
	if _, err := raw.OpenFile(dir, true); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("open of a directory: %v", err)
	}
}

func TestDescribe(t *testing.T) {
	path, _ := makeImage(t, t.TempDir(), 2<<20)
	info := diskserve.Describe(open(t, path, true))
	if info.Format != "raw" || info.Filename != path || info.VirtualSize != 2<<20 || !info.ReadOnly {
		t.Fatalf("Describe = %+v", info)
	}
}
