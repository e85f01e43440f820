package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestCompareLikeQemuImg compares pairs of images with qemu-img compare
// and diskserve compare: the same message and the same exit status in
// each case, errors included.
func TestCompareLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	qemu := func(args ...string) { testtool.Run(t, "qemu-img", args...) }
	io := func(img string, cmds ...string) {
		args := []string{"-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		testtool.Run(t, "qemu-io", append(args, filepath.Join(dir, img))...)
	}
	in := func(name string) string { return filepath.Join(dir, name) }
	qemu("create", "-q", "-f", "qcow2", in("a.qcow2"), "64M")
	io("a.qcow2", "write -P 1 1M 64k", "write -P 2 10M 4k", "write -z 20M 1M", "write -P 3 63M 1M")
	qemu("convert", "-O", "raw", in("a.qcow2"), in("a.raw"))
	// b: one byte changed in the middle of a sector of data.
	qemu("convert", "-O", "qcow2", in("a.qcow2"), in("b.qcow2"))
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 9 10485861 1", in("b.qcow2"))
	// c: data where a has a hole.
	qemu("convert", "-O", "qcow2", in("a.qcow2"), in("c.qcow2"))
	io("c.qcow2", "write -P 7 40M 4k")
	// long: a with 16 MiB more, zeroes; longdata: with data in the tail.
	qemu("convert", "-O", "qcow2", in("a.qcow2"), in("long.qcow2"))
	qemu("resize", "-q", in("long.qcow2"), "80M")
	qemu("convert", "-O", "qcow2", in("long.qcow2"), in("longdata.qcow2"))
	io("longdata.qcow2", "write -P 5 70M 512")
	// overlay: a's content split between a backing file and an overlay.
	qemu("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", in("overlay.qcow2"))
	io("overlay.qcow2", "write -P 1 1M 4k")
	if err := os.WriteFile(in("text"), []byte("not an image"), 0o644); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		args []string
		code int
	}{
		{[]string{"a.qcow2", "a.raw"}, 0},
		{[]string{"a.raw", "a.qcow2"}, 0},
		{[]string{"a.qcow2", "b.qcow2"}, 1},
		{[]string{"a.qcow2", "c.qcow2"}, 1},
		{[]string{"c.qcow2", "a.raw"}, 1},
		{[]string{"a.qcow2", "long.qcow2"}, 0},
		{[]string{"longdata.qcow2", "a.qcow2"}, 1},
		{[]string{"-s", "a.qcow2", "long.qcow2"}, 1},
		{[]string{"-s", "a.qcow2", "b.qcow2"}, 1},
		{[]string{"-s", "b.qcow2", "b.qcow2"}, 0},
		{[]string{"overlay.qcow2", "a.raw"}, 0},
		{[]string{"-q", "a.qcow2", "b.qcow2"}, 1},
		{[]string{"-f", "raw", "-F", "qcow2", "a.raw", "a.qcow2"}, 0},
		{[]string{"a.qcow2", "missing.qcow2"}, 2},
		{[]string{"-f", "qcow2", "a.raw", "a.qcow2"}, 2},
		{[]string{"-F", "qcow2", "a.qcow2", "text"}, 2},
	} {
		if _, code := likeQemuImg(t, dir, append([]string{"compare"}, c.args...)...); code != c.code {
			t.Fatalf("compare %v: exit %d, want %d", c.args, code, c.code)
		}
	}
}
