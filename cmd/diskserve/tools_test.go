package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// runTool runs bin with args in dir ("" for the current directory) and
// returns its standard output and exit status.
func runTool(t *testing.T, dir, bin string, args ...string) (stdout string, code int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

// likeQemuImg runs qemu-img and diskserve with the same arguments in dir,
// and requires the same exit status and the same standard output.
func likeQemuImg(t *testing.T, dir string, args ...string) (stdout string, code int) {
	t.Helper()
	qout, qcode := runTool(t, dir, testtool.Need(t, "qemu-img"), args...)
	out, code := runTool(t, dir, diskserveBin, args...)
	if qout != out || qcode != code {
		t.Fatalf("%v: qemu-img exits %d saying %q; diskserve exits %d saying %q", args, qcode, qout, code, out)
	}
	return out, code
}

// mapOf returns qemu-img map's records of img without host offsets.
func mapOf(t *testing.T, img string) []map[string]any {
	t.Helper()
	var recs []map[string]any
	if err := json.Unmarshal(testtool.Run(t, "qemu-img", "map", "--output=json", img), &recs); err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		delete(r, "offset")
	}
	return recs
}

// mergedMap is mapOf with neighbouring records of the same state merged:
// how host clusters were ordered does not matter.
func mergedMap(t *testing.T, img string) []map[string]any {
	return merge(mapOf(t, img))
}

// merge merges neighbouring map records of the same state.
func merge(recs []map[string]any) []map[string]any {
	var out []map[string]any
	for _, r := range recs {
		if k := len(out); k > 0 {
			p := out[k-1]
			if p["depth"] == r["depth"] && p["zero"] == r["zero"] && p["data"] == r["data"] && p["present"] == r["present"] &&
				p["start"].(float64)+p["length"].(float64) == r["start"].(float64) {
				p["length"] = p["length"].(float64) + r["length"].(float64)
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// backingOf returns qemu-img info's backing file lines of img, with the
// copies' prefix taken out.
func backingOf(t *testing.T, img, prefix string) string {
	var keep []string
	for _, l := range strings.Split(string(testtool.Run(t, "qemu-img", "info", img)), "\n") {
		if strings.HasPrefix(l, "backing file") {
			keep = append(keep, strings.ReplaceAll(l, prefix, ""))
		}
	}
	return strings.Join(keep, "\n")
}

// infoLines returns qemu-img info of img without the lines that name the
// file or its space on disk.
func infoLines(t *testing.T, img string) string {
	var keep []string
	for _, l := range strings.Split(string(testtool.Run(t, "qemu-img", "info", img)), "\n") {
		if !strings.HasPrefix(l, "image:") && !strings.HasPrefix(l, "disk size:") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// virtualSize returns the "virtual size" line of qemu-img info.
func virtualSize(t *testing.T, img string) string {
	for _, l := range strings.Split(string(testtool.Run(t, "qemu-img", "info", img)), "\n") {
		if strings.HasPrefix(l, "virtual size") {
			return l
		}
	}
	t.Fatalf("qemu-img info %s: no virtual size", img)
	return ""
}

func fileSize(t *testing.T, path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}
