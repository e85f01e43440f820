// Package testtool runs the real tools that diskserve's interop tests
// compare against (qemu-img, qemu-io, nbdinfo, ...).
//
// A test that needs a tool calls [Need]. When the tool is missing the test
// is skipped, unless DISKSERVE_REQUIRE_INTEROP=1 is set (as CI sets it),
// in which case it fails: a missing tool must not turn interop coverage
// into silence.
package testtool

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// RequireEnv is the environment variable that turns a missing tool from a
// skip into a failure.
const RequireEnv = "DISKSERVE_REQUIRE_INTEROP"

// Need returns the path of the named tool, or skips (or fails, under
// [RequireEnv]) the test when it is not installed.
func Need(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%s is required (%s=1) but not installed: %v", name, RequireEnv, err)
	}
	t.Skipf("%s not installed: %v", name, err)
	return ""
}

// Run runs the named tool with args and returns its standard output,
// failing the test with the tool's standard error if it exits non-zero.
func Run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(Need(t, name), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.Bytes())
	}
	return out
}

// A Range is a half-open byte range [Start, End).
type Range struct{ Start, End int64 }

// DataRanges returns the ranges that output of `map --output=json` (qemu-img's
// or diskserve's) marks as data, with neighbours merged, so that two maps
// of the same image compare equal whatever their extent boundaries.
func DataRanges(t testing.TB, mapJSON []byte) []Range {
	t.Helper()
	var recs []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal(mapJSON, &recs); err != nil {
		t.Fatalf("map output: %v\n%s", err, mapJSON)
	}
	var r []Range
	for _, rec := range recs {
		if rec.Data {
			r = AddRange(r, rec.Start, rec.Length)
		}
	}
	return r
}

// AddRange appends [start, start+n) to r, merging it with the last range
// when they touch.
func AddRange(r []Range, start, n int64) []Range {
	if k := len(r); k > 0 && r[k-1].End == start {
		r[k-1].End += n
		return r
	}
	return append(r, Range{start, start + n})
}

// QemuCheck runs qemu-img check on img and fails the test on any error,
// corruption or leak it reports.
func QemuCheck(t testing.TB, img string) {
	t.Helper()
	out, _ := exec.Command(Need(t, "qemu-img"), "check", "--output=json", img).Output()
	var res struct {
		CheckErrors int `json:"check-errors"`
		Corruptions int `json:"corruptions"`
		Leaks       int `json:"leaks"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("qemu-img check: %v\n%s", err, out)
	}
	if res.CheckErrors != 0 || res.Corruptions != 0 || res.Leaks != 0 {
		human, _ := exec.Command("qemu-img", "check", img).CombinedOutput()
		t.Fatalf("qemu-img check: %+v\n%s", res, human)
	}
}

// QemuRaw returns img's content as qemu-img convert -O raw reads it.
func QemuRaw(t testing.TB, img string, args ...string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "content.raw")
	Run(t, "qemu-img", append(append([]string{"convert"}, args...), "-O", "raw", img, out)...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
