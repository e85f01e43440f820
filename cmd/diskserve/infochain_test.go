package main

import (
	"encoding/json"
	"os/exec"
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
		cmd := exec.Command(bin, "info", "--backing-chain", "--output=json", "top.qcow2")
		cmd.Dir = dir
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v", bin, err)
		}
		if err := json.Unmarshal(out, &chains[k]); err != nil {
			t.Fatalf("%s: %v\n%s", bin, err, out)
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
