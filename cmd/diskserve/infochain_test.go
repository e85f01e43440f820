package main

import (
	"encoding/json"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestInfoBackingChainLikeQemuImg: info --backing-chain lists the same
// images as qemu-img's, with the same format, size and backing file each.
func TestInfoBackingChainLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	in := func(n string) string { return filepath.Join(dir, n) }
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", in("base.raw"), "8M")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", in("mid.qcow2"))
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2", in("top.qcow2"), "16M")
	type entry struct {
		Filename        string `json:"filename"`
		Format          string `json:"format"`
		VirtualSize     int64  `json:"virtual-size"`
		ClusterSize     int64  `json:"cluster-size"`
		BackingFilename string `json:"backing-filename"`
		BackingFormat   string `json:"backing-filename-format"`
	}
	var chains [2][]entry
	for k, bin := range []string{"qemu-img", diskserveBin} {
		out, code := runTool(t, dir, bin, "info", "--backing-chain", "--output=json", "top.qcow2")
		if err := json.Unmarshal([]byte(out), &chains[k]); err != nil || code != 0 {
			t.Fatalf("%s: exit %d, %v\n%s", bin, code, err, out)
		}
	}
	if !reflect.DeepEqual(chains[0], chains[1]) || len(chains[1]) != 3 {
		t.Fatalf("qemu-img info --backing-chain:\n%+v\ndiskserve's:\n%+v", chains[0], chains[1])
	}
	human, _, code := run(t, nil, "info", "--backing-chain", in("top.qcow2"))
	if code != 0 || strings.Count(human, "image: ") != 3 || strings.Contains(human, "Backing image") {
		t.Fatalf("info --backing-chain (exit %d):\n%s", code, human)
	}
}

// TestMapLikeQemuImg: map --output=json gives the records of qemu-img map
// (depth, present, zero, data), host offsets left out and neighbours of
// the same state merged, for images alone and in chains.
func TestMapLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	in := func(n string) string { return filepath.Join(dir, n) }
	io := func(img, f string, cmds ...string) {
		args := []string{"-f", f}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		testtool.Run(t, "qemu-io", append(args, in(img))...)
	}
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", in("base.raw"), "8M")
	io("base.raw", "raw", "write -P 1 0 1M", "write -P 2 5M 64k")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", in("mid.qcow2"))
	io("mid.qcow2", "qcow2", "write -P 3 512k 1M", "write -z 5M 64k", "write -z 7M 128k")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2", "-F", "qcow2", in("top.qcow2"), "12M")
	io("top.qcow2", "qcow2", "write -P 4 2M 4k", "write -z 512k 8k", "write -P 5 9M 100k")
	testtool.Run(t, "qemu-img", "convert", "-c", "-O", "qcow2", in("top.qcow2"), in("compressed.qcow2"))
	for _, img := range []string{"base.raw", "mid.qcow2", "top.qcow2", "compressed.qcow2"} {
		var ours []map[string]any
		out, _, code := run(t, nil, "map", "--output=json", in(img))
		if err := json.Unmarshal([]byte(out), &ours); err != nil || code != 0 {
			t.Fatalf("%s: exit %d, %v\n%s", img, code, err, out)
		}
		if theirs := mergedMap(t, in(img)); !reflect.DeepEqual(theirs, ours) {
			t.Fatalf("%s: qemu-img map\n%v\ndiskserve map\n%v", img, theirs, ours)
		}
	}
}
