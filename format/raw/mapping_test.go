package raw

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve/internal/testtool"
)

func openDisk(t *testing.T, path string) *Disk {
	t.Helper()
	d, err := OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d.(*Disk)
}

func cachestat(t *testing.T, d *Disk, off, n int64) unix.Cachestat_t {
	t.Helper()
	var st unix.Cachestat_t
	if err := unix.Cachestat(uint(d.fd), &unix.CachestatRange{Off: uint64(off), Len: uint64(n)}, &st, 0); err != nil {
		t.Fatalf("cachestat: %v", err)
	}
	return st
}

// TestWriteMapping checks when writes are stores: to cached pages they are (and
// MapHost leaves them to WriteAt), and fdatasync makes them durable; to
// pages not cached they are not, and pwrite (or an engine) does them.
func TestWriteMapping(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	const size = 4 << 20
	if err := os.WriteFile(path, bytes.Repeat([]byte{1}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	d := openDisk(t, path)
	if d.mapping == nil {
		t.Fatal("a writable regular file has no write mapping")
	}
	p := bytes.Repeat([]byte{2}, 8192)
	if _, ok := d.MapHost(4096+100, int64(len(p)), true); ok {
		t.Fatal("MapHost mapped a write that would be a store")
	}
	if _, ok := d.MapHost(4096+100, int64(len(p)), false); !ok {
		t.Fatal("MapHost refused a read")
	}
	if !d.mapping.write(p, 4096+100) {
		t.Fatal("a write to cached pages was not stored")
	}
	if st := cachestat(t, d, 0, size); st.Dirty == 0 {
		t.Fatalf("stored pages are not dirty: %+v", st)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if st := cachestat(t, d, 0, size); st.Dirty != 0 || st.Writeback != 0 {
		t.Fatalf("after Flush, stored pages are not clean: %+v", st)
	}
	got := make([]byte, size)
	if _, err := d.f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{1}, size)
	copy(want[4096+100:], p)
	if !bytes.Equal(got, want) {
		t.Fatal("pread does not see the stored bytes")
	}

	// Evict the second half, which no store has mapped, from the page
	// cache: a write there is not a store, because a store would read the
	// page from disk first.
	if err := unix.Fadvise(d.fd, size/2, size/2, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	if st := cachestat(t, d, size/2, size/2); st.Cache != 0 {
		t.Fatalf("FADV_DONTNEED left %d pages cached", st.Cache)
	}
	if _, ok := d.MapHost(size/2+100, int64(len(p)), true); !ok {
		t.Fatal("MapHost refused a write to pages not in the page cache")
	}
	if d.mapping.write(p, size/2+100) {
		t.Fatal("a write to pages not in the page cache was stored")
	}
	if _, err := d.WriteAt(p, size/2+100); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(got[:len(p)], size/2+100); err != nil || !bytes.Equal(got[:len(p)], p) {
		t.Fatalf("pwrite fallback: %v", err)
	}
}

// TestWriteMappingFault stores past the end of the file, where the mapping
// faults: the store reports false instead of crashing, and the goroutine's
// fault setting is as before.
func TestWriteMappingFault(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d := openDisk(t, path)
	if d.mapping.copyIn(make([]byte, 4096), 8<<20) {
		t.Fatal("a store past the end of the file succeeded")
	}
	if debug.SetPanicOnFault(false) {
		t.Fatal("the store left SetPanicOnFault on")
	}
	if !d.mapping.copyIn(make([]byte, 4096), 4096) {
		t.Fatal("a store inside the file failed after a fault")
	}
}

// TestWriteMappingENOSPC fills a sparse image on a small ext4 file system whose
// holes are cached: stores fault when ext4 has no block to give, the write
// goes to pwrite, and that fails with ENOSPC; what was written reads back.
func TestWriteMappingENOSPC(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv(testtool.RequireEnv) == "1" {
			t.Fatal("mounting an ext4 file system needs root")
		}
		t.Skip("mounting an ext4 file system needs root")
	}
	mkfs := testtool.Need(t, "mkfs.ext4")
	testtool.Need(t, "mount")
	dir := t.TempDir()
	fsImage, mnt := filepath.Join(dir, "fs.img"), filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if err := os.WriteFile(fsImage, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(fsImage, 16<<20)
	testtool.Run(t, mkfs, "-q", "-m", "0", fsImage)
	testtool.Run(t, "mount", "-o", "loop", fsImage, mnt)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })

	path := filepath.Join(mnt, "disk.raw")
	const size = 32 << 20
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(path, size)
	d := openDisk(t, path)
	if _, err := d.ReadAt(make([]byte, size), 0); err != nil { // caches the holes
		t.Fatal(err)
	}
	// ext4 reserves blocks for a whole large folio when a store first
	// dirties it, so stores fault before the file system is quite full;
	// pwrite then fills what is left.
	buf := bytes.Repeat([]byte{0xc3}, 64<<10)
	var off int64
	var faults int
	var err error
	for ; off < size; off += int64(len(buf)) {
		if !d.mapping.cached(off, int64(len(buf))) {
			t.Fatalf("hole at %d is not cached", off)
		}
		if d.mapping.write(buf, off) {
			continue
		}
		faults++
		if _, err = d.WriteAt(buf, off); err != nil {
			break
		}
	}
	if faults == 0 || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling a %d-byte image on a 16 MiB file system: %d stores faulted, then %v; want faults and ENOSPC", size, faults, err)
	}
	got := make([]byte, len(buf))
	for pos := int64(0); pos < off; pos += int64(len(buf)) {
		if _, err := d.ReadAt(got, pos); err != nil || !bytes.Equal(got, buf) {
			t.Fatalf("read at %d after ENOSPC: %v", pos, err)
		}
	}
}
