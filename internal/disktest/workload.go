package disktest

import (
	"math/rand/v2"
	"testing"

	"github.com/diskserve/diskserve"
)

// Workload applies ops random requests to d and to want alike: writes of
// odd sizes, zero writes (with and without unmapping), punches and
// flushes, a third of them aligned to 64 KiB to reach whole-cluster and
// whole-block paths. seed makes it repeatable.
func Workload(t *testing.T, d diskserve.DiskFile, want []byte, seed uint64, ops int) {
	t.Helper()
	rnd := rand.New(rand.NewPCG(seed, 99))
	size := int64(len(want))
	for i := range ops {
		off := rnd.Int64N(size)
		n := min(1+rnd.Int64N(200<<10), size-off)
		if rnd.IntN(3) == 0 {
			off &^= 65535
			n = min((1+rnd.Int64N(4))<<16, size-off)
		}
		switch op := rnd.IntN(10); {
		case op < 5:
			p := make([]byte, n)
			for k := range p {
				p[k] = byte(rnd.Uint32() | 1)
			}
			if _, err := d.WriteAt(p, off); err != nil {
				t.Fatalf("op %d: WriteAt(%d, %d): %v", i, off, n, err)
			}
			copy(want[off:], p)
		case op < 7:
			flags := diskserve.ZeroFlags(0)
			if rnd.IntN(2) == 0 {
				flags = diskserve.ZeroMayUnmap
			}
			if err := diskserve.WriteZeroes(d, off, n, flags); err != nil {
				t.Fatalf("op %d: WriteZeroes(%d, %d, %d): %v", i, off, n, flags, err)
			}
			clear(want[off : off+n])
		case op < 9:
			if err := diskserve.PunchHole(d, off, n); err != nil {
				t.Fatalf("op %d: PunchHole(%d, %d): %v", i, off, n, err)
			}
			clear(want[off : off+n])
		default:
			if err := diskserve.Flush(d); err != nil {
				t.Fatalf("op %d: Flush: %v", i, err)
			}
		}
	}
}
