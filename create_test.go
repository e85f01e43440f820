package diskserve_test

import (
	"testing"

	"github.com/diskserve/diskserve"
)

func TestParseSize(t *testing.T) {
	for s, want := range map[string]int64{"0": 0, "512": 512, "4k": 4096, "10M": 10 << 20, "1.5G": 3 << 29, "2T": 2 << 40, "1E": 1 << 60} {
		if got, err := diskserve.ParseSize(s); got != want || err != nil {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", s, got, err, want)
		}
	}
	for _, s := range []string{"", "x", "-1", "1.5", "8E", "1Z"} {
		if _, err := diskserve.ParseSize(s); err == nil {
			t.Errorf("ParseSize(%q) accepted", s)
		}
	}
}
