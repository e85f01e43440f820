package raw

import (
	"fmt"
	"math/rand/v2"
	"os"
	"sync/atomic"
	"testing"
)

// settledFile returns a 1 GiB file of zeroes in the page cache, clean,
// written in 1 MiB pieces in order (large folios) or, settled, in 4 KiB
// pieces in random order (single-page folios).
func settledFile(b *testing.B, settled bool) *os.File {
	b.Helper()
	const size = 1 << 30
	f, err := os.Create(b.TempDir() + "/bench.raw")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	piece := 1 << 20
	if settled {
		piece = 4096
	}
	order := make([]int, size/piece)
	for i := range order {
		order[i] = i
	}
	if settled {
		rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	}
	buf := make([]byte, piece)
	for _, i := range order {
		if _, err := f.WriteAt(buf, int64(i*piece)); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	return f
}

// BenchmarkWritePaths writes pieces of 4 KiB to 1 MiB at random aligned
// offsets of a fresh and of a settled page-cached file, by store and by
// pwrite, from 16 goroutines. Run it with a fixed count (-benchtime
// 20000x): most small writes then touch pages for the first time since
// the file was made, as a server's writes do (see docs/performance.md).
// A store that faults (it should not: every page is cached) is a pwrite,
// counted in the refused/op metric.
func BenchmarkWritePaths(b *testing.B) {
	for _, size := range []int64{4 << 10, 16 << 10, 32 << 10, 64 << 10, 1 << 20} {
		for _, state := range []string{"fresh", "settled"} {
			for _, way := range []string{"store", "pwrite"} {
				b.Run(fmt.Sprintf("%dK/%s/%s", size>>10, state, way), func(b *testing.B) {
					f := settledFile(b, state == "settled")
					m := mapForWrites(int(f.Fd()))
					defer m.unmap()
					var refused atomic.Int64
					b.SetBytes(size)
					b.SetParallelism(8)
					b.ResetTimer()
					b.RunParallel(func(pb *testing.PB) {
						p := make([]byte, size)
						rnd := rand.New(rand.NewPCG(rand.Uint64(), 1))
						for pb.Next() {
							off := rnd.Int64N(1<<30/size) * size
							if way == "store" && m.copyIn(p, off) {
								continue
							} else if way == "store" {
								refused.Add(1)
							}
							if _, err := f.WriteAt(p, off); err != nil {
								b.Fatal(err)
							}
						}
					})
					b.ReportMetric(float64(refused.Load())/float64(b.N), "refused/op")
				})
			}
		}
	}
}
