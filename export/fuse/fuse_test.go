package fuse

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"sync/atomic"
	"syscall"
	"testing"

	gofuse "github.com/hanwen/go-fuse/v2/fuse"

	"github.com/diskserve/diskserve"
)

// TestErrnoClasses maps each class of disk error to the status the
// kernel gets, by way of diskserve.Errno: the same classes as over NBD.
func TestErrnoClasses(t *testing.T) {
	f := &rawFS{log: slog.New(slog.DiscardHandler)}
	for _, tc := range []struct {
		err  error
		want syscall.Errno
	}{
		{diskserve.ErrReadOnly, syscall.EROFS},
		{fmt.Errorf("probed raw: %w", fs.ErrPermission), syscall.EPERM},
		{diskserve.ErrOutOfRange, syscall.ENOSPC},
		{&fs.PathError{Op: "write", Path: "x", Err: syscall.EDQUOT}, syscall.EDQUOT},
		{errors.ErrUnsupported, syscall.EOPNOTSUPP},
		{diskserve.Corrupt("qcow2", 0, "bad"), syscall.EIO},
	} {
		if got := f.errno("write", tc.err); got != gofuse.Status(tc.want) {
			t.Errorf("errno(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// extentCounter is a 3 GiB disk of zeroes, writes discarded, that counts
// the ExtentMapper calls made of it.
type extentCounter struct{ calls atomic.Int64 }

func (d *extentCounter) Size() int64                              { return 3 << 30 }
func (d *extentCounter) ReadOnly() bool                           { return false }
func (d *extentCounter) Close() error                             { return nil }
func (d *extentCounter) ReadAt(p []byte, off int64) (int, error)  { clear(p); return len(p), nil }
func (d *extentCounter) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }

func (d *extentCounter) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	d.calls.Add(1)
	return append(dst, diskserve.Extent{Off: off, Len: n}), nil
}

// TestStatDoesNotWalk stats the disk file many times, with writes between:
// the extents are walked for the first stat, and not again while the
// count is younger than the attribute timeout.
func TestStatDoesNotWalk(t *testing.T) {
	d := &extentCounter{}
	f := &rawFS{nodes: []*node{{ino: inoRoot, d: d}}, log: slog.New(slog.DiscardHandler)}
	var out gofuse.AttrOut
	for i := range 100 {
		if st := f.GetAttr(nil, &gofuse.GetAttrIn{InHeader: gofuse.InHeader{NodeId: inoRoot}}, &out); st != gofuse.OK {
			t.Fatal(st)
		}
		if i%10 == 0 {
			f.Write(nil, &gofuse.WriteIn{InHeader: gofuse.InHeader{NodeId: inoRoot}, Offset: uint64(i) << 20}, []byte("x"))
		}
	}
	if got := d.calls.Load(); got != 3 { // one walk of 3 GiB, 1 GiB a call
		t.Errorf("100 stats made %d extent calls, want the 3 of one walk", got)
	}
	if out.Blocks != 3<<30/512 {
		t.Errorf("st_blocks %d", out.Blocks)
	}
}
