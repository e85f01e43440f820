package main

import (
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/testtool"
)

// TestCommitLikeQemuImg commits the same backing chains, built twice, with
// qemu-img commit and diskserve commit: the same output and exit status;
// where both succeed, every image of the two chains compares equal with
// its counterpart, qemu-img map shows the same allocation (depths, data
// and zeroes), and qemu-img check finds nothing wrong.
func TestCommitLikeQemuImg(t *testing.T) {
	for _, c := range []struct {
		name    string
		chain   []string // top first
		formats []string
		args    []string
		code    int
	}{
		{"into the backing file", []string{"top.qcow2", "mid.qcow2", "base.qcow2"}, []string{"qcow2", "qcow2", "qcow2"}, nil, 0},
		{"kept", []string{"top.qcow2", "mid.qcow2", "base.qcow2"}, []string{"qcow2", "qcow2", "qcow2"}, []string{"-d"}, 0},
		{"into the base", []string{"top.qcow2", "mid.qcow2", "base.qcow2"}, []string{"qcow2", "qcow2", "qcow2"}, []string{"-b", "base.qcow2"}, 0},
		{"into a raw file", []string{"top.qcow2", "base.raw"}, []string{"qcow2", "raw"}, nil, 0},
		{"into a smaller raw file", []string{"big.qcow2", "base.raw"}, []string{"qcow2", "raw"}, []string{"-q"}, 0},
		{"no backing file", []string{"base.qcow2"}, []string{"qcow2"}, nil, 1},
		{"a base not in the chain", []string{"top.qcow2", "mid.qcow2", "base.qcow2"}, []string{"qcow2", "qcow2", "qcow2"}, []string{"-b", "elsewhere.qcow2"}, 1},
		{"a missing image", []string{"missing.qcow2"}, []string{"qcow2"}, nil, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			in := func(n string) string { return filepath.Join(dir, n) }
			io := func(img, f string, cmds ...string) {
				args := []string{"-f", f}
				for _, cm := range cmds {
					args = append(args, "-c", cm)
				}
				testtool.Run(t, "qemu-io", append(args, in(img))...)
			}
			// The chain, built from the bottom, twice: for qemu-img
			// (names prefixed q-) and for diskserve.
			for _, prefix := range []string{"q-", ""} {
				if c.code != 0 && prefix != "" {
					continue
				}
				for i := len(c.chain) - 1; i >= 0; i-- {
					n, f := c.chain[i], c.formats[i]
					if n == "missing.qcow2" {
						continue
					}
					size := "8M"
					if n == "big.qcow2" {
						size = "12M"
					}
					args := []string{"create", "-q", "-f", f}
					if i+1 < len(c.chain) {
						args = append(args, "-b", prefix+c.chain[i+1], "-F", c.formats[i+1])
					}
					testtool.Run(t, "qemu-img", append(args, in(prefix+n), size)...)
					switch i {
					case len(c.chain) - 1:
						io(prefix+n, f, "write -P 1 0 4M", "write -P 11 6M 1M")
					case len(c.chain) - 2:
						io(prefix+n, f, "write -P 2 1M 1M", "write -z 3M 64k")
					default:
						io(prefix+n, f, "write -P 3 2M 512k", "write -z 6M 128k")
					}
					if size == "12M" {
						io(prefix+n, f, "write -P 12 10M 1M")
					}
				}
			}
			var outs [2]string
			var codes [2]int
			for k, bin := range []string{"qemu-img", diskserveBin} {
				args := append([]string{"commit"}, c.args...)
				top := c.chain[0]
				if k == 0 && c.code == 0 {
					top = "q-" + top
					for i, a := range args {
						if i > 0 && args[i-1] == "-b" {
							args[i] = "q-" + a
						}
					}
				}
				outs[k], codes[k] = runTool(t, dir, bin, append(args, top)...)
			}
			if outs[0] != outs[1] || codes[0] != codes[1] || codes[1] != c.code {
				t.Fatalf("qemu-img exits %d saying %q; diskserve exits %d saying %q; want %d", codes[0], outs[0], codes[1], outs[1], c.code)
			}
			if c.code != 0 {
				return
			}
			for i, n := range c.chain {
				testtool.Run(t, "qemu-img", "compare", "-f", c.formats[i], "-F", c.formats[i], in("q-"+n), in(n))
				if a, b := mapOf(t, in("q-"+n)), mapOf(t, in(n)); !reflect.DeepEqual(a, b) {
					t.Fatalf("%s: qemu-img map of qemu's commit %v, of diskserve's %v", n, a, b)
				}
				if strings.HasSuffix(n, ".qcow2") {
					testtool.QemuCheck(t, in(n))
				}
			}
		})
	}
}

// TestCommitKeepsWhatItCannotEmpty commits a VHD differencing disk: only
// with -d, since a VHD cannot be emptied; without it nothing is written.
func TestCommitKeepsWhatItCannotEmpty(t *testing.T) {
	dir := t.TempDir()
	parent, child := filepath.Join(dir, "parent.vhd"), filepath.Join(dir, "child.vhd")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vpc", parent, "8M")
	mustRun(t, "create", "-f", "vpc", "-b", "parent.vhd", child)
	before := testtool.QemuRaw(t, parent, "-f", "vpc")
	f, err := format.Open(child, diskserve.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("committed"), 5000); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, errOut, code := run(t, nil, "commit", child); code != 1 || !strings.Contains(errOut, "pass -d") {
		t.Fatalf("commit of a VHD without -d: exit %d: %s", code, errOut)
	}
	if got := testtool.QemuRaw(t, parent, "-f", "vpc"); !reflect.DeepEqual(got, before) {
		t.Fatal("a refused commit changed the parent")
	}
	mustRun(t, "commit", "-d", child)
	if got := testtool.QemuRaw(t, parent, "-f", "vpc"); string(got[5000:5009]) != "committed" {
		t.Fatalf("after commit -d the parent holds %q", got[5000:5009])
	}
}
