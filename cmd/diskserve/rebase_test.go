package main

import (
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestRebaseLikeQemuImg rebases the same overlays, built twice, with qemu-img
// rebase and diskserve rebase: the same output and exit status; where both
// succeed, the overlays read as they did before a safe rebase, compare
// equal with each other, show the same allocation (qemu-img map), record
// the same backing file and pass qemu-img check.
func TestRebaseLikeQemuImg(t *testing.T) {
	for _, c := range []struct {
		name   string
		args   []string
		safe   bool // the content must not change
		zeroes bool // zeroes are copied: diskserve stores less data than qemu-img
		code   int
	}{
		{"onto another image", []string{"-b", "other.qcow2", "-F", "qcow2"}, true, true, 0},
		{"onto the base below", []string{"-b", "base.qcow2", "-F", "qcow2"}, true, true, 0},
		{"onto a smaller raw file", []string{"-b", "small.raw", "-F", "raw"}, true, true, 0},
		{"onto nothing", []string{"-b", ""}, true, false, 0},
		{"quietly", []string{"-q", "-b", "other.qcow2", "-F", "qcow2"}, true, true, 0},
		{"unsafe", []string{"-u", "-b", "other.qcow2", "-F", "qcow2"}, false, false, 0},
		{"unsafe onto a missing file", []string{"-u", "-b", "missing.qcow2", "-F", "qcow2"}, false, false, 0},
		{"without a format", []string{"-b", "other.qcow2"}, false, false, 1},
		{"onto a missing file", []string{"-b", "missing.qcow2", "-F", "qcow2"}, false, false, 1},
		{"a missing image", []string{"-b", "other.qcow2", "-F", "qcow2", "gone.qcow2"}, false, false, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			in := func(n string) string { return filepath.Join(dir, n) }
			qemuImg := func(args ...string) { testtool.Run(t, "qemu-img", args...) }
			io := func(img, f string, cmds ...string) {
				args := []string{"-f", f}
				for _, cm := range cmds {
					args = append(args, "-c", cm)
				}
				testtool.Run(t, "qemu-io", append(args, in(img))...)
			}
			// The images, twice: for qemu-img (names prefixed q-) and
			// for diskserve.
			for _, p := range []string{"q-", ""} {
				qemuImg("create", "-q", "-f", "qcow2", in(p+"base.qcow2"), "8M")
				io(p+"base.qcow2", "qcow2", "write -P 1 0 4M", "write -P 2 6M 1M")
				qemuImg("create", "-q", "-f", "qcow2", "-b", p+"base.qcow2", "-F", "qcow2", in(p+"mid.qcow2"))
				io(p+"mid.qcow2", "qcow2", "write -P 3 1M 1M", "write -z 6M 64k")
				qemuImg("create", "-q", "-f", "qcow2", "-b", p+"mid.qcow2", "-F", "qcow2", in(p+"top.qcow2"))
				io(p+"top.qcow2", "qcow2", "write -P 4 1536k 64k", "write -P 5 7M 4k")
				qemuImg("create", "-q", "-f", "qcow2", in(p+"other.qcow2"), "8M")
				io(p+"other.qcow2", "qcow2", "write -P 1 0 2M", "write -P 6 5M 2M")
				qemuImg("create", "-q", "-f", "raw", in(p+"small.raw"), "5M")
				io(p+"small.raw", "raw", "write -P 1 0 1M", "write -P 7 4M 1M")
			}
			before := testtool.QemuRaw(t, in("top.qcow2"), "-f", "qcow2")

			var outs [2]string
			var codes [2]int
			for k, bin := range []string{"qemu-img", diskserveBin} {
				args := append([]string{"rebase"}, c.args...)
				if args[len(args)-1] != "gone.qcow2" {
					args = append(args, "top.qcow2")
				}
				if k == 0 {
					for i, a := range args {
						if i > 0 && a != "" && (args[i-1] == "-b" || i == len(args)-1) {
							args[i] = "q-" + a
						}
					}
				}
				outs[k], codes[k] = runTool(t, dir, bin, args...)
			}
			if outs[0] != outs[1] || codes[0] != codes[1] || codes[1] != c.code {
				t.Fatalf("qemu-img exits %d saying %q; diskserve exits %d saying %q; want %d", codes[0], outs[0], codes[1], outs[1], c.code)
			}
			if a, b := backingOf(t, in("q-top.qcow2"), "q-"), backingOf(t, in("top.qcow2"), ""); a != b {
				t.Fatalf("qemu-img info of qemu's rebase:\n%s\nof diskserve's:\n%s", a, b)
			}
			if c.code != 0 || strings.Contains(c.name, "missing") {
				return // qemu-img check cannot open an image without its backing file
			}
			testtool.QemuCheck(t, in("top.qcow2"))
			testtool.Run(t, "qemu-img", "compare", in("q-top.qcow2"), in("top.qcow2"))
			if c.safe {
				if got := testtool.QemuRaw(t, in("top.qcow2"), "-f", "qcow2"); string(got) != string(before) {
					t.Fatal("the safe rebase changed what the image reads")
				}
			}
			// qemu-img 7.2 stores the zeroes it copies as data, where
			// diskserve records zero clusters: the same ranges held by
			// the overlay, no more of them data.
			if a, b := heldMap(t, in("q-top.qcow2")), heldMap(t, in("top.qcow2")); !reflect.DeepEqual(a, b) {
				t.Fatalf("qemu-img map of qemu's rebase %v, of diskserve's %v", mergedMap(t, in("q-top.qcow2")), mergedMap(t, in("top.qcow2")))
			}
			if a, b := topData(t, in("q-top.qcow2")), topData(t, in("top.qcow2")); b > a || c.zeroes && b == a {
				t.Fatalf("diskserve's rebase stored %d bytes of data in the overlay, qemu-img's %d", b, a)
			}
		})
	}
}

// heldMap is mergedMap with the overlay's own records (depth 0) merged
// whether they are data or zeroes.
func heldMap(t *testing.T, img string) []map[string]any {
	recs := mapOf(t, img)
	for _, r := range recs {
		if r["depth"] == 0.0 && r["present"] == true {
			r["zero"], r["data"] = "held", "held"
		}
	}
	return merge(recs)
}

// topData returns how many bytes of img's own records are data.
func topData(t *testing.T, img string) int64 {
	var n int64
	for _, r := range mapOf(t, img) {
		if r["depth"] == 0.0 && r["data"] == true {
			n += int64(r["length"].(float64))
		}
	}
	return n
}
