package raw_test

import (
	"math/rand/v2"
	"os"
	"testing"

	"github.com/diskserve/diskserve/format/raw"
)

// benchFile returns a 256 MiB raw image full of data, in the page cache.
func benchFile(b *testing.B) string {
	b.Helper()
	path := b.TempDir() + "/bench.raw"
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for off := int64(0); off < 256<<20; off += 1 << 20 {
		f.WriteAt(buf, off)
	}
	f.Close()
	return path
}

func benchmarkIO(b *testing.B, write bool, size int) {
	d, err := raw.OpenFile(benchFile(b), false)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.SetParallelism(8) // 8 × GOMAXPROCS goroutines, like a server's workers
	b.RunParallel(func(pb *testing.PB) {
		p := make([]byte, size)
		rnd := rand.New(rand.NewPCG(rand.Uint64(), 1))
		blocks := int64(256<<20) / int64(size)
		for pb.Next() {
			off := rnd.Int64N(blocks) * int64(size)
			var err error
			if write {
				_, err = d.WriteAt(p, off)
			} else {
				_, err = d.ReadAt(p, off)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkReadAt(b *testing.B) {
	b.Run("4KiB-random", func(b *testing.B) { benchmarkIO(b, false, 4<<10) })
	b.Run("1MiB-random", func(b *testing.B) { benchmarkIO(b, false, 1<<20) })
}

func BenchmarkWriteAt(b *testing.B) {
	b.Run("4KiB-random", func(b *testing.B) { benchmarkIO(b, true, 4<<10) })
	b.Run("1MiB-random", func(b *testing.B) { benchmarkIO(b, true, 1<<20) })
}
