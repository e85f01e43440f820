package nbd

import (
	"bytes"
	"cmp"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/format"
)

// counting is a wrapper that counts the requests it sees, as a metering,
// throttling or fault-injecting wrapper would see them.
type counting struct {
	diskserve.Passthrough
	reads, writes, others atomic.Int64
}

func (c *counting) ReadAt(p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.D.ReadAt(p, off)
}

func (c *counting) WriteAt(p []byte, off int64) (int, error) {
	c.writes.Add(1)
	return c.D.WriteAt(p, off)
}

func (c *counting) Flush() error {
	c.others.Add(1)
	return c.Passthrough.Flush()
}

func (c *counting) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	c.others.Add(1)
	return c.Passthrough.WriteZeroesAt(off, n, flags)
}

func (c *counting) PunchHole(off, n int64) error {
	c.others.Add(1)
	return c.Passthrough.PunchHole(off, n)
}

// mapping is a counting wrapper that opts into host mapping, so that the
// fast paths bypass it: the control that shows the test can see a bypass.
type mapping struct{ *counting }

func (m mapping) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	return diskserve.MapHost(m.D, off, n, write)
}

// TestWrappersSeeEveryRequest serves a page-cached raw image through a
// counting wrapper, with each I/O engine and with none, and sends reads
// small and large (the sizes the reader serves from the page cache itself
// and those sent with sendfile), writes small and large (those the ring
// and the raw store would take), flushes, zeroes and trims: the wrapper
// sees every one. A wrapper that opts into host mapping is bypassed by the
// same reads, which shows that the paths were taken.
func TestWrappersSeeEveryRequest(t *testing.T) {
	const n = 8
	sizes := []int{4 << 10, 256 << 10}
	run := func(t *testing.T, mode async.Mode, wrap func(*counting) diskserve.DiskFile) *counting {
		path := filepath.Join(t.TempDir(), "disk.raw")
		if err := os.WriteFile(path, bytes.Repeat([]byte{0x5a}, 8<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		d, err := format.Open(path, diskserve.Options{Format: "raw"})
		if err != nil {
			t.Fatal(err)
		}
		c := &counting{Passthrough: diskserve.Passthrough{D: d}}
		disk := wrap(c)
		if mode != "" {
			if disk, err = async.Wrap(disk, async.Options{Mode: mode}); err != nil {
				t.Fatal(err)
			}
		}
		t.Cleanup(func() { disk.Close() })
		_, sock := start(t, []Export{{Disk: disk}}, Options{})
		cl := connect(t, sock)
		cl.goExport("")
		cookie := uint64(0)
		do := func(typ uint16, off uint64, length int, payload []byte) {
			t.Helper()
			cookie++
			cl.request(typ, 0, cookie, off, uint32(length), payload)
			if errno, got := cl.simple(); errno != 0 || got != cookie {
				t.Fatalf("command %d: errno %d, cookie %d", typ, errno, got)
			}
			if typ == cmdRead {
				cl.read(length)
			}
		}
		for _, size := range sizes {
			for i := range n {
				do(cmdRead, uint64(i*size), size, nil)
			}
		}
		for _, size := range sizes {
			payload := bytes.Repeat([]byte{byte(size)}, size)
			for i := range n {
				do(cmdWrite, uint64(4<<20+i*size), size, payload)
			}
		}
		do(cmdFlush, 0, 0, nil)
		do(cmdWriteZeroes, 0, 64<<10, nil)
		do(cmdTrim, 64<<10, 64<<10, nil)
		return c
	}
	for _, mode := range []async.Mode{"", async.Pool, async.Uring} {
		name := cmp.Or(string(mode), "no-engine")
		t.Run(name, func(t *testing.T) {
			c := run(t, mode, func(c *counting) diskserve.DiskFile { return c })
			if got, want := c.reads.Load(), int64(n*len(sizes)); got != want {
				t.Errorf("the wrapper saw %d reads of %d", got, want)
			}
			if got, want := c.writes.Load(), int64(n*len(sizes)); got != want {
				t.Errorf("the wrapper saw %d writes of %d", got, want)
			}
			if got := c.others.Load(); got != 3 {
				t.Errorf("the wrapper saw %d of 3 flushes, zeroes and trims", got)
			}
		})
	}
	t.Run("mapped", func(t *testing.T) {
		c := run(t, "", func(c *counting) diskserve.DiskFile { return mapping{c} })
		if got := c.reads.Load(); got >= int64(n*len(sizes)) {
			t.Errorf("a wrapper that maps the host file saw all %d reads: the page-cache paths were not taken", got)
		}
	})
}
