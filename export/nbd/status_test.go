package nbd

import (
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/diskserve/diskserve"
)

// fragmented is a disk of zeroes whose extents alternate between data and
// zero every 4 bytes, as an Android sparse image of 4-byte blocks can: the
// most extents a format can report. It counts the largest answer it gave.
type fragmented struct {
	size    int64
	biggest atomic.Int64
}

func (d *fragmented) Size() int64                           { return d.size }
func (d *fragmented) ReadOnly() bool                        { return true }
func (d *fragmented) Close() error                          { return nil }
func (d *fragmented) WriteAt([]byte, int64) (int, error)    { return 0, diskserve.ErrReadOnly }
func (d *fragmented) ReadAt(p []byte, _ int64) (int, error) { clear(p); return len(p), nil }

func (d *fragmented) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	start := len(dst)
	for pos := off; pos < off+n; {
		next := min(pos&^3+4, off+n)
		dst = append(dst, diskserve.Extent{Off: pos, Len: next - pos, Flags: diskserve.ExtentFlags(pos>>2&1) * diskserve.ExtentZero})
		pos = next
	}
	if k := int64(len(dst) - start); k > d.biggest.Load() {
		d.biggest.Store(k)
	}
	return dst, nil
}

// TestBlockStatusFragmented asks for the status of 64 MiB of a disk with an
// extent every 4 bytes, the most a request can cover here: the reply holds
// at most maxDescriptors, no single extents call brings more than 64 Ki of
// them, and serving it allocates a few MiB, where one call over the whole
// range would bring 16 million extents (384 MiB).
func TestBlockStatusFragmented(t *testing.T) {
	d := &fragmented{size: 64 << 20}
	_, path := start(t, []Export{{Disk: d}}, Options{})
	cl := connect(t, path)
	cl.structured("")
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	cl.request(cmdBlockStatus, 0, 1, 0, uint32(d.size), nil)
	c := cl.chunk()
	runtime.ReadMemStats(&after)
	if c.typ != chunkBlockStatus || c.flags&replyFlagDone == 0 {
		t.Fatalf("reply %+v", c)
	}
	descriptors := (len(c.payload) - 4) / 8
	if descriptors < 1 || descriptors > maxDescriptors {
		t.Errorf("%d descriptors", descriptors)
	}
	if got := d.biggest.Load(); got > statusFirstStep/4 {
		t.Errorf("one extents call brought %d extents", got)
	}
	if grown := after.TotalAlloc - before.TotalAlloc; grown > 16<<20 {
		t.Errorf("serving it allocated %d MiB", grown>>20)
	}
	t.Logf("%d descriptors; largest extents call %d; allocated %d KiB", descriptors, d.biggest.Load(), (after.TotalAlloc-before.TotalAlloc)>>10)
}
