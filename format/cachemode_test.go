package format_test

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/remote"
)

// TestUnsafeFilesIgnoreFlushes writes into a qcow2 image opened through
// FileOpener and flushes it: under writeback the flush leaves none of the
// host file's pages dirty; under unsafe it reaches no file, the format's
// own ordering flushes included, and the written clusters stay dirty in
// the page cache.
func TestUnsafeFilesIgnoreFlushes(t *testing.T) {
	for _, mode := range []diskserve.CacheMode{diskserve.CacheWriteback, diskserve.CacheUnsafe} {
		path := filepath.Join(t.TempDir(), "disk.qcow2")
		if err := qcow2.Create(path, qcow2.CreateOptions{Size: 64 << 20}); err != nil {
			t.Fatal(err)
		}
		d, err := format.Open(path, diskserve.Options{OpenFile: format.FileOpener(remote.Config{}, mode)})
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4<<20)
		for i := range buf {
			buf[i] = byte(i/4096 + 1)
		}
		if _, err := d.WriteAt(buf, 8<<20); err != nil {
			t.Fatal(err)
		}
		if err := diskserve.Flush(d); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		var st unix.Cachestat_t
		err = unix.Cachestat(uint(f.Fd()), &unix.CachestatRange{}, &st, 0)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if mode == diskserve.CacheUnsafe && st.Dirty == 0 {
			t.Errorf("unsafe: a flush wrote the image's pages back (none of %d cached pages dirty)", st.Cache)
		}
		if mode != diskserve.CacheUnsafe && st.Dirty != 0 {
			t.Errorf("%s: %d pages dirty after a flush", mode, st.Dirty)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
