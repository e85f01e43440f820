// Package diffcopy writes into a disk the sectors where one disk reads
// differently from another: how `rebase` keeps an overlay's content over
// a new backing file, and how `convert -B` makes an overlay hold only what
// differs from its backing file.
package diffcopy

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

// Copy writes into dst a's bytes at every sector where a reads
// differently from b, over dst's size. A nil b reads as zeroes, and so
// does b past its end. Ranges both a and b report as zeroes are not read;
// with skipHeld, neither are the ranges dst holds itself (allocation
// depth 1). Pieces are read and compared on several goroutines; each
// reads its piece of a and b before it writes that piece of dst, so dst
// may be a or b. progress, if set, is told the bytes of dst covered.
//
// rebase: dst and a are the overlay (over its old backing file), b the
// new backing file, skipHeld set. convert -B: dst and b are the new
// overlay over its backing file, a the source.
func Copy(ctx context.Context, dst, a, b diskserve.DiskFile, skipHeld bool, progress func(int64)) error {
	g, ctx := errgroup.WithContext(ctx)
	type job struct{ off, n int64 }
	jobs := make(chan job, workers)
	for range workers {
		g.Go(func() error {
			ab, bb := make([]byte, piece), make([]byte, piece)
			for j := range jobs {
				if err := readZeroPast(a, ab[:j.n], j.off); err != nil {
					return err
				}
				if err := readZeroPast(b, bb[:j.n], j.off); err != nil {
					return err
				}
				if err := writeDifferences(dst, ab[:j.n], bb[:j.n], j.off); err != nil {
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		defer close(jobs)
		var depths, ext []diskserve.Extent
		for pos, size := int64(0), dst.Size(); pos < size; pos += window {
			n := min(window, size-pos)
			depths = append(depths[:0], diskserve.Extent{Off: pos, Len: n})
			if skipHeld {
				var err error
				if depths, err = diskserve.AllocationDepths(dst, depths[:0], pos, n); err != nil {
					return err
				}
			}
			for _, d := range depths {
				if skipHeld && d.Flags == 1 {
					continue // dst's own
				}
				var err error
				if ext, err = zeroBoth(a, b, ext[:0], d.Off, d.Len); err != nil {
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

// zeroBoth appends to dst the parts of [off, off+n) that a or b does not
// report as zeroes: those that must be read.
func zeroBoth(a, b diskserve.DiskFile, dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	ea, err := extentsZeroPast(a, off, n)
	if err != nil {
		return dst, err
	}
	eb, err := extentsZeroPast(b, off, n)
	if err != nil {
		return dst, err
	}
	for i, j := 0, 0; i < len(ea) && j < len(eb); {
		lo := max(ea[i].Off, eb[j].Off)
		hi := min(ea[i].Off+ea[i].Len, eb[j].Off+eb[j].Len)
		if ea[i].Flags&eb[j].Flags&diskserve.ExtentZero == 0 {
			dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: lo, Len: hi - lo})
		}
		if hi == ea[i].Off+ea[i].Len {
			i++
		}
		if hi == eb[j].Off+eb[j].Len {
			j++
		}
	}
	return dst, nil
}

// extentsZeroPast returns d's extents over [off, off+n), zeroes past its
// end or all through when d is nil.
func extentsZeroPast(d diskserve.DiskFile, off, n int64) ([]diskserve.Extent, error) {
	var ext []diskserve.Extent
	size := int64(0)
	if d != nil {
		size = d.Size()
	}
	if off < size {
		var err error
		if ext, err = diskserve.Extents(d, nil, off, min(n, size-off)); err != nil {
			return nil, err
		}
	}
	if end := off + n; end > size {
		start := max(off, size)
		ext = append(ext, diskserve.Extent{Off: start, Len: end - start, Flags: diskserve.ExtentZero})
	}
	return ext, nil
}

// readZeroPast fills p from d at off, with zeroes past its end or when d
// is nil.
func readZeroPast(d diskserve.DiskFile, p []byte, off int64) error {
	if d == nil || off >= d.Size() {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), d.Size()-off)
	clear(p[n:])
	return diskserve.ReadFullAt(d, p[:n], off)
}

// writeDifferences writes into dst, at off, the runs of sectors where old
// and nb differ, with old's bytes: runs of zeroes as zeroes (qcow2 then
// records whole clusters as zero clusters rather than storing them).
func writeDifferences(dst diskserve.DiskFile, old, nb []byte, off int64) error {
	for s := 0; s < len(old); {
		e := min(len(old), s+sector)
		if bytes.Equal(old[s:e], nb[s:e]) {
			s = e
			continue
		}
		for e < len(old) && !bytes.Equal(old[e:min(len(old), e+sector)], nb[e:min(len(old), e+sector)]) {
			e = min(len(old), e+sector)
		}
		var err error
		if diskserve.IsZero(old[s:e]) {
			err = diskserve.WriteZeroes(dst, off+int64(s), int64(e-s), 0)
		} else {
			_, err = dst.WriteAt(old[s:e], off+int64(s))
		}
		if err != nil {
			return err
		}
		s = e
	}
	return nil
}
