package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestConvertOptionsLikeQemuImg converts the same source with qemu-img
// convert and diskserve convert under the options pipelines use: -n into
// an existing image (dirty or known zero), -S, -t, -T, -m, -W and -C. Both
// outputs read as the source and show the same allocation (qemu-img map,
// host offsets left out; with -n, the source's large zero range is zero);
// the error cases exit alike.
func TestConvertOptionsLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	in := func(n string) string { return filepath.Join(dir, n) }
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", in("src.qcow2"), "8M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -z 100k 8k", "-c", "write -z 300k 100k",
		"-c", "write -P 2 4M 4k", "-c", "write -P 3 6M 1000k", in("src.qcow2"))
	srcBytes := testtool.QemuRaw(t, in("src.qcow2"), "-f", "qcow2")

	for _, c := range []struct {
		name   string
		args   []string // before SRC DST
		target func(dst string)
		code   int
	}{
		{"into a dirty raw file", []string{"-n", "-O", "raw"}, func(dst string) {
			testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", dst, "8M")
			testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 9 0 8M", dst)
		}, 0},
		{"into a zero raw file", []string{"-n", "--target-is-zero", "-O", "raw"}, func(dst string) {
			testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", dst, "8M")
		}, 0},
		{"into a larger qcow2", []string{"-n", "-O", "qcow2"}, func(dst string) {
			testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", dst, "16M")
			testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 9 0 16M", dst)
		}, 0},
		{"into a smaller file", []string{"-n", "-O", "raw"}, func(dst string) {
			testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", dst, "4M")
		}, 1},
		{"fully allocated raw", []string{"-S", "0", "-O", "raw"}, nil, 0},
		{"fully allocated qcow2", []string{"-S", "0", "-O", "qcow2"}, nil, 0},
		{"64k holes", []string{"-S", "64k", "-O", "raw"}, nil, 0},
		{"512-byte holes", []string{"-S", "512", "-O", "raw"}, nil, 0},
		{"cache modes and parallelism", []string{"-t", "unsafe", "-T", "none", "-m", "8", "-W", "-O", "qcow2"}, nil, 0},
		{"copy offloading", []string{"-C", "-O", "raw"}, nil, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			var dsts [2]string
			var codes [2]int
			for k, bin := range []string{"qemu-img", diskserveBin} {
				dst := in(strings.ReplaceAll(c.name, " ", "-") + []string{".q", ".d"}[k])
				dsts[k] = dst
				if c.target != nil {
					c.target(dst)
				}
				args := append([]string{"convert"}, c.args...)
				if bin == "qemu-img" {
					args = append(args, "-f", "qcow2")
				}
				_, codes[k] = runTool(t, "", bin, append(args, in("src.qcow2"), dst)...)
			}
			if codes[0] != codes[1] || codes[1] != c.code {
				t.Fatalf("qemu-img exits %d, diskserve %d; want %d", codes[0], codes[1], c.code)
			}
			if c.code != 0 {
				return
			}
			outFmt := c.args[len(c.args)-1]
			got := testtool.QemuRaw(t, dsts[1], "-f", outFmt)
			if !bytes.Equal(got[:len(srcBytes)], srcBytes) {
				t.Fatal("diskserve's output does not read as the source")
			}
			if c.args[0] != "-n" && c.args[0] != "-C" {
				if a, b := mergedMap(t, dsts[0]), mergedMap(t, dsts[1]); !reflect.DeepEqual(a, b) {
					t.Fatalf("qemu-img map of qemu-img's output %v, of diskserve's %v", a, b)
				}
			} else if !zeroAt(t, dsts[1], 1<<20, 3<<20) {
				// Into an existing image, small runs of zeroes may end up
				// allocated either way (the kernel writes back a large
				// dirty folio whole over a hole punched in it; qcow2
				// zeroes may be unallocated or zero clusters), and qemu-img
				// -C copies whole clusters, holes in their host file and
				// all, where diskserve follows the source's extents: the
				// large zero range must be zero.
				t.Fatalf("the source's zero range [1M, 4M) is not zero in diskserve's output: %v", mergedMap(t, dsts[1]))
			}
			if outFmt == "qcow2" {
				testtool.QemuCheck(t, dsts[1])
			}
		})
	}
}

// TestConvertOverlayOfBacking: convert -B writes an overlay of the backing
// file that reads as the source and holds only the sectors where the
// source differs from the backing file (qemu-img, which assumes the
// source's own backing chain is the backing file, allocates more).
func TestConvertOverlayOfBacking(t *testing.T) {
	dir := t.TempDir()
	in := func(n string) string { return filepath.Join(dir, n) }
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", in("golden.qcow2"), "8M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 6M", in("golden.qcow2"))
	// The source: a standalone copy of golden, changed in two places.
	testtool.Run(t, "qemu-img", "convert", "-O", "qcow2", in("golden.qcow2"), in("src.qcow2"))
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 64k", "-c", "write -z 3M 64k", "-c", "write -P 3 7M 64k", in("src.qcow2"))
	mustRun(t, "convert", "-B", "golden.qcow2", "-F", "qcow2", "-O", "qcow2", in("src.qcow2"), in("overlay.qcow2"))
	testtool.Run(t, "qemu-img", "compare", in("overlay.qcow2"), in("src.qcow2"))
	testtool.QemuCheck(t, in("overlay.qcow2"))
	if b := backingFile(t, in("overlay.qcow2")); b != "golden.qcow2" {
		t.Fatalf("the overlay's backing file is %q", b)
	}
	var own int64
	for _, r := range mapOf(t, in("overlay.qcow2")) {
		if r["depth"].(float64) == 0 && r["present"].(bool) {
			own += int64(r["length"].(float64))
		}
	}
	if own != 3*64<<10 {
		t.Fatalf("the overlay holds %d bytes itself; the source differs from its backing file in 3 clusters", own)
	}
	// A block device as the target is written in place, as with -n.
	if os.Geteuid() != 0 {
		return
	}
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", in("disk.img"), "8M")
	out, err := exec.Command("losetup", "--find", "--show", in("disk.img")).Output()
	if err != nil {
		t.Skipf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	defer exec.Command("losetup", "-d", dev).Run()
	mustRun(t, "convert", "-O", "raw", in("src.qcow2"), dev)
	testtool.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", dev, in("src.qcow2"))
	if st, err := os.Stat(dev); err != nil || st.Mode()&os.ModeDevice == 0 {
		t.Fatalf("%s is no longer a device: %v", dev, err)
	}
}

// zeroAt reports whether qemu-img map shows [off, off+n) of img as
// zeroes.
func zeroAt(t *testing.T, img string, off, n int64) bool {
	for _, r := range mapOf(t, img) {
		start, length := int64(r["start"].(float64)), int64(r["length"].(float64))
		if start < off+n && start+length > off && r["zero"] != true {
			return false
		}
	}
	return true
}

// TestCreatePreallocationLikeQemuImg creates qcow2 and raw images with
// every preallocation mode, with qemu-img create and diskserve create:
// the qcow2 images show the same allocation (qemu-img map, host offsets
// left out), have the same file size and pass qemu-img check; the raw
// files have their space allocated as qemu's (qemu-img also writes the
// first 4 KiB of a raw file, which diskserve leaves a hole).
func TestCreatePreallocationLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"qcow2", "raw"} {
		for _, mode := range []string{"off", "metadata", "falloc", "full"} {
			if f == "raw" && mode == "metadata" {
				continue
			}
			// 4 KiB clusters put an L2 table after every 2 MiB of data.
			opts := "preallocation=" + mode
			if f == "qcow2" {
				opts += ",cluster_size=4k"
			}
			q, d := filepath.Join(dir, mode+".q."+f), filepath.Join(dir, mode+".d."+f)
			testtool.Run(t, "qemu-img", "create", "-q", "-f", f, "-o", opts, q, "20M")
			mustRun(t, "create", "-f", f, "-o", opts, d, "20M")
			if f == "raw" {
				allocated := func(p string) bool {
					st, err := os.Stat(p)
					if err != nil {
						t.Fatal(err)
					}
					return st.Sys().(*syscall.Stat_t).Blocks*512 >= 20<<20
				}
				if allocated(q) != allocated(d) {
					t.Fatalf("raw preallocation=%s: qemu-img's file allocated %v, diskserve's %v", mode, allocated(q), allocated(d))
				}
				continue
			}
			if a, b := mergedMap(t, q), mergedMap(t, d); !reflect.DeepEqual(a, b) {
				t.Fatalf("qcow2 preallocation=%s: qemu-img map of qemu-img's %v, of diskserve's %v", mode, a, b)
			}
			if mode != "off" && fileSize(t, q) != fileSize(t, d) {
				t.Fatalf("qcow2 preallocation=%s: qemu-img's file has %d bytes, diskserve's %d", mode, fileSize(t, q), fileSize(t, d))
			}
			testtool.QemuCheck(t, d)
		}
	}
}

// TestConvertOffloadRaw: -C between raw files (copy_file_range) copies
// the data exactly and leaves the source's holes holes.
func TestConvertOffloadRaw(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.raw"), filepath.Join(dir, "dst.raw")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", src, "64M")
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 5 0 10M", "-c", "write -P 6 40M 3M", "-c", "write -P 7 63M 5000", src)
	mustRun(t, "convert", "-C", "-f", "raw", "-O", "raw", src, dst)
	testtool.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, dst)
	if !zeroAt(t, dst, 20<<20, 16<<20) {
		t.Fatalf("a hole of the source was filled: %v", mergedMap(t, dst))
	}
}
