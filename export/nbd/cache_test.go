package nbd

import (
	"bytes"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/disktest"
)

// gatedDisk holds every read until gate closes, and says when one starts.
type gatedDisk struct {
	*disktest.Memory
	started chan struct{}
	gate    chan struct{}
}

func (g *gatedDisk) ReadAt(p []byte, off int64) (int, error) {
	select {
	case g.started <- struct{}{}:
	default:
	}
	<-g.gate
	return g.Memory.ReadAt(p, off)
}

// TestCacheRepliesBeforeReading sends NBD_CMD_CACHE while the disk's reads
// are held: without flags its reply comes at once and the range is read
// behind it; with FUA the reply waits for the read. A connection closed
// while a prefetch reads ends once the read returns (goleak checks).
func TestCacheRepliesBeforeReading(t *testing.T) {
	data := pattern(diskSize)
	d := &gatedDisk{Memory: disktest.NewMemory(data, false), started: make(chan struct{}, 1), gate: make(chan struct{})}
	_, path := start(t, []Export{{Disk: d}}, Options{})
	cl := connect(t, path)
	cl.goExport("")
	cl.request(cmdCache, 0, 1, 0, diskSize, nil)
	if errno, cookie := cl.simple(); errno != 0 || cookie != 1 {
		t.Fatalf("CACHE: errno %d cookie %d", errno, cookie)
	}
	select {
	case <-d.started:
	case <-time.After(10 * time.Second):
		t.Fatal("CACHE was answered but its range is not being read")
	}

	cl.request(cmdCache, cmdFlagFUA, 2, 0, 4096, nil)
	cl.c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	var b [1]byte
	var ne net.Error
	if n, err := cl.c.Read(b[:]); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("a CACHE with FUA was answered before its range was read (%d bytes, %v)", n, err)
	}
	cl.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	close(d.gate)
	if errno, cookie := cl.simple(); errno != 0 || cookie != 2 {
		t.Fatalf("CACHE with FUA: errno %d cookie %d", errno, cookie)
	}
	cl.request(cmdRead, 0, 3, 8192, 100, nil)
	if errno, cookie := cl.simple(); errno != 0 || cookie != 3 {
		t.Fatalf("READ: errno %d cookie %d", errno, cookie)
	}
	if got := cl.read(100); !bytes.Equal(got, data[8192:8292]) {
		t.Fatal("READ after CACHE returned the wrong data")
	}

	// A connection that leaves while its prefetcher reads.
	d2 := &gatedDisk{Memory: disktest.NewMemory(data, false), started: make(chan struct{}, 1), gate: make(chan struct{})}
	_, path2 := start(t, []Export{{Disk: d2}}, Options{})
	cl2 := connect(t, path2)
	cl2.goExport("")
	for i := range uint64(prefetchQueue + 2) {
		cl2.request(cmdCache, 0, i, 0, diskSize, nil)
	}
	for range prefetchQueue { // queued at once; the rest perhaps read first
		if errno, _ := cl2.simple(); errno != 0 {
			t.Fatalf("CACHE: errno %d", errno)
		}
	}
	<-d2.started
	cl2.c.Close()
	close(d2.gate)
}
