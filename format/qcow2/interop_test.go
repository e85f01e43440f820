package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/testtool"
)

// qemuWrites are qemu-io commands that leave data, zeroes and holes at odd
// offsets, across cluster boundaries of every size tested.
var qemuWrites = []string{
	"write -P 0x11 0 1536",
	"write -P 0x22 5000 70000",
	"write -P 0x33 1048064 1024",
	"write -P 0x44 2097152 2097152",
	"write -z 2162688 65536",
	"write -P 0x55 6291456 512",
	"write -P 0x66 8388096 512",
}

func qemuIO(t *testing.T, img, format string, cmds ...string) {
	t.Helper()
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	testtool.Run(t, "qemu-io", append(args, img)...)
}

// rawBase makes an 8 MiB raw image with the writes applied.
func rawBase(t *testing.T, dir string) string {
	t.Helper()
	base := filepath.Join(dir, "base.raw")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", base, "8M")
	qemuIO(t, base, "raw", qemuWrites...)
	return base
}

// compareWithQemu checks every byte and the data ranges of img, read by
// diskserve, against qemu-img's reading of it.
func compareWithQemu(t *testing.T, img string) diskserve.DiskFile {
	t.Helper()
	ref := filepath.Join(t.TempDir(), "ref.raw")
	testtool.Run(t, "qemu-img", "convert", "-O", "raw", img, ref)
	want, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	d := openFile(t, img)
	if got := readAll(t, d); !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("byte %d (%#x) is %#x, qemu-img reads %#x", i, i, got[i], want[i])
			}
		}
		t.Fatalf("%d bytes, qemu-img reads %d", len(got), len(want))
	}
	wantRanges := testtool.DataRanges(t, testtool.Run(t, "qemu-img", "map", "--output=json", img))
	ext, err := diskserve.Extents(d, nil, 0, d.Size())
	if err != nil {
		t.Fatal(err)
	}
	var gotRanges []testtool.Range
	for _, e := range ext {
		if e.Flags&diskserve.ExtentHole == 0 {
			gotRanges = testtool.AddRange(gotRanges, e.Off, e.Len)
		}
	}
	if fmt.Sprint(gotRanges) != fmt.Sprint(wantRanges) {
		t.Errorf("data ranges:\ndiskserve %v\n qemu-img %v", gotRanges, wantRanges)
	}
	disktest.Check(t, d, want)
	return d
}

func TestInteropMatrix(t *testing.T) {
	dir := t.TempDir()
	base := rawBase(t, dir)
	for _, tc := range []struct {
		name    string
		args    []string
		extraIO []string // applied to the qcow2 image after conversion
	}{
		{"v2", []string{"-o", "compat=0.10"}, nil},
		{"v2 zero writes", []string{"-o", "compat=0.10,cluster_size=4096"}, []string{"write -z 0 8192"}},
		{"cluster 512", []string{"-o", "cluster_size=512"}, nil},
		{"cluster 4k", []string{"-o", "cluster_size=4096"}, nil},
		{"cluster 64k", []string{"-o", "cluster_size=65536"}, nil},
		{"cluster 2M", []string{"-o", "cluster_size=2M"}, nil},
		{"refcount_bits 1", []string{"-o", "refcount_bits=1"}, nil},
		{"refcount_bits 64", []string{"-o", "refcount_bits=64"}, nil},
		{"zlib", []string{"-c", "-o", "cluster_size=65536"}, nil},
		{"zlib 4k", []string{"-c", "-o", "cluster_size=4096"}, nil},
		{"zstd", []string{"-c", "-o", "compression_type=zstd"}, nil},
		{"extended_l2", []string{"-o", "extended_l2=on,cluster_size=65536"}, []string{"write -P 0x77 4608 1024", "write -z 2097664 1024", "discard 6291456 65536"}},
		{"zero clusters", []string{"-o", "cluster_size=65536"}, []string{"write -z 0 65536", "write -z 2097152 131072", "write -z 7340032 65536"}},
		{"preallocated metadata", []string{"-o", "preallocation=metadata"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "img.qcow2")
			testtool.Run(t, "qemu-img", append(append([]string{"convert", "-f", "raw", "-O", "qcow2"}, tc.args...), base, img)...)
			if tc.extraIO != nil {
				qemuIO(t, img, "qcow2", tc.extraIO...)
			}
			compareWithQemu(t, img)
		})
	}
}

// TestInteropBackingChain reads a chain three deep, each overlay naming
// its backing file relative to its own directory, with a zero write in the
// top over data below and a top larger than its backing files.
func TestInteropBackingChain(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"a", "b", "c"} {
		os.Mkdir(filepath.Join(dir, d), 0o755)
	}
	base := filepath.Join(dir, "a", "base.raw")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", base, "4M")
	qemuIO(t, base, "raw", "write -P 0x11 0 4M")
	mid := filepath.Join(dir, "b", "mid.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "../a/base.raw", "-F", "raw", mid, "6M")
	qemuIO(t, mid, "qcow2", "write -P 0x22 1M 1M", "write -z 3M 64k", "write -P 0x23 5M 4096")
	top := filepath.Join(dir, "c", "top.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "../b/mid.qcow2", "-F", "qcow2", top, "8M")
	qemuIO(t, top, "qcow2", "write -P 0x33 1536k 4096", "write -z 0 8192", "discard 16384 8192", "write -P 0x34 7M 100")
	t.Chdir(t.TempDir()) // names resolve against the images' directories, not this
	d := compareWithQemu(t, top)
	info := diskserve.Describe(d)
	if info.BackingFile != "../b/mid.qcow2" || info.BackingFormat != "qcow2" || info.Backing == nil || info.Backing.Backing == nil || info.Backing.Backing.Format != "raw" {
		t.Errorf("chain as described: %+v", info)
	}
}

// TestInteropSnapshot reads the active layer of an image whose clusters
// are shared with an internal snapshot, and lists the snapshot.
func TestInteropSnapshot(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "snap.qcow2")
	testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawBase(t, dir), img)
	testtool.Run(t, "qemu-img", "snapshot", "-c", "before", img)
	qemuIO(t, img, "qcow2", "write -P 0x99 0 8192", "write -z 2097152 1M")
	d := compareWithQemu(t, img)
	info := diskserve.Describe(d)
	if len(info.Snapshots) != 1 || info.Snapshots[0].Name != "before" || info.Snapshots[0].ID != "1" || info.Snapshots[0].DiskSize != 8<<20 {
		t.Fatalf("snapshots %+v", info.Snapshots)
	}
}

// TestInteropSelfBacking opens an image whose backing file is itself: it
// fails with the nesting-depth error and leaks no file descriptor.
func TestInteropSelfBacking(t *testing.T) {
	img := filepath.Join(t.TempDir(), "self.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	testtool.Run(t, "qemu-img", "rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", img)
	fds := func() int { e, _ := os.ReadDir("/proc/self/fd"); return len(e) }
	before := fds()
	_, err := diskserve.Open(img, options())
	if !errors.Is(err, diskserve.ErrNestingDepth) {
		t.Fatalf("open of a self-backed image: %v", err)
	}
	if after := fds(); after != before {
		t.Errorf("%d descriptors open before, %d after", before, after)
	}
}

// TestInteropBackingWithoutFormat refuses an overlay that does not record
// its backing file's format, and says how to fix it.
func TestInteropBackingWithoutFormat(t *testing.T) {
	dir := t.TempDir()
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", filepath.Join(dir, "base.raw"), "1M")
	img := filepath.Join(dir, "top.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", img)
	// Old qemu-img versions left no backing format; this one refuses to,
	// so turn the extension into one of an unknown type.
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b[:4096], []byte{0xe2, 0x79, 0x2a, 0xca})
	if i < 0 {
		t.Fatal("no backing format extension")
	}
	copy(b[i:], []byte{0x12, 0x34, 0x56, 0x78})
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = diskserve.Open(img, options())
	if !errors.Is(err, diskserve.ErrUnsupported) || !bytes.Contains([]byte(err.Error()), []byte("-F FORMAT")) {
		t.Fatalf("open of an overlay without a backing format: %v", err)
	}
}
