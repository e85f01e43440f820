// Package rebase moves an overlay onto another backing file without
// changing what it reads, as `qemu-img rebase` does in its safe mode.
package rebase

import (
	"bytes"
	"context"

	"golang.org/x/sync/errgroup"

	"github.com/diskserve/diskserve"
)

const (
	sector  = 512
	piece   = 1 << 20 // the most read at once from each chain
	workers = 4       // pieces in flight
	window  = 1 << 30 // the allocation asked for at once
)

// Copy makes top read the same over newBacking as it does now: for every
// range top leaves to its backing chain, it writes into top the sectors
// where newBacking reads differently from what top reads now. A nil
// newBacking reads as zeroes (rebasing onto no backing file); so does
// newBacking past its end. Ranges top holds itself are not read, nor
// ranges that both top and newBacking report as zeroes. progress, if set,
// is told the bytes of top covered.
//
// What top reads there is its old backing chain's content, which the
// writes copy: top must be opened read-write over its old backing file,
// and Copy only writes data; recording newBacking in top is the caller's
// step ([diskserve.SetBacking]) once top is flushed.
func Copy(ctx context.Context, top, newBacking diskserve.DiskFile, progress func(int64)) error {
	g, ctx := errgroup.WithContext(ctx)
	type job struct{ off, n int64 }
	jobs := make(chan job, workers)
	for range workers {
		g.Go(func() error {
			old, nb := make([]byte, piece), make([]byte, piece)
			for j := range jobs {
				if err := diskserve.ReadFullAt(top, old[:j.n], j.off); err != nil {
					return err
				}
				if err := readNew(newBacking, nb[:j.n], j.off); err != nil {
					return err
				}
				if err := writeDifferences(top, old[:j.n], nb[:j.n], j.off); err != nil {
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		defer close(jobs)
		var depths, ext []diskserve.Extent
		for pos, size := int64(0), top.Size(); pos < size; pos += window {
			n := min(window, size-pos)
			var err error
			if depths, err = diskserve.AllocationDepths(top, depths[:0], pos, n); err != nil {
				return err
			}
			for _, d := range depths {
				if d.Flags == 1 {
					continue // top's own
				}
				if ext, err = zeroBoth(top, newBacking, ext[:0], d.Off, d.Len); err != nil {
					return err
				}
				for _, e := range ext {
					for o := e.Off; o < e.Off+e.Len; o += piece {
						select {
						case jobs <- job{o, min(piece, e.Off+e.Len-o)}:
						case <-ctx.Done():
							return ctx.Err()
						}
					}
				}
			}
			if progress != nil {
				progress(n)
			}
		}
		return nil
	})
	return g.Wait()
}

// zeroBoth appends to dst the parts of [off, off+n) that top or nb does
// not report as zeroes: those that must be read.
func zeroBoth(top, nb diskserve.DiskFile, dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	a, err := diskserve.Extents(top, nil, off, n)
	if err != nil {
		return dst, err
	}
	var b []diskserve.Extent
	if nb != nil && off < nb.Size() {
		if b, err = diskserve.Extents(nb, nil, off, min(n, nb.Size()-off)); err != nil {
			return dst, err
		}
	}
	if end := off + n; nb == nil || end > nb.Size() {
		start := off
		if nb != nil {
			start = max(off, nb.Size())
		}
		b = append(b, diskserve.Extent{Off: start, Len: end - start, Flags: diskserve.ExtentZero})
	}
	for i, j := 0, 0; i < len(a) && j < len(b); {
		lo := max(a[i].Off, b[j].Off)
		hi := min(a[i].Off+a[i].Len, b[j].Off+b[j].Len)
		if a[i].Flags&b[j].Flags&diskserve.ExtentZero == 0 {
			dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: lo, Len: hi - lo})
		}
		if hi == a[i].Off+a[i].Len {
			i++
		}
		if hi == b[j].Off+b[j].Len {
			j++
		}
	}
	return dst, nil
}

// readNew fills p from nb at off, with zeroes past its end or without it.
func readNew(nb diskserve.DiskFile, p []byte, off int64) error {
	if nb == nil || off >= nb.Size() {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), nb.Size()-off)
	clear(p[n:])
	return diskserve.ReadFullAt(nb, p[:n], off)
}

// writeDifferences writes into top, at off, the runs of sectors where old
// and nb differ, with old's bytes.
func writeDifferences(top diskserve.DiskFile, old, nb []byte, off int64) error {
	for s := 0; s < len(old); {
		e := min(len(old), s+sector)
		if bytes.Equal(old[s:e], nb[s:e]) {
			s = e
			continue
		}
		for e < len(old) && !bytes.Equal(old[e:min(len(old), e+sector)], nb[e:min(len(old), e+sector)]) {
			e = min(len(old), e+sector)
		}
		if _, err := top.WriteAt(old[s:e], off+int64(s)); err != nil {
			return err
		}
		s = e
	}
	return nil
}
