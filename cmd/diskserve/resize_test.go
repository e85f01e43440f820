package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestResizeLikeQemuImg resizes copies of the same images with qemu-img
// resize and diskserve resize: the same output and exit status; where
// both succeed, the images compare equal (their internal snapshots too),
// qemu-img check finds nothing wrong with diskserve's, and qemu-img info
// agrees on the virtual size.
func TestResizeLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	in := func(name string) string { return filepath.Join(dir, name) }
	qemuIO := func(img string, cmds ...string) {
		args := []string{"-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		testtool.Run(t, "qemu-io", append(args, in(img))...)
	}
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", in("r.raw"), "10M")
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 1 1M 1M", "-c", "write -P 2 9M 1M", in("r.raw"))
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", in("q.qcow2"), "100M")
	qemuIO("q.qcow2", "write -P 1 0 10M", "write -P 2 50M 20M", "write -z 80M 1M", "write -P 3 99M 1M")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", in("small.qcow2"), "1M")
	qemuIO("small.qcow2", "write -P 4 512k 4k")
	testtool.Run(t, "qemu-img", "convert", "-c", "-O", "qcow2", in("q.qcow2"), in("c.qcow2"))
	testtool.Run(t, "qemu-img", "convert", "-O", "qcow2", "-o", "extended_l2=on", in("q.qcow2"), in("x.qcow2"))
	qemuIO("x.qcow2", "write -P 5 60M 4k")
	testtool.Run(t, "qemu-img", "convert", "-O", "qcow2", in("q.qcow2"), in("snap.qcow2"))
	testtool.Run(t, "qemu-img", "snapshot", "-c", "before", in("snap.qcow2"))
	qemuIO("snap.qcow2", "write -P 6 51M 64k", "write -P 7 90M 64k")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "q.qcow2", "-F", "qcow2", in("overlay.qcow2"))
	qemuIO("overlay.qcow2", "write -P 8 60M 1M")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vdi", in("v.vdi"), "10M")
	// 4 KiB clusters: a refcount block counts 8 MiB of file, so that
	// shrinking empties blocks.
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", in("k4.qcow2"), "64M")
	qemuIO("k4.qcow2", "write -P 9 0 1M", "write -P 10 40M 24M")

	for _, c := range []struct {
		img  string
		args []string
		code int
	}{
		{"r.raw", []string{"20M"}, 0},
		{"r.raw", []string{"+3M"}, 0},
		{"r.raw", []string{"5M"}, 1},
		{"r.raw", []string{"--shrink", "5M"}, 0},
		{"r.raw", []string{"--shrink", "-2M"}, 0},
		{"r.raw", []string{"0"}, 1},
		{"r.raw", []string{"-q", "12M"}, 0},
		{"q.qcow2", []string{"300M"}, 0},
		{"small.qcow2", []string{"10M"}, 0},
		{"q.qcow2", []string{"--preallocation=metadata", "150M"}, 0},
		{"q.qcow2", []string{"--preallocation=full", "120M"}, 0},
		{"r.raw", []string{"--preallocation=metadata", "20M"}, 1},
		{"q.qcow2", []string{"55M"}, 1},
		{"q.qcow2", []string{"--shrink", "55M"}, 0},
		{"q.qcow2", []string{"--shrink", "50M"}, 0},
		{"q.qcow2", []string{"--shrink", "1M"}, 0},
		{"c.qcow2", []string{"--shrink", "55M"}, 0},
		{"x.qcow2", []string{"--shrink", "55M"}, 0},
		{"snap.qcow2", []string{"--shrink", "52M"}, 0},
		{"overlay.qcow2", []string{"--shrink", "60M"}, 0},
		{"k4.qcow2", []string{"--shrink", "2M"}, 0},
		{"v.vdi", []string{"20M"}, 1},
		{"missing.qcow2", []string{"20M"}, 1},
	} {
		name := c.img + " " + strings.Join(c.args, " ")
		q, d := in("q-"+c.img), in("d-"+c.img)
		for _, dst := range []string{q, d} {
			if b, err := os.ReadFile(in(c.img)); err == nil {
				if err := os.WriteFile(dst, b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
		var outs [2]string
		var codes [2]int
		for k, bin := range []string{"qemu-img", diskserveBin} {
			img := []string{q, d}[k]
			args := append([]string{"resize", img}, c.args...)
			if strings.HasPrefix(c.args[len(c.args)-1], "-") && bin == "qemu-img" {
				args = append(append([]string{"resize"}, c.args[:len(c.args)-1]...), img, "--", c.args[len(c.args)-1])
			}
			outs[k], codes[k] = runTool(t, "", bin, args...)
		}
		if outs[0] != outs[1] || codes[0] != codes[1] || codes[1] != c.code {
			t.Fatalf("%s: qemu-img exits %d saying %q; diskserve exits %d saying %q; want %d", name, codes[0], outs[0], codes[1], outs[1], c.code)
		}
		if codes[1] != 0 {
			continue
		}
		testtool.Run(t, "qemu-img", "compare", q, d)
		if strings.HasSuffix(c.img, ".qcow2") {
			testtool.QemuCheck(t, d)
			// qemu-img sizes a fully preallocated file by an estimate that
			// may leave a cluster to spare: no larger, there.
			if a, b := fileSize(t, q), fileSize(t, d); a != b && !(strings.HasPrefix(c.args[0], "--preallocation=full") && b < a) {
				t.Fatalf("%s: qemu-img leaves a file of %d bytes, diskserve %d", name, a, b)
			}
		}
		if a, b := virtualSize(t, q), virtualSize(t, d); a != b {
			t.Fatalf("%s: qemu-img info gives qemu's %s and diskserve's %s", name, a, b)
		}
		if c.img == "snap.qcow2" {
			for _, img := range []string{q, d} {
				testtool.Run(t, "qemu-img", "convert", "-l", "before", "-O", "raw", img, img+".before")
			}
			testtool.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", q+".before", d+".before")
		}
	}
}
