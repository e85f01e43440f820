package remote

import (
	"fmt"
	"testing"
)

// FuzzContentRange parses arbitrary Content-Range values: no panic, and
// what parses is well formed and prints back to an equivalent value.
func FuzzContentRange(f *testing.F) {
	for _, v := range []string{"bytes 0-0/1", "bytes 5-9/*", "bytes */100", "bytes 0-18446744073709551615/1", "bytes -1-2/3", "", "bytes 9-5/10"} {
		f.Add(v)
	}
	f.Fuzz(func(t *testing.T, v string) {
		start, end, total, ok := contentRange(v)
		if !ok {
			return
		}
		if total < -1 || start == -1 != (end == -1) || start > end || start < -1 {
			t.Fatalf("%q: %d-%d/%d", v, start, end, total)
		}
		back := fmt.Sprintf("bytes %d-%d/%d", start, end, total)
		switch {
		case start == -1 && total == -1:
			back = "bytes */*"
		case start == -1:
			back = fmt.Sprintf("bytes */%d", total)
		case total == -1:
			back = fmt.Sprintf("bytes %d-%d/*", start, end)
		}
		if s2, e2, t2, ok2 := contentRange(back); !ok2 || s2 != start || e2 != end || t2 != total {
			t.Fatalf("%q parsed as %d-%d/%d, which reads back from %q as %d-%d/%d %v", v, start, end, total, back, s2, e2, t2, ok2)
		}
	})
}
