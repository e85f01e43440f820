package compare

import (
	"context"
	"math/rand/v2"
	"testing"

	"github.com/diskserve/diskserve/internal/disktest"
)

// TestFirstDifferenceWins plants differences at random places in disks of
// many pieces and requires the lowest one, whichever goroutine finds it
// first.
func TestFirstDifferenceWins(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	const size = 16 << 20
	for round := range 12 {
		a := make([]byte, size)
		for k := 0; k < size; k += 1 << 20 {
			a[k+rnd.IntN(1<<20)] = byte(1 + rnd.IntN(255))
		}
		b := append([]byte(nil), a...)
		first := int64(-1)
		for range 1 + rnd.IntN(6) {
			off := rnd.Int64N(size)
			b[off]++
			if first < 0 || off < first {
				first = off
			}
		}
		r, err := Disks(context.Background(), disktest.NewMemory(a, true), disktest.NewMemory(b, true), Options{Workers: 1 + round%5})
		if err != nil {
			t.Fatal(err)
		}
		if r.What != Content || r.Off != first/sector*sector {
			t.Fatalf("round %d: %+v, want a content difference at %d", round, r, first/sector*sector)
		}
		if r, err := Disks(context.Background(), disktest.NewMemory(a, true), disktest.NewMemory(a, true), Options{}); err != nil || r.What != Same {
			t.Fatalf("a disk against itself: %+v %v", r, err)
		}
	}
}
