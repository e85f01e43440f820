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
