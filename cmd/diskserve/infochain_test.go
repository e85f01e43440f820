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

// TestMapLikeQemuImg: map prints what qemu-img map prints, byte for byte,
// in JSON and in the human table: records with host offsets, merged
// where their bytes follow each other in one file, for images alone and
// in chains. The chain has zero clusters that keep their space, extended
// L2 subclusters, and neighbouring clusters stored out of order.
func TestMapLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	io := func(img, f string, cmds ...string) {
		args := []string{"-f", f}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		testtool.Run(t, "qemu-io", append(args, filepath.Join(dir, img))...)
	}
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", filepath.Join(dir, "base.raw"), "8M")
	io("base.raw", "raw", "write -P 1 0 1M", "write -P 2 5M 64k")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", filepath.Join(dir, "mid.qcow2"))
	io("mid.qcow2", "qcow2", "write -P 3 512k 1M", "write -z 5M 64k", "write -z 7M 128k", "write -z 1M 64k")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2", "-F", "qcow2", filepath.Join(dir, "top.qcow2"), "12M")
	io("top.qcow2", "qcow2", "write -P 4 2M 4k", "write -z 512k 8k", "write -P 5 9M 100k", "write -P 6 3M 64k", "write -P 7 3008k 64k")
	testtool.Run(t, "qemu-img", "convert", "-c", "-O", "qcow2", filepath.Join(dir, "top.qcow2"), filepath.Join(dir, "compressed.qcow2"))
	for _, img := range []string{"base.raw", "mid.qcow2", "top.qcow2", "compressed.qcow2"} {
		likeQemuImg(t, dir, "map", "--output=json", img)
		if img != "compressed.qcow2" { // qemu-img stops at compressed clusters
			likeQemuImg(t, dir, "map", img)
		}
	}
	if out, _ := likeQemuImg(t, dir, "map", "--output=json", "top.qcow2"); !strings.Contains(out, `"start": 3080192, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset"`) {
		t.Fatalf("the clusters stored out of order were merged:\n%s", out)
	}
	human, _, code := run(t, nil, "map", filepath.Join(dir, "compressed.qcow2"))
	if code != 0 || !strings.Contains(human, "\n0x900000        0x20000         -\n") {
		t.Fatalf("map of compressed clusters (exit %d):\n%s", code, human)
	}
}
