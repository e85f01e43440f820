package qcow2_test

import (
	"bytes"
	"math/rand/v2"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/internal/faultdisk"
)

// TestWriteFaultsKeepImageConsistent fails the image file's writes with
// EIO after a different number of them in each run, in the middle of a
// workload of allocating writes, zeroes and flushes. Afterwards qemu-img
// check finds no corruption (leaks are allowed: a crash may leak), and
// every byte that was written before the last successful flush, and not
// touched after it, reads back as it was.
func TestWriteFaultsKeepImageConsistent(t *testing.T) {
	const size = 16 << 20
	for run := range 12 {
		img := create(t, t.TempDir(), "16M", "-o", "cluster_size=4096")
		var fd *faultdisk.Disk
		opts := options()
		opts.ReadOnly = false
		opts.OpenFile = func(path string, readOnly bool) (diskserve.DiskFile, error) {
			c, err := raw.OpenFile(path, readOnly)
			if err != nil {
				return nil, err
			}
			fd = faultdisk.New(c)
			return fd, nil
		}
		d, err := diskserve.Open(img, opts)
		if err != nil {
			t.Fatal(err)
		}
		fd.Fail(faultdisk.Write, syscall.EIO, int64(5+run*17))
		model := make([]byte, size)
		durable := make([]byte, size)
		dirty := make([]bool, size/512) // sectors written since the last successful flush
		rnd := rand.New(rand.NewPCG(uint64(run), 9))
		var failed error
		for i := 0; i < 400 && failed == nil; i++ {
			off := rnd.Int64N(size/512-64) * 512
			n := (1 + rnd.Int64N(64)) * 512
			for s := off / 512; s < (off+n)/512; s++ {
				dirty[s] = true
			}
			switch rnd.IntN(8) {
			case 0:
				if failed = diskserve.Flush(d); failed == nil {
					copy(durable, model)
					clear(dirty)
				}
			case 1:
				failed = diskserve.WriteZeroes(d, off, n, diskserve.ZeroMayUnmap)
				clear(model[off : off+n])
			default:
				p := make([]byte, n)
				for k := range p {
					p[k] = byte(rnd.Uint32())
				}
				_, failed = d.WriteAt(p, off)
				copy(model[off:], p)
			}
		}
		if failed == nil {
			t.Fatalf("run %d: no write failed", run)
		}
		d.Close() // may fail too: the file still fails writes
		if corruptions, _ := qemuCheckCounts(t, img); corruptions != 0 {
			t.Fatalf("run %d: qemu-img check finds %d corruptions after the failure", run, corruptions)
		}
		got := make([]byte, size)
		if err := diskserve.ReadFullAt(openFile(t, img), got, 0); err != nil {
			t.Fatal(err)
		}
		for s := range dirty {
			if !dirty[s] && !bytes.Equal(got[s*512:(s+1)*512], durable[s*512:(s+1)*512]) {
				t.Fatalf("run %d: sector %d, flushed before the failure, reads differently", run, s)
			}
		}
	}
}
