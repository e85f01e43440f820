// Package commit writes what the upper layers of a backing chain hold
// into a layer below them, as `qemu-img commit` and the control API's
// live commit do.
package commit

import (
	"context"
	"os"

	"golang.org/x/sync/errgroup"

	"github.com/diskserve/diskserve"
)

const (
	chunk   = 1 << 20 // the most copied in one request
	workers = 4       // requests in flight
	window  = 1 << 30 // the allocation asked for at once
)

// Copy writes into base every range that the top layers of top (its
// first layers layers: 1 for top alone) hold, as top reads it: data where
// it reads data, zeroes where it reads zeroes. Ranges those layers leave
// to the layers below are not read, so top must not read base through
// them while base is written: open the chain's copy of base without the
// writer's lock ([OpenUnlocked]) and read-only. base must be at least
// top's size. progress, if set, is told the bytes of top covered.
func Copy(ctx context.Context, base, top diskserve.DiskFile, layers int, progress func(int64)) error {
	g, ctx := errgroup.WithContext(ctx)
	type job struct {
		off, n int64
		zero   bool
	}
	jobs := make(chan job, workers)
	for range workers {
		g.Go(func() error {
			buf := make([]byte, chunk)
			for j := range jobs {
				if j.zero {
					if err := diskserve.WriteZeroes(base, j.off, j.n, 0); err != nil {
						return err
					}
					continue
				}
				b := buf[:j.n]
				if err := diskserve.ReadFullAt(top, b, j.off); err != nil {
					return err
				}
				if _, err := base.WriteAt(b, j.off); err != nil {
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		defer close(jobs)
		send := func(j job) error {
			select {
			case jobs <- j:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		var depths, ext []diskserve.Extent
		for pos, size := int64(0), top.Size(); pos < size; pos += window {
			var err error
			if depths, err = diskserve.AllocationDepths(top, depths[:0], pos, min(window, size-pos)); err != nil {
				return err
			}
			for _, d := range depths {
				if d.Flags == 0 || int(d.Flags) > layers {
					continue // below the layers committed
				}
				if ext, err = diskserve.Extents(top, ext[:0], d.Off, d.Len); err != nil {
					return err
				}
				for _, e := range ext {
					if e.Flags&diskserve.ExtentZero != 0 {
						if err := send(job{off: e.Off, n: e.Len, zero: true}); err != nil {
							return err
						}
						continue
					}
					for o := e.Off; o < e.Off+e.Len; o += chunk {
						if err := send(job{off: o, n: min(chunk, e.Off+e.Len-o)}); err != nil {
							return err
						}
					}
				}
			}
			if progress != nil {
				progress(min(window, size-pos))
			}
		}
		return nil
	})
	return g.Wait()
}

// OpenUnlocked opens the file at path read-only as a container, without
// the lock raw files take: for the copy of a chain's base that the chain
// reads while a writer holds that lock.
func OpenUnlocked(path string) (diskserve.DiskFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &roFile{f: f, size: st.Size()}, nil
}

// roFile is a read-only file as a container.
type roFile struct {
	f    *os.File
	size int64
}

func (r *roFile) Size() int64                              { return r.size }
func (r *roFile) ReadOnly() bool                           { return true }
func (r *roFile) Close() error                             { return r.f.Close() }
func (r *roFile) ReadAt(p []byte, off int64) (int, error)  { return r.f.ReadAt(p, off) }
func (r *roFile) WriteAt(p []byte, off int64) (int, error) { return 0, diskserve.ErrReadOnly }
