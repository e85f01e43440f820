package main

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestCheck runs check on a clean image, one with a leak, one with a
// refcount too low and a raw image, with qemu-img check's exit codes, then
// repairs.
func TestCheck(t *testing.T) {
	dir := t.TempDir()
	clean := filepath.Join(dir, "clean.qcow2")
	mustRun(t, "create", "-f", "qcow2", clean, "16M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", clean) // data in cluster 5
	// Clusters 0-3 are the header, refcount table and block and L1 table;
	// 4 is the L2 table and 5 the data. Cluster 6, added here, is free.
	broken := func(name string, cluster int64, refcount uint16) string {
		b, err := os.ReadFile(clean)
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, make([]byte, 7*65536-len(b))...)
		rb := int64(binary.BigEndian.Uint64(b[int64(binary.BigEndian.Uint64(b[48:])):]))
		binary.BigEndian.PutUint16(b[rb+2*cluster:], refcount)
		path := filepath.Join(dir, name)
		os.WriteFile(path, b, 0o644)
		return path
	}
	leak, low := broken("leak.qcow2", 6, 1), broken("low.qcow2", 5, 0)
	raw := filepath.Join(dir, "disk.raw")
	mustRun(t, "create", "-f", "raw", raw, "1M")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"check", clean}, 0, "No errors were found on the image."},
		{[]string{"check", leak}, 3, "1 leaked clusters were found"},
		{[]string{"check", low}, 2, "ERROR cluster 5 refcount=0 reference=1"},
		{[]string{"check", raw}, 63, "raw images have no metadata to check"},
		{[]string{"check", "-r", "sometimes", clean}, 1, "-r must be leaks or all"},
		{[]string{"check", "-r", "leaks", leak}, 0, "1 leaked clusters"},
		{[]string{"check", "-r", "all", low}, 0, "No errors were found on the image."},
		{[]string{"check", leak}, 0, "No errors were found"},
		{[]string{"check", low}, 0, "No errors were found"},
	} {
		out, errOut, code := run(t, nil, tc.args...)
		if code != tc.code || !strings.Contains(out+errOut, tc.want) {
			t.Errorf("diskserve %s: exit %d, want %d; output %q, want %q", strings.Join(tc.args, " "), code, tc.code, out+errOut, tc.want)
		}
	}
	testtool.Run(t, "qemu-img", "check", leak)
	testtool.Run(t, "qemu-img", "check", low)
	var res struct {
		Format            string
		Corruptions       int64
		AllocatedClusters int64 `json:"allocated-clusters"`
		TotalClusters     int64 `json:"total-clusters"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, "check", "--output=json", clean)), &res); err != nil || res.Format != "qcow2" || res.AllocatedClusters != 1 || res.TotalClusters != 256 {
		t.Errorf("check --output=json: %+v, %v", res, err)
	}
}

// TestCheckMatchesQemuImg: qemu-img check and diskserve check print the
// same bytes, JSON and human, on clean images of every format both check:
// qcow2 with compressed, fragmented and zero clusters that keep their
// space (and the cluster statistics qemu-img prints of qcow2 alone), a
// version 2 qcow2, an empty one, and VDI, VMDK and VHDX images.
func TestCheckMatchesQemuImg(t *testing.T) {
	dir := t.TempDir()
	img := func(name, fmtName string, opts []string, writes ...string) string {
		path := filepath.Join(dir, name)
		testtool.Run(t, "qemu-img", append(append([]string{"create", "-q", "-f", fmtName}, opts...), path, "10M")...)
		if len(writes) > 0 {
			args := []string{"-f", fmtName}
			for _, w := range writes {
				args = append(args, "-c", w)
			}
			testtool.Run(t, "qemu-io", append(args, path)...)
		}
		return path
	}
	for _, path := range []string{
		img("frag.qcow2", "qcow2", nil, "write -c 0 64k", "write 1M 64k", "write 128k 128k", "write -z 128k 64k"),
		img("v2.qcow2", "qcow2", []string{"-o", "compat=0.10"}, "write 0 1M"),
		img("empty.qcow2", "qcow2", nil),
		img("disk.vdi", "vdi", nil, "write 0 1M", "write 5M 64k"),
		img("disk.vmdk", "vmdk", nil, "write 0 1M", "write 5M 64k"),
		img("disk.vhdx", "vhdx", nil, "write 0 1M", "write 5M 64k"),
	} {
		for _, output := range []string{"json", "human"} {
			q := string(testtool.Run(t, "qemu-img", "check", "--output="+output, path))
			if d := mustRun(t, "check", "--output="+output, path); d != q {
				t.Errorf("check --output=%s %s: diskserve prints\n%s\nqemu-img prints\n%s", output, filepath.Base(path), d, q)
			}
		}
	}
}
