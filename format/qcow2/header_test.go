package qcow2

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
)

// goldenHeader returns the first cluster and size of an image made by
// qemu-img (testdata/gen.sh).
func goldenHeader(t *testing.T, name string) ([]byte, int64) {
	t.Helper()
	b, err := os.ReadFile("../../testdata/qcow2/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b[:min(len(b), 65536)], int64(len(b))
}

func TestParseHeaderGolden(t *testing.T) {
	b, size := goldenHeader(t, "pattern.qcow2")
	h, err := parseHeader(b, size)
	if err != nil {
		t.Fatal(err)
	}
	if h.Version != 3 || h.ClusterBits != 16 || h.Size != 1<<20 || h.HeaderLength != 112 || h.RefcountOrder != 4 || h.FeatureNames[[2]uint8{0, 0}] != "dirty bit" {
		t.Fatalf("header %+v", h)
	}
	b, size = goldenHeader(t, "tiny-v2-c512.qcow2")
	if h, err = parseHeader(b, size); err != nil || h.Version != 2 || h.ClusterBits != 9 || h.HeaderLength != 72 {
		t.Fatalf("v2 header %+v, %v", h, err)
	}
}

// TestParseHeaderHostile breaks one field of a valid header per case. Each
// must give an error that says what is wrong, and none may allocate from
// the bad value.
func TestParseHeaderHostile(t *testing.T) {
	put32 := func(off int, v uint32) func([]byte) { return func(b []byte) { be.PutUint32(b[off:], v) } }
	put64 := func(off int, v uint64) func([]byte) { return func(b []byte) { be.PutUint64(b[off:], v) } }
	tests := []struct {
		name   string
		mutate func([]byte)
		want   string
		unsup  bool
	}{
		{"bad magic", put32(0, 0x51464900), "bad magic", false},
		{"version 1", put32(4, 1), "version 1 is not supported", true},
		{"version 4", put32(4, 4), "version 4 is not supported", true},
		{"cluster_bits 8", put32(20, 8), "cluster_bits 8 outside", false},
		{"cluster_bits 30", put32(20, 30), "cluster_bits 30 outside", false},
		{"huge L1", put32(36, 1<<30), "L1 table of 1073741824 entries is larger", false},
		{"L1 too small for the size", put64(24, 1<<50), "too small for a virtual size", false},
		{"huge virtual size", put64(24, 1<<62), "virtual size", false},
		{"L1 unaligned", put64(40, 0x30001), "L1 table offset 0x30001 is not a non-zero multiple", false},
		{"L1 at 0", put64(40, 0), "L1 table offset 0x0", false},
		{"L1 past the end", put64(40, 1<<40), "L1 table at 0x10000000000", false},
		{"refcount table past the end", put64(48, 1<<40), "refcount table at 0x10000000000", false},
		{"huge refcount table", put32(56, 1<<20), "refcount table of 1048576 clusters is larger", false},
		{"no refcount table", put32(56, 0), "no refcount table", false},
		{"encrypted", put32(32, 2), "encrypted images (crypt_method 2) are not supported", true},
		{"unknown incompatible bit", put64(72, 1<<20), `unknown incompatible features bit 20`, true},
		{"external data file", put64(72, incompatExternalData), "external data file", true},
		{"compression bit without type", put64(72, incompatCompression), "does not match the compression type", false},
		{"refcount_order 7", put32(96, 7), "refcount_order 7", false},
		{"header_length odd", put32(100, 105), "header_length 105", false},
		{"header_length past the cluster", put32(100, 1<<20), "header_length 1048576", false},
		{"too many snapshots", put32(60, 1<<20), "1048576 snapshots", false},
		{"snapshot table past the end", func(b []byte) { put32(60, 1)(b); put64(64, 1<<40)(b) }, "snapshot table at", false},
		{"backing name outside the cluster", func(b []byte) { put64(8, 65530)(b); put32(16, 100)(b) }, "lies outside the first cluster", false},
		{"backing name too long", func(b []byte) { put64(8, 512)(b); put32(16, 5000)(b) }, "backing file name length 5000", false},
		{"extension overflows", put32(116, 0xffffff00), "runs past the first cluster", false},
		{"truncated", func(b []byte) {}, "header truncated", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, size := goldenHeader(t, "pattern.qcow2")
			if tc.name == "truncated" {
				b = b[:50]
			}
			tc.mutate(b)
			_, err := parseHeader(b, size)
			var fe *diskserve.FormatError
			if !errors.As(err, &fe) || fe.Format != "qcow2" || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want a qcow2 FormatError containing %q", err, tc.want)
			}
			if got := errors.Is(err, diskserve.ErrUnsupported); got != tc.unsup {
				t.Errorf("errors.Is(ErrUnsupported) = %v, want %v (%v)", got, tc.unsup, err)
			}
			if !tc.unsup && !errors.Is(err, diskserve.ErrCorrupt) {
				t.Errorf("%v is not ErrCorrupt", err)
			}
		})
	}
}
