package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

func TestCreate(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	mustRun(t, "create", "-f", "raw", base, "64M")
	for _, tc := range []struct {
		name string
		args []string
		want map[string]any // qemu-img info --output=json keys
	}{
		{"defaults", []string{"a.qcow2", "1G"}, map[string]any{"virtual-size": float64(1 << 30), "cluster-size": float64(65536)}},
		{"small clusters", []string{"-o", "cluster_size=512,refcount_bits=1", "b.qcow2", "100M"}, map[string]any{"cluster-size": float64(512)}},
		{"version 2", []string{"-o", "compat=0.10", "c.qcow2", "10M"}, map[string]any{"virtual-size": float64(10 << 20)}},
		{"features", []string{"-o", "compression_type=zstd", "-o", "lazy_refcounts=on,extended_l2=on", "d.qcow2", "1.5G"}, map[string]any{"virtual-size": float64(3 << 29)}},
		{"backing, size from it", []string{"-b", "base.raw", "e.qcow2"}, map[string]any{"virtual-size": float64(64 << 20), "backing-filename": "base.raw", "backing-filename-format": "raw"}},
		{"backing qcow2 with -F", []string{"-b", "a.qcow2", "-F", "qcow2", "f.qcow2", "2G"}, map[string]any{"virtual-size": float64(2 << 30), "backing-filename-format": "qcow2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"create", "-f", "qcow2"}, tc.args...)
			for i := len(args) - 2; i < len(args); i++ {
				if strings.HasSuffix(args[i], ".qcow2") {
					args[i] = filepath.Join(dir, args[i])
				}
			}
			mustRun(t, args...)
			img := args[len(args)-1]
			if !strings.HasSuffix(img, ".qcow2") {
				img = args[len(args)-2]
			}
			testtool.Run(t, "qemu-img", "check", img)
			var info map[string]any
			json.Unmarshal(testtool.Run(t, "qemu-img", "info", "--output=json", img), &info)
			for k, v := range tc.want {
				if info[k] != v {
					t.Errorf("qemu-img info: %s = %v, want %v", k, info[k], v)
				}
			}
			out := string(testtool.Run(t, "qemu-io", "-c", "write -P 0x5c 0 100k", "-c", "read -P 0x5c 0 100k", img))
			if strings.Contains(out, "failed") {
				t.Errorf("qemu-io on the new image:\n%s", out)
			}
		})
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"create", "-f", "qcow2", filepath.Join(dir, "x.qcow2")}, "a size is needed"},
		{[]string{"create", "-f", "qcow2", "-o", "cluster_size=1000", filepath.Join(dir, "x.qcow2"), "1G"}, "not a power of two"},
		{[]string{"create", "-f", "qcow2", "-o", "frob=1", filepath.Join(dir, "x.qcow2"), "1G"}, `unknown qcow2 option "frob"`},
		{[]string{"create", "-f", "qcow2", "-o", "cluster_size=512", filepath.Join(dir, "x.qcow2"), "1T"}, "L1 table larger"},
		{[]string{"create", "-f", "qcow2", "-b", "missing.raw", filepath.Join(dir, "x.qcow2")}, "missing.raw: no such file"},
		{[]string{"create", "-f", "qed", filepath.Join(dir, "x"), "1G"}, `unknown disk format "qed"`},
		{[]string{"create", "-f", "raw", filepath.Join(dir, "x"), "12Q"}, "is not a size"},
	} {
		if _, errOut, code := run(t, nil, tc.args...); code != 1 || !strings.Contains(errOut, tc.want) || strings.Count(errOut, "\n") != 1 {
			t.Errorf("diskserve %s: exit %d, %q; want one line containing %q", strings.Join(tc.args, " "), code, errOut, tc.want)
		}
	}
}
