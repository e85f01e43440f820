package main

import (
	"path/filepath"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestMeasureLikeQemuImg measures sizes and images for raw and qcow2
// targets with qemu-img measure and diskserve measure: the same output,
// human and JSON, and the same exit status, errors included.
func TestMeasureLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	in := func(n string) string { return filepath.Join(dir, n) }
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", in("sparse.raw"), "100M")
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", "-c", "write -P 2 33M 5000", "-c", "write -P 3 99M 1M", in("sparse.raw"))
	testtool.Run(t, "qemu-img", "convert", "-O", "qcow2", in("sparse.raw"), in("plain.qcow2"))
	testtool.Run(t, "qemu-img", "bitmap", "--add", in("plain.qcow2"), "b0")
	testtool.Run(t, "qemu-img", "bitmap", "--add", "-g", "4096", in("plain.qcow2"), "a-longer-bitmap-name")
	testtool.Run(t, "qemu-img", "snapshot", "-c", "snap", in("plain.qcow2"))
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 4 50M 3M", in("plain.qcow2"))
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "plain.qcow2", "-F", "qcow2", in("overlay.qcow2"))
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 5 70M 64k", "-c", "write -z 0 512k", in("overlay.qcow2"))
	testtool.Run(t, "qemu-img", "convert", "-c", "-O", "qcow2", in("plain.qcow2"), in("compressed.qcow2"))

	for _, args := range [][]string{
		{"--size", "1G"},
		{"--size", "1000001"},
		{"-O", "qcow2", "--size", "0"},
		{"-O", "qcow2", "--size", "10G"},
		{"-O", "qcow2", "--size", "3T", "--output=json"},
		{"-O", "qcow2", "--size", "1G", "-o", "cluster_size=4k,refcount_bits=64"},
		{"-O", "qcow2", "--size", "1G", "-o", "cluster_size=2M,refcount_bits=1"},
		{"-O", "qcow2", "--size", "1G", "-o", "extended_l2=on"},
		{"-O", "qcow2", "--size", "1G", "-o", "preallocation=full"},
		{"-O", "qcow2", "--size", "1G", "-o", "preallocation=metadata"},
		{"sparse.raw"},
		{"-O", "qcow2", "sparse.raw"},
		{"-O", "qcow2", "-o", "cluster_size=512", "sparse.raw"},
		{"-O", "qcow2", "plain.qcow2"},
		{"-O", "qcow2", "--output=json", "plain.qcow2"},
		{"-O", "qcow2", "-o", "compat=0.10", "plain.qcow2"},
		{"-O", "qcow2", "-l", "snap", "plain.qcow2"},
		{"-O", "qcow2", "overlay.qcow2"},
		{"-O", "qcow2", "-o", "backing_file=plain.qcow2", "overlay.qcow2"},
		{"-O", "qcow2", "compressed.qcow2"},
		{"-O", "raw", "overlay.qcow2"},
		{"-O", "vmdk", "--size", "1G"},
		{"-O", "qcow2", "-o", "bogus=1", "--size", "1M"},
		{"-O", "qcow2", "--size", "1G", "sparse.raw"},
		{"-O", "qcow2"},
		{"-O", "qcow2", "missing.qcow2"},
	} {
		likeQemuImg(t, dir, append([]string{"measure"}, args...)...)
	}
}
