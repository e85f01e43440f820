package diskserve_test

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// TestFallbacks runs the conformance suite on a disk with no capabilities,
// so that every write-zeroes, punch, extents and resize goes through the
// fallbacks in ops.go.
func TestFallbacks(t *testing.T) {
	data := make([]byte, 4<<20+3)
	for i := range data {
		data[i] = byte(i * 7)
	}
	disktest.Check(t, disktest.NewMemory(data, false), data)
}

func TestFallbacksReadOnly(t *testing.T) {
	data := []byte("read-only disk contents")
	disktest.Check(t, disktest.NewMemory(data, true), data)
}

func TestExtentsFallbackIsAllData(t *testing.T) {
	d := disktest.NewMemory(make([]byte, 1000), false)
	got, err := diskserve.Extents(d, nil, 10, 990)
	if err != nil || len(got) != 1 || got[0] != (diskserve.Extent{Off: 10, Len: 990}) {
		t.Fatalf("Extents = %+v, %v; want one data extent [10, 1000)", got, err)
	}
	if _, err := diskserve.Extents(d, nil, 10, 991); !errors.Is(err, diskserve.ErrOutOfRange) {
		t.Fatalf("Extents past the end: %v, want ErrOutOfRange", err)
	}
}

func TestZeroFastWithoutZeroWriter(t *testing.T) {
	data := []byte("0123456789")
	d := disktest.NewMemory(data, false)
	err := diskserve.WriteZeroes(d, 2, 3, diskserve.ZeroFast)
	if !errors.Is(err, diskserve.ErrUnsupported) {
		t.Fatalf("fast zero on a bare disk: %v, want ErrUnsupported", err)
	}
	if string(data) != "0123456789" {
		t.Fatalf("refused fast zero changed the disk: %q", data)
	}
}

// unsupportedZero is a disk whose ZeroWriter and HolePuncher always refuse,
// as raw does on a file system without fallocate modes.
type unsupportedZero struct{ *disktest.Memory }

func (unsupportedZero) WriteZeroesAt(off, n int64, _ diskserve.ZeroFlags) error {
	return diskserve.ErrUnsupported
}
func (unsupportedZero) PunchHole(off, n int64) error { return diskserve.ErrUnsupported }

func TestFallbackAfterUnsupported(t *testing.T) {
	data := []byte("abcdefghij")
	d := unsupportedZero{disktest.NewMemory(data, false)}
	if err := diskserve.PunchHole(d, 1, 2); err != nil {
		t.Fatal(err)
	}
	if err := diskserve.WriteZeroes(d, 5, 2, 0); err != nil {
		t.Fatal(err)
	}
	if string(data) != "a\x00\x00de\x00\x00hij" {
		t.Fatalf("after fallbacks the disk holds %q", data)
	}
}

func TestFormatError(t *testing.T) {
	tests := []struct {
		name        string
		err         error
		msg         string
		corrupt     bool
		unsupported bool
	}{
		{"corrupt with offset", diskserve.Corrupt("qcow2", 0x28, "L1 table offset %#x not aligned", 0x1234), "qcow2: L1 table offset 0x1234 not aligned (at byte 0x28)", true, false},
		{"corrupt without offset", diskserve.Corrupt("sparse", -1, "truncated"), "sparse: truncated", true, false},
		{"unsupported", diskserve.Unsupported("qcow2", 0x20, "encrypted images are not supported"), "qcow2: encrypted images are not supported (at byte 0x20)", false, true},
		{"with cause", &diskserve.FormatError{Format: "zstd", Off: 7, Msg: "read seek table", Err: io.ErrUnexpectedEOF}, "zstd: read seek table (at byte 0x7): unexpected EOF", true, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.err.Error(); got != tc.msg {
				t.Errorf("Error() = %q, want %q", got, tc.msg)
			}
			if got := errors.Is(tc.err, diskserve.ErrCorrupt); got != tc.corrupt {
				t.Errorf("errors.Is(ErrCorrupt) = %v, want %v", got, tc.corrupt)
			}
			if got := errors.Is(tc.err, diskserve.ErrUnsupported); got != tc.unsupported {
				t.Errorf("errors.Is(ErrUnsupported) = %v, want %v", got, tc.unsupported)
			}
			var fe *diskserve.FormatError
			if !errors.As(tc.err, &fe) {
				t.Errorf("errors.As(*FormatError) failed")
			}
		})
	}
}

func TestCheckRange(t *testing.T) {
	for _, tc := range []struct {
		size, off, n int64
		ok           bool
	}{
		{100, 0, 100, true}, {100, 100, 0, true}, {100, 99, 1, true},
		{100, 99, 2, false}, {100, -1, 1, false}, {100, 0, -1, false}, {100, 101, 0, false},
		{1 << 62, 1 << 62, 1 << 62, false}, {100, 50, 1<<63 - 1, false},
	} {
		err := diskserve.CheckRange(tc.size, tc.off, tc.n)
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, diskserve.ErrOutOfRange)) {
			t.Errorf("CheckRange(%d, %d, %d) = %v, want ok=%v", tc.size, tc.off, tc.n, err, tc.ok)
		}
	}
}

// TestErrno maps each class of disk error to its errno.
func TestErrno(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want syscall.Errno
	}{
		{nil, 0},
		{fmt.Errorf("write: %w", diskserve.ErrReadOnly), syscall.EROFS},
		{fmt.Errorf("write: %w", diskserve.ErrOutOfRange), syscall.ENOSPC},
		{fmt.Errorf("fast zero: %w", errors.ErrUnsupported), syscall.EOPNOTSUPP},
		{diskserve.Unsupported("qcow2", 0, "encryption"), syscall.EOPNOTSUPP},
		{&fs.PathError{Op: "write", Path: "x", Err: syscall.ENOSPC}, syscall.ENOSPC},
		{&fs.PathError{Op: "write", Path: "x", Err: syscall.EDQUOT}, syscall.EDQUOT},
		{fmt.Errorf("write to a probed raw image: %w", fs.ErrPermission), syscall.EPERM},
		{diskserve.Corrupt("qcow2", 0, "bad L2 entry"), syscall.EIO},
		{io.ErrUnexpectedEOF, syscall.EIO},
	} {
		if got := diskserve.Errno(tc.err); got != tc.want {
			t.Errorf("Errno(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
