package zstd

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/diskserve/diskserve/internal/disktest"
)

// benchImage returns a 64 MiB seekable image of compressible data.
func benchImage(tb testing.TB) (*Disk, []byte) {
	tb.Helper()
	data := make([]byte, 64<<20)
	rnd := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(data); i += 4096 {
		if rnd.IntN(2) == 0 {
			for k := i; k < i+4096; k += 8 {
				data[k] = byte(rnd.Uint32())
			}
		}
	}
	var out bytes.Buffer
	if err := Write(context.Background(), &out, disktest.NewMemory(data, true), WriteOptions{}, nil); err != nil {
		tb.Fatal(err)
	}
	d, err := parse(disktest.NewMemory(out.Bytes(), true))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d, data
}

// TestWarmReadsDoNotDecompress reads a working set that fits the cache
// twice: the second pass must be served from memory.
func TestWarmReadsDoNotDecompress(t *testing.T) {
	d, data := benchImage(t)
	rnd := rand.New(rand.NewPCG(3, 4))
	offs := make([]int64, 2000)
	for i := range offs {
		offs[i] = rnd.Int64N(32<<20) &^ 4095 // 32 MiB: well inside the 256 MiB cache
	}
	p := make([]byte, 4096)
	for _, off := range offs {
		d.ReadAt(p, off)
	}
	before := d.decoded.Load()
	for _, off := range offs {
		if _, err := d.ReadAt(p, off); err != nil || !bytes.Equal(p, data[off:off+4096]) {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	if n := d.decoded.Load() - before; n != 0 {
		t.Fatalf("%d frames decompressed again on warm reads", n)
	}
}

func BenchmarkReadSequential(b *testing.B) {
	d, _ := benchImage(b)
	p := make([]byte, 1<<20)
	b.SetBytes(d.Size())
	b.ReportAllocs()
	for b.Loop() {
		frames.drop(d) // cold
		for off := int64(0); off < d.Size(); off += int64(len(p)) {
			if _, err := d.ReadAt(p, off); err != nil && err != io.EOF {
				b.Fatal(err)
			}
		}
	}
}

func BenchmarkReadRandomWarm(b *testing.B) {
	d, _ := benchImage(b)
	p := make([]byte, 4096)
	for off := int64(0); off < d.Size(); off += 1 << 20 { // warm
		d.ReadAt(p, off)
	}
	rnd := rand.New(rand.NewPCG(5, 6))
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		d.ReadAt(p, rnd.Int64N(d.Size()-4096))
	}
}
