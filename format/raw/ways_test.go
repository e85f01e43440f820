package raw

import (
	"testing"
	"time"
)

// TestWayChooserFollowsCosts feeds the chooser made-up times per way in
// two regions, then swaps them in one: each region settles on its cheaper
// way after its first learnWrites, trying the other now and then, and
// follows the swap.
func TestWayChooserFollowsCosts(t *testing.T) {
	var c wayChooser
	const settled, fresh = 0, 5 << 21 // two regions
	cost := map[int64][2]time.Duration{
		settled: {14 * time.Microsecond, 3 * time.Microsecond},
		fresh:   {10 * time.Microsecond, 24 * time.Microsecond},
	}
	run := func(off int64, writes int) (picks [2]int) {
		for range writes {
			r := c.region(off)
			w := r.pick()
			picks[w]++
			r.record(w, cost[off][w])
		}
		return picks
	}
	for off, want := range map[int64]way{settled: byPwrite, fresh: byStore} {
		picks := run(off, 1600)
		if picks[want] < 1600-1600/exploreEvery-learnWrites || picks[1-want] < 1600/(exploreEvery*maxExploreScale) {
			t.Errorf("region at %d: %v picks (store, pwrite), want way %d but for a few tries", off, picks, want)
		}
	}
	cost[fresh] = [2]time.Duration{14 * time.Microsecond, 3 * time.Microsecond} // its folios split
	run(fresh, 200)
	if picks := run(fresh, 1600); picks[byPwrite] < 1600-1600/exploreEvery-2 {
		t.Errorf("after its costs swapped, the region picks %v (store, pwrite)", picks)
	}
	// One slow outlier does not flip a region.
	c.region(settled).record(byPwrite, time.Second)
	if picks := run(settled, 32); picks[byPwrite] < 32-2*32/exploreEvery {
		t.Errorf("an outlier flipped the region: %v (store, pwrite)", picks)
	}
	// Offsets across the window land in their own regions.
	last := int64(storeWindow - 4096)
	c.region(last).record(byStore, time.Microsecond)
	if got := c.region(last).mean[byStore].Load(); got != int32(time.Microsecond) {
		t.Errorf("the last region's store mean is %d", got)
	}
}
