package async

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/diskserve/diskserve"
)

// BenchmarkEngine measures each engine on a 256 MiB raw image (in the page
// cache, so the figures are the engines' own cost) with 4 KiB random and
// 1 MiB sequential reads and writes at queue depths 1, 16 and 64, both as
// exporters use an engine (QD goroutines calling the Disk view, which uses
// Do) and through Submit with QD requests kept in flight.
//
//	go test -run '^$' -bench Engine -benchmem ./async
func BenchmarkEngine(b *testing.B) {
	const size = 256 << 20
	d, _ := rawDisk(b, b.TempDir(), size)
	defer d.Close()
	patterns := []struct {
		name string
		op   Op
		bs   int64
		rand bool
	}{
		{"randread-4k", OpRead, 4 << 10, true},
		{"randwrite-4k", OpWrite, 4 << 10, true},
		{"seqread-1m", OpRead, 1 << 20, false},
		{"seqwrite-1m", OpWrite, 1 << 20, false},
	}
	for _, eng := range engines {
		e := eng.new(b, d)
		v := NewDisk(e, d)
		for _, p := range patterns {
			for _, qd := range []int{1, 16, 64} {
				name := fmt.Sprintf("%s/%s/qd%d", eng.name, p.name, qd)
				next := offsets(size, p.bs, p.rand)
				b.Run(name+"/do", func(b *testing.B) { benchDo(b, v, p.op, p.bs, qd, next) })
				b.Run(name+"/submit", func(b *testing.B) { benchSubmit(b, e, p.op, p.bs, qd, next) })
			}
		}
		e.Close()
	}
}

// offsets returns a function that gives the offset of the i-th request.
func offsets(size, bs int64, random bool) func(i int) int64 {
	if !random {
		return func(i int) int64 { return int64(i) * bs % size }
	}
	return func(i int) int64 { return int64(rand.Uint64N(uint64(size/bs))) * bs }
}

func benchDo(b *testing.B, v diskserve.DiskFile, op Op, bs int64, qd int, next func(int) int64) {
	b.SetBytes(bs)
	b.ReportAllocs()
	var wg sync.WaitGroup
	var mu sync.Mutex
	i := 0
	for range qd {
		buf := make([]byte, bs)
		wg.Go(func() {
			for {
				mu.Lock()
				if i >= b.N {
					mu.Unlock()
					return
				}
				off := next(i)
				i++
				mu.Unlock()
				var err error
				if op == OpRead {
					_, err = v.ReadAt(buf, off)
				} else {
					_, err = v.WriteAt(buf, off)
				}
				if err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}

func benchSubmit(b *testing.B, e Engine, op Op, bs int64, qd int, next func(int) int64) {
	b.SetBytes(bs)
	b.ReportAllocs()
	done := make(chan *Request, qd)
	for range qd {
		done <- &Request{Op: op, Buf: make([]byte, bs), Done: func(r *Request) { done <- r }}
	}
	for i := range b.N {
		r := <-done
		if r.Err != nil {
			b.Fatal(r.Err)
		}
		r.Off = next(i)
		e.Submit(r)
	}
	for range qd {
		<-done
	}
}
