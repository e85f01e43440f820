// Package newimage makes new images with the formats' [diskserve.Creator]s:
// empty ones (`diskserve create`) and copies of a disk (`convert`, bundles,
// `bench`). Nothing in it knows a format by name: whatever a format
// declares in its Creator is what can be made of it.
//
// Every file of a new image is written where nobody sees it, unnamed
// (O_TMPFILE) where the file system allows, and given its name only when
// the image is complete and durable, the image's own file last: an
// interrupted run, even a killed one, leaves no partial image and, on the
// usual Linux file systems, nothing at all (see output).
package newimage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/diffcopy"
	"golang.org/x/sys/unix"
)

// Copying: each of copyWorkers goroutines (by default) reads and writes a
// piece of up to copyPiece bytes at a time, and skips the parts of
// copyGrain bytes (by default, as qemu-img convert's -S) that read as
// zeroes.
const (
	copyPiece   = 1 << 20
	copyGrain   = 4 << 10
	copyWorkers = 4
)

// Creatable returns the formats of formats that have a [diskserve.Creator],
// in their order.
func Creatable(formats []diskserve.Format) []diskserve.Format {
	var out []diskserve.Format
	for _, f := range formats {
		if f.Create != nil {
			out = append(out, f)
		}
	}
	return out
}

// Creator returns the Creator of f, or an error naming the formats of
// formats that have one.
func Creator(f diskserve.Format, formats []diskserve.Format) (*diskserve.Creator, error) {
	if f.Create != nil {
		return f.Create, nil
	}
	var names []string
	for _, c := range Creatable(formats) {
		names = append(names, c.Name)
	}
	return nil, fmt.Errorf("%s images cannot be written (these can: %v)", f.Name, names)
}

// Create makes an empty image of format f at path with f's
// [diskserve.Creator.New], after checking a against what f declares. It
// replaces any file there, once the new image is complete.
func Create(path string, f diskserve.Format, a diskserve.CreateArgs) (err error) {
	c := f.Create
	switch {
	case c == nil || c.New == nil || c.WritesWhole(a.Options):
		return fmt.Errorf("create %s: %s images are written whole from a source: use convert", path, f.Name)
	case a.BackingFile != "" && !c.Backing:
		return fmt.Errorf("create %s: %s images have no backing file", path, f.Name)
	case len(a.Components) > 0 && !c.Components:
		return fmt.Errorf("create %s: %s images are not built from other images", path, f.Name)
	}
	if err := a.Options.Check(f.Name, c); err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	o, err := newOutput(path)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, o.close()) }()
	out, err := o.create(filepath.Base(path))
	if err != nil {
		return err
	}
	a.Path, a.Sidecar, a.Container = path, o.create, o.container(path)
	if err := c.New(out, a); err != nil {
		return err
	}
	return o.commit(true)
}

// A Target is the image a conversion writes.
type Target struct {
	Format   diskserve.Format
	Options  diskserve.CreateOptions
	Compress bool // store data compressed; the format must declare it can
	Bitmaps  bool // copy the source's persistent dirty bitmaps; the format must keep them

	// Open holds what opening the new image needs: the formats and the
	// file opener (package format's when left empty). Formats
	// written in place are opened with it to be filled.
	Open diskserve.Options

	// BackingFile (of format BackingFormat), if set, makes the new image
	// an overlay of it that holds only the sectors where the source reads
	// differently from it (convert -B); the format must take a backing
	// file.
	BackingFile, BackingFormat string

	// Copy tunes the copy of the data.
	Copy CopyOptions

	// Unsafe leaves the new image's files unsynced, flushes of the
	// format's own included: a crash soon after may leave them empty,
	// in part or inconsistent (qemu-img convert's default cache mode,
	// -t unsafe).
	Unsafe bool

	// Direct writes the new image with O_DIRECT (-t none or directsync),
	// bypassing the page cache, wherever its files are opened as disks:
	// the formats written in place, their creation's writes through the
	// container too. What a format writes to the file it is given, and
	// the formats written whole, go through the page cache and are
	// synced.
	Direct bool
}

// CopyOptions tune [Copy].
type CopyOptions struct {
	// Compress stores data with [diskserve.WriteCompressed] (the workers
	// compress in parallel), in whole units of the target's cluster size.
	Compress bool

	// Sparse is how many bytes of zeroes, aligned, make a hole rather
	// than a write; 0 means 4 KiB. Negative: every byte is written, as
	// data, zeroes too (convert -S 0: a fully allocated target).
	Sparse int64

	// Dirty says the target does not read as zeroes yet (convert -n
	// into an existing image): zero ranges are zeroed in it too.
	Dirty bool

	// Workers is how many pieces are copied at once; 0 means 4.
	Workers int

	// Offload copies data inside the kernel (copy_file_range) where
	// both disks map a piece onto host files, as convert -C. Data is
	// then copied whole, zero runs and all, as qemu-img -C does; where
	// the disks map nothing it goes through memory.
	Offload bool
}

// Convert writes the content of src into a new image at dst. Ranges of
// src that read as zeroes are not written, so the output stays sparse.
// progress, if not nil, is told how many bytes of src have been covered.
func Convert(ctx context.Context, src diskserve.DiskFile, dst string, t Target, progress func(int64)) (err error) {
	c, err := Creator(t.Format, format.Options(t.Open).Formats)
	if err != nil {
		return fmt.Errorf("convert to %s: %w", dst, err)
	}
	if t.BackingFile != "" && !c.Backing {
		return fmt.Errorf("convert to %s: %s images have no backing file", dst, t.Format.Name)
	}
	if t.BackingFile != "" && c.WritesWhole(t.Options) {
		return fmt.Errorf("convert to %s: -B: %s images written whole have no backing file", dst, t.Format.Name)
	}
	if t.Compress && !c.Compressed {
		return fmt.Errorf("convert to %s: %s images cannot store data compressed", dst, t.Format.Name)
	}
	if t.Bitmaps && c.WritesWhole(t.Options) && len(diskserve.ListBitmaps(src)) > 0 {
		return fmt.Errorf("convert to %s: --bitmaps: the %s format keeps no dirty bitmaps", dst, t.Format.Name)
	}
	if err := t.Options.Check(t.Format.Name, c); err != nil {
		return fmt.Errorf("convert to %s: %w", dst, err)
	}
	o, err := newOutput(dst)
	if err != nil {
		return err
	}
	o.direct = t.Direct
	defer func() {
		err = errors.Join(err, o.close())
		if err != nil && ctx.Err() != nil {
			err = fmt.Errorf("convert interrupted (%v): %s was not written", context.Cause(ctx), dst)
		}
	}()
	out, err := o.create(filepath.Base(dst))
	if err != nil {
		return err
	}
	if c.WritesWhole(t.Options) {
		err = c.Write(ctx, out, dst, src, t.Options, progress)
	} else {
		err = fill(ctx, o, out, src, dst, t, progress)
	}
	if err == nil {
		err = ctx.Err()
	}
	if err == nil {
		err = o.commit(!t.Unsafe)
	}
	return err
}

// ConvertInto writes the content of src into the existing image at dst,
// of t's format, as `convert -n` does: in place, with no temporary name,
// so that dst may be a block device or a logical volume. dst must be at
// least as large as src. Unless zero says that dst reads as zeroes
// already, the ranges where src reads zeroes are zeroed in dst.
func ConvertInto(ctx context.Context, src diskserve.DiskFile, dst string, t Target, zero bool, progress func(int64)) (err error) {
	opts := format.Options(t.Open)
	opts.Format, opts.ReadOnly = t.Format.Name, false
	opts.OpenFile = t.openFile(opts.OpenFile)
	d, err := diskserve.Open(dst, opts)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, d.Close()) }()
	if d.Size() < src.Size() {
		return fmt.Errorf("convert -n: %s (%d bytes) is smaller than the source (%d bytes)", dst, d.Size(), src.Size())
	}
	co := t.Copy
	co.Compress, co.Dirty = co.Compress || t.Compress, !zero
	if err := Copy(ctx, d, src, co, progress); err != nil {
		return err
	}
	if t.Unsafe {
		return nil
	}
	return diskserve.Flush(d)
}

// fill makes an empty image of t's format in out, for dst, and copies src
// into it.
func fill(ctx context.Context, o *output, out *os.File, src diskserve.DiskFile, dst string, t Target, progress func(int64)) error {
	a := diskserve.CreateArgs{Path: dst, Size: src.Size(), Options: t.Options, Sidecar: o.create, Container: o.container(dst), BackingFile: t.BackingFile, BackingFormat: t.BackingFormat}
	if err := t.Format.Create.New(out, a); err != nil {
		return fmt.Errorf("convert to %s: %w", dst, err)
	}
	opts := format.Options(t.Open)
	opts.Format, opts.ReadOnly = t.Format.Name, false
	opts.OpenFile = t.openFile(o.openFile(opts.OpenFile))
	d, err := diskserve.Open(dst, opts)
	if err != nil {
		return err
	}
	co := t.Copy
	co.Compress = co.Compress || t.Compress
	if t.BackingFile != "" {
		err = diffcopy.Copy(ctx, d, src, d, false, progress)
	} else {
		err = Copy(ctx, d, src, co, progress)
	}
	if err == nil && t.Bitmaps {
		err = copyBitmaps(d, src)
	}
	if err == nil && !t.Unsafe {
		err = diskserve.Flush(d)
	}
	return errors.Join(err, d.Close())
}

// openFile returns open, writing behind ([format.WriteBehind]) unless t
// is unsafe. Unsafe, the files opened for writing ignore flushes
// ([format.IgnoreFlushes]), as qemu-img's unsafe cache mode does: nothing
// waits for the disk, and the writes are better left in the page cache.
func (t Target) openFile(open func(string, bool) (diskserve.DiskFile, error)) func(string, bool) (diskserve.DiskFile, error) {
	if !t.Unsafe {
		return format.WriteBehind(open)
	}
	return format.IgnoreFlushes(open)
}

// bitmapWriter is what a format offers to make persistent dirty bitmaps
// (qcow2 does).
type bitmapWriter interface {
	AddBitmap(name string, granularity int64, enabled bool) error
	MergeBitmap(name string, src diskserve.DirtyBitmap) error
}

// copyBitmaps gives d a copy of every dirty bitmap of src, with its name,
// granularity, state and bits. A bitmap that src cannot vouch for (left in
// use by a crash) fails the copy, as in qemu-img convert --bitmaps.
func copyBitmaps(d, src diskserve.DiskFile) error {
	bms := diskserve.ListBitmaps(src)
	if len(bms) == 0 {
		return nil
	}
	w, ok := d.(bitmapWriter)
	if !ok {
		return fmt.Errorf("--bitmaps: the %s format keeps no dirty bitmaps", diskserve.Describe(d).Format)
	}
	for _, bi := range bms {
		b, err := diskserve.FindDirtyBitmap(src, bi.Name)
		if err != nil {
			return fmt.Errorf("--bitmaps: %w", err)
		}
		if err := w.AddBitmap(bi.Name, bi.Granularity, bi.Enabled); err != nil {
			return err
		}
		if err := w.MergeBitmap(bi.Name, b); err != nil {
			return err
		}
	}
	return nil
}

// SyncDir makes a directory's entries durable.
func SyncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(f.Sync(), f.Close())
}

// Copy copies the content of src into dst, a disk at least as large that
// reads as zeroes (unless o.Dirty): ranges of src that read as zeroes, and
// parts of data that are all zero, are skipped (o.Sparse). Several workers
// read and write pieces at once.
func Copy(ctx context.Context, dst, src diskserve.DiskFile, o CopyOptions, progress func(int64)) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	size := src.Size()
	compress := o.Compress
	pieceSize, grain := int64(copyPiece), int64(copyGrain)
	switch {
	case o.Sparse > 0:
		grain = o.Sparse
	case o.Sparse < 0 || o.Offload:
		grain = 0 // no zero detection: every byte of data is written
	}
	workers := o.Workers
	if workers <= 0 {
		workers = copyWorkers
	}
	if compress {
		if grain = diskserve.Describe(dst).ClusterSize; grain <= 0 {
			return fmt.Errorf("compressed copy: the target has no cluster size: %w", diskserve.ErrUnsupported)
		}
		pieceSize = max(pieceSize, grain)
	}
	report := func(n int64) {
		if progress != nil {
			progress(n)
		}
	}
	type piece struct {
		off, n int64
		zero   bool // src reads zeroes there: zero it in dst
	}
	jobs := make(chan piece, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			buf := make([]byte, pieceSize+2*grain)
			zero := make([]byte, grain)
			for p := range jobs {
				if p.zero {
					var err error
					if o.Sparse < 0 {
						err = diskserve.WriteZeroBytes(dst, p.off, p.n)
					} else {
						err = diskserve.WriteZeroes(dst, p.off, p.n, diskserve.ZeroMayUnmap)
					}
					if err != nil {
						cancel(err)
					}
					report(p.n)
					continue
				}
				if o.Offload && !compress {
					done, err := offload(dst, src, p.off, p.n)
					if err != nil {
						cancel(err)
						continue
					}
					if done {
						report(p.n)
						continue
					}
				}
				off, end := p.off, p.off+p.n
				if compress { // whole clusters
					off, end = off&^(grain-1), min((end+grain-1)&^(grain-1), size)
				}
				b := buf[:end-off]
				if err := diskserve.ReadFullAt(src, b, off); err != nil {
					cancel(fmt.Errorf("read %d bytes at %d: %w", end-off, off, err))
					continue
				}
				// Grains of zeroes are skipped. Data goes one cluster
				// at a time when compressed, else each run of data
				// grains in one write.
				run := int64(-1) // where the run being gathered starts
				write := func(from, to int64) bool {
					var err error
					if compress {
						err = diskserve.WriteCompressed(dst, b[from:to], off+from)
					} else {
						_, err = dst.WriteAt(b[from:to], off+from)
					}
					if err != nil {
						cancel(err)
					}
					return err == nil
				}
				// A dirty target gets its zero grains zeroed, in runs.
				zrun := int64(-1)
				zeroRun := func(from, to int64) bool {
					if err := diskserve.WriteZeroes(dst, off+from, to-from, diskserve.ZeroMayUnmap); err != nil {
						cancel(err)
						return false
					}
					return true
				}
				ok := true
				if grain == 0 { // every byte
					ok = write(0, end-off)
				}
				for k := int64(0); ok && grain > 0 && k < end-off; k += grain {
					stop := min(end-off, k+grain)
					if bytes.Equal(b[k:stop], zero[:stop-k]) {
						if run >= 0 {
							ok, run = write(run, k), -1
						}
						if o.Dirty && zrun < 0 {
							zrun = k
						}
						continue
					}
					if zrun >= 0 {
						ok, zrun = ok && zeroRun(zrun, k), -1
					}
					switch {
					case compress:
						ok = ok && write(k, stop)
					case run < 0:
						run = k
					}
				}
				if ok && run >= 0 {
					ok = write(run, end-off)
				}
				if ok && zrun >= 0 {
					zeroRun(zrun, end-off)
				}
				report(p.n)
			}
		})
	}
	feed := func(e diskserve.Extent) bool {
		if e.Flags&diskserve.ExtentZero != 0 {
			if !o.Dirty && o.Sparse >= 0 {
				report(e.Len)
				return true
			}
			for off, end := e.Off, e.Off+e.Len; off < end; off += 64 * copyPiece {
				select {
				case jobs <- piece{off: off, n: min(64*copyPiece, end-off), zero: true}:
				case <-ctx.Done():
					return false
				}
			}
			return true
		}
		// Pieces end on multiples of pieceSize, so that only pieces at
		// the edges of an extent share a cluster.
		for o, end := e.Off, e.Off+e.Len; o < end; {
			next := min((o/pieceSize+1)*pieceSize, end)
			select {
			case jobs <- piece{off: o, n: next - o}:
			case <-ctx.Done():
				return false
			}
			o = next
		}
		return true
	}
	if err := diskserve.WalkExtents(src, 0, size, feed); err != nil {
		cancel(err)
	}
	close(jobs)
	wg.Wait()
	return context.Cause(ctx)
}

// offload copies [off, off+n) of src into dst inside the kernel, with
// copy_file_range, where both map the range onto host files through the
// page cache; it reports false, having copied nothing, where they do not
// or the file systems cannot.
func offload(dst, src diskserve.DiskFile, off, n int64) (bool, error) {
	sr, ok := diskserve.MapHost(src, off, n, false)
	if !ok {
		return false, nil
	}
	defer sr.Done()
	dr, ok := diskserve.MapHost(dst, off, n, true)
	if !ok {
		return false, nil
	}
	defer dr.Done()
	if sr.Direct() || dr.Direct() {
		return false, nil
	}
	so, do := sr.Off, dr.Off
	for left := n; left > 0; {
		k, err := unix.CopyFileRange(sr.FD, &so, dr.FD, &do, int(min(left, 1<<30)), 0)
		switch {
		case err != nil && left == n && (errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP)):
			return false, nil // not between these files: through memory
		case err != nil:
			return true, fmt.Errorf("copy_file_range %d bytes at %d: %w", left, off+n-left, err)
		case k == 0:
			return true, fmt.Errorf("copy_file_range at %d: %w", off+n-left, io.ErrUnexpectedEOF)
		}
		left -= int64(k)
	}
	return true, nil
}
