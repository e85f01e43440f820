package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/format/sparse"
	"github.com/diskserve/diskserve/format/zstd"
)

const (
	convertPiece   = 1 << 20  // bytes one worker reads and writes at a time
	convertZero    = 64 << 10 // granularity of skipping zero data
	convertWorkers = 4
)

func newConvertCommand() *cobra.Command {
	var (
		srcFmt, dstFmt string
		options        []string
		compress       bool
		showProgress   bool
		verify         bool
		snapshot       string
	)
	cmd := &cobra.Command{
		Use:   "convert [-p] [-c] [-f FORMAT] -O FORMAT [-o OPT=VALUE,...] SRC DST",
		Short: "Convert an image to another format",
		Long: `convert copies the guest-visible content of SRC, of any format diskserve
opens, into a new image DST of format -O: raw, qcow2, android-sparse or
zstd (the seekable format, compressed on every core).

Ranges that read as zeroes (holes, zero clusters, DONT_CARE chunks, and data
blocks that are all zero) are not written, so the output stays sparse.
DST is written under a temporary name in its directory and renamed when
complete: an interrupted conversion leaves no partial DST.

Options (-o): for qcow2, those of create (cluster_size, compat,
refcount_bits, compression_type, lazy_refcounts, extended_l2); for
android-sparse, block_size (default 4096); for zstd, frame_size (default
256K), level (1 to 22, default 3) and checksum (on or off, default on).
-c compresses each qcow2 cluster (as qemu-img convert -c does), on several
cores; reads of compressed clusters cost a decompression. -p shows a
progress bar on a terminal.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if compress && dstFmt != "qcow2" {
				return fmt.Errorf("convert -c: only qcow2 output can be compressed, not %s", dstFmt)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			src, err := format.Open(args[0], diskserve.Options{Format: srcFmt, ReadOnly: true, Verify: verify, Snapshot: snapshot})
			if err != nil {
				return err
			}
			defer src.Close()
			var progress func(int64)
			if showProgress && term.IsTerminal(int(os.Stderr.Fd())) {
				bar := progressbar.NewOptions64(src.Size(),
					progressbar.OptionSetWriter(os.Stderr),
					progressbar.OptionSetDescription("converting"),
					progressbar.OptionShowBytes(true),
					progressbar.OptionSetPredictTime(true),
					progressbar.OptionFullWidth(),
					progressbar.OptionClearOnFinish())
				defer bar.Finish()
				progress = func(n int64) { bar.Add64(n) }
			}
			return convert(ctx, src, args[1], dstFmt, options, compress, progress)
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&srcFmt, "format", "f", "", "format of SRC; detected when omitted")
	fl.StringVarP(&dstFmt, "output-format", "O", "raw", "format of DST: raw, qcow2, android-sparse or zstd")
	fl.StringArrayVarP(&options, "options", "o", nil, "options of the output format, OPT=VALUE[,OPT=VALUE...]")
	fl.BoolVarP(&compress, "compress", "c", false, "compress qcow2 output clusters (zlib, or zstd with -o compression_type=zstd)")
	fl.BoolVarP(&showProgress, "progress", "p", false, "show a progress bar")
	fl.BoolVar(&verify, "verify", false, "verify SRC's checksums (Android sparse CRC32 chunks) before converting")
	fl.StringVarP(&snapshot, "snapshot", "l", "", "convert the qcow2 internal snapshot NAME (or ID) of SRC, as qemu-img convert -l does")
	return cmd
}

// convert writes src to dst as format, through a temporary file that is
// renamed to dst only when complete.
func convert(ctx context.Context, src diskserve.DiskFile, dst, dstFmt string, options []string, compress bool, progress func(int64)) (err error) {
	tmp := filepath.Join(filepath.Dir(dst), "."+filepath.Base(dst)+".diskserve-"+strconv.Itoa(os.Getpid()))
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
		if ctx.Err() != nil {
			err = fmt.Errorf("convert interrupted (%v): %s was not written", context.Cause(ctx), dst)
		}
	}()
	switch dstFmt {
	case "raw", "qcow2":
		if err := createTarget(tmp, dstFmt, src.Size(), options); err != nil {
			return fmt.Errorf("convert to %s: %w", dst, err)
		}
		out, err := format.Open(tmp, diskserve.Options{Format: dstFmt})
		if err != nil {
			return err
		}
		if err := copyDisk(ctx, out, src, compress, progress); err != nil {
			out.Close()
			return err
		}
		if err := diskserve.Flush(out); err != nil {
			out.Close()
			return err
		}
		if err := out.Close(); err != nil {
			return err
		}
	case sparse.Name, zstd.Name:
		write, err := streamWriter(dstFmt, options, src, progress)
		if err != nil {
			return fmt.Errorf("convert to %s: %w", dst, err)
		}
		f, err := os.Create(tmp)
		if err != nil {
			return err
		}
		if err := write(ctx, f); err != nil {
			f.Close()
			return err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	default:
		return fmt.Errorf("convert: cannot write format %q (raw, qcow2, %s and %s can be written)", dstFmt, sparse.Name, zstd.Name)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

// createTarget makes an empty raw or qcow2 image of size bytes.
func createTarget(path, dstFmt string, size int64, options []string) error {
	if dstFmt == "raw" {
		if len(options) > 0 {
			return errors.New("raw images take no options")
		}
		return createRaw(path, size)
	}
	o, err := qcow2Options(options)
	if err != nil {
		return err
	}
	o.Size = size
	return qcow2.Create(path, o)
}

// streamWriter returns the writer of a format that is written front to
// back into a file, with its -o options applied.
func streamWriter(dstFmt string, options []string, src diskserve.DiskFile, progress func(int64)) (func(context.Context, *os.File) error, error) {
	var (
		blockSize int64
		zo        zstd.WriteOptions
	)
	for _, kv := range strings.Split(strings.Join(options, ","), ",") {
		if kv == "" {
			continue
		}
		k, v, _ := strings.Cut(kv, "=")
		var err error
		switch {
		case dstFmt == sparse.Name && k == "block_size":
			blockSize, err = parseSize(v)
		case dstFmt == zstd.Name && k == "frame_size":
			zo.FrameSize, err = parseSize(v)
		case dstFmt == zstd.Name && k == "level":
			zo.Level, err = strconv.Atoi(v)
		case dstFmt == zstd.Name && k == "checksum":
			var on bool
			on, err = parseOnOff(v)
			zo.NoChecksum = !on
		default:
			return nil, fmt.Errorf("unknown %s option %q (%s: block_size; %s: frame_size, level, checksum)", dstFmt, k, sparse.Name, zstd.Name)
		}
		if err != nil {
			return nil, fmt.Errorf("option %s: %w", k, err)
		}
	}
	if dstFmt == sparse.Name {
		return func(ctx context.Context, f *os.File) error { return sparse.Write(ctx, f, src, blockSize, progress) }, nil
	}
	return func(ctx context.Context, f *os.File) error { return zstd.Write(ctx, f, src, zo, progress) }, nil
}

// compressedWriter is a target that can store a cluster compressed
// (qcow2).
type compressedWriter interface {
	WriteCompressed(p []byte, off int64) error
}

// copyDisk copies the content of src into dst, a fresh image that reads as
// zeroes: ranges of src that read as zeroes, and pieces of data that are
// all zero, are skipped. Several workers read and write pieces at once.
// With compress, dst stores each cluster compressed (workers compress in
// parallel); a piece is then widened to whole clusters.
func copyDisk(ctx context.Context, dst, src diskserve.DiskFile, compress bool, progress func(int64)) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	size := src.Size()
	pieceSize, grain := int64(convertPiece), int64(convertZero)
	var cw compressedWriter
	if compress {
		var ok bool
		if cw, ok = dst.(compressedWriter); !ok {
			return errors.New("convert -c: only qcow2 output can be compressed")
		}
		grain = diskserve.Describe(dst).ClusterSize
		pieceSize = max(pieceSize, grain)
	}
	type piece struct{ off, n int64 }
	jobs := make(chan piece, convertWorkers)
	var wg sync.WaitGroup
	report := func(n int64) {
		if progress != nil {
			progress(n)
		}
	}
	for range convertWorkers {
		wg.Go(func() {
			buf := make([]byte, pieceSize+2*grain)
			zero := make([]byte, grain)
			for p := range jobs {
				off, end := p.off, p.off+p.n
				if cw != nil { // whole clusters
					off, end = off&^(grain-1), min((end+grain-1)&^(grain-1), size)
				}
				b := buf[:end-off]
				if got, err := src.ReadAt(b, off); int64(got) != end-off {
					cancel(fmt.Errorf("read %d bytes at %d: %w", end-off, off, err))
					continue
				}
				for k := int64(0); k < end-off; k += grain {
					part := b[k:min(end-off, k+grain)]
					if bytes.Equal(part, zero[:len(part)]) {
						continue
					}
					var err error
					if cw != nil {
						err = cw.WriteCompressed(part, off+k)
					} else {
						_, err = dst.WriteAt(part, off+k)
					}
					if err != nil {
						cancel(err)
						break
					}
				}
				report(p.n)
			}
		})
	}
	var ext []diskserve.Extent
feed:
	for off := int64(0); off < size; off += 1 << 30 {
		var err error
		if ext, err = diskserve.Extents(src, ext[:0], off, min(1<<30, size-off)); err != nil {
			cancel(err)
			break
		}
		for _, e := range ext {
			if e.Flags&diskserve.ExtentZero != 0 {
				report(e.Len)
				continue
			}
			// Pieces end on multiples of pieceSize, so that only pieces
			// at the edges of an extent share a cluster.
			for o, end := e.Off, e.Off+e.Len; o < end; {
				next := min((o/pieceSize+1)*pieceSize, end)
				select {
				case jobs <- piece{o, next - o}:
				case <-ctx.Done():
					break feed
				}
				o = next
			}
		}
	}
	close(jobs)
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return err
	}
	return nil
}
