package nbd

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/testtool"
)

// TestEngineENOSPC serves a raw image on a 1 MiB tmpfs through each I/O
// engine: writes past what the tmpfs holds fail with NBD's ENOSPC, and the
// export goes on serving reads and the writes that fit.
func TestEngineENOSPC(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv(testtool.RequireEnv) == "1" {
			t.Fatal("mounting a tmpfs needs root")
		}
		t.Skip("mounting a tmpfs needs root")
	}
	for _, mode := range []async.Mode{async.Pool, async.Uring} {
		t.Run(string(mode), func(t *testing.T) {
			dir := t.TempDir()
			if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
			path := filepath.Join(dir, "disk.raw")
			if err := os.WriteFile(path, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			os.Truncate(path, 8<<20)
			d, err := format.Open(path, diskserve.Options{Format: "raw"})
			if err != nil {
				t.Fatal(err)
			}
			w, err := async.Wrap(d, async.Options{Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			_, sock := start(t, []Export{{Disk: w}}, Options{})
			cl := connect(t, sock)
			cl.goExport("")
			payload := bytes.Repeat([]byte{0x5a}, 64<<10)
			var errno uint32
			cookie := uint64(1)
			for off := uint64(0); off < 8<<20 && errno == 0; off += uint64(len(payload)) {
				cl.request(cmdWrite, 0, cookie, off, uint32(len(payload)), payload)
				errno, _ = cl.simple()
				cookie++
			}
			if errno != errNoSpc {
				t.Fatalf("filling the tmpfs: errno %d, want ENOSPC (%d)", errno, errNoSpc)
			}
			cl.request(cmdRead, 0, cookie, 0, 4096, nil)
			if errno, _ := cl.simple(); errno != 0 {
				t.Fatalf("READ after ENOSPC: errno %d", errno)
			}
			if got := cl.read(4096); !bytes.Equal(got, payload[:4096]) {
				t.Fatal("READ after ENOSPC returned the wrong data")
			}
			cl.request(cmdWrite, cmdFlagFUA, cookie+1, 4096, 512, payload[:512])
			if errno, _ := cl.simple(); errno != 0 {
				t.Fatalf("WRITE into allocated space after ENOSPC: errno %d", errno)
			}
		})
	}
}
