package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/newimage"
)

func newConvertCommand() *cobra.Command {
	var (
		src          openFlags
		dstFmt       string
		options      []string
		compress     bool
		bitmaps      bool
		showProgress bool
		into, isZero bool
		backing      string
		backingFmt   string
		sparse       string
		workers      int
		outOfOrder   bool
		targetCache  string
		offload      bool
	)
	cmd := &cobra.Command{
		Use:   "convert [-p] [-c] [-n [--target-is-zero]] [-f FORMAT] [-T CACHE] [-t CACHE] [-O FORMAT] [-o OPT=VALUE,...] [-B BACKING [-F FORMAT]] [-S SIZE] [-m N] [-W] SRC DST",
		Short: "Convert an image to another format",
		Long: `convert copies the guest-visible content of SRC, of any format diskserve
opens, into a new image DST of format -O: ` + strings.Join(writableNames(), ", ") + `.

Ranges that read as zeroes (holes, zero clusters, DONT_CARE chunks, and data
blocks that are all zero) are not written, so the output stays sparse.
DST's files are written unnamed in its directory (O_TMPFILE; temporary
names where the file system has none) and named when complete and
durable: an interrupted conversion, even a killed one, leaves no partial
DST.

-o takes the output format's options:
` + createOptionsHelp(func(*diskserve.Creator) bool { return true }) + `
-c stores the data compressed, where the output format can (as qemu-img
convert -c does), compressing on several cores; reads of compressed data
cost a decompression. -p shows a progress bar on a terminal.

-n writes into DST as it is, an image of format -O that exists (a file, a
block device, a logical volume), in place and under no other name; it
must be at least as large as SRC. The ranges where SRC reads zeroes are
zeroed in it too, unless --target-is-zero says it reads zeroes already.

-B BACKING (with -F, its format) makes DST an overlay of BACKING that
holds only the sectors where SRC reads differently from it: SRC and
BACKING are compared, rather than assumed to share content as qemu-img
does. DST then reads exactly as SRC.

-S SIZE: runs of SIZE bytes of zeroes (aligned) in SRC's data are left
as holes (default 4K, as qemu-img); -S 0 writes every byte, zeroes too,
for a fully allocated DST. -m N copies N pieces at once (default 4).
diskserve always writes out of order, as qemu-img -W does: -W is
accepted. -C copies data inside the kernel (copy_file_range) where SRC
and DST are raw files (through the page cache, not under O_DIRECT), and
elsewhere through memory; either way data extents are copied whole, zero
runs and all, as qemu-img -C does. -T is SRC's cache mode (as --cache); -t is DST's: writeback
(the default: DST is made durable before it is named), unsafe (as
qemu-img's default: nothing synced, not even the format's metadata
after its data; faster, lost or inconsistent after a crash soon
after), none or directsync (DST filled with O_DIRECT, new or not; the
formats written whole, streamOptimized VMDK, zstd and Android sparse,
through the page cache and synced), writethrough (as writeback).`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := diskserve.LookupFormat(format.All(), dstFmt)
			if err != nil {
				return fmt.Errorf("convert -O: %w", err)
			}
			opts, err := diskserve.ParseCreateOptions(options)
			if err != nil {
				return fmt.Errorf("convert to %s: %w", args[1], err)
			}
			if st, err := os.Stat(args[1]); err == nil && st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0 && f.Name == "raw" {
				into = true // a block device is written in place, as qemu-img does
			}
			if (backing != "") && into {
				return fmt.Errorf("convert: -B and -n cannot be combined")
			}
			if isZero && !into {
				return fmt.Errorf("convert: --target-is-zero needs -n (a new image reads zeroes already)")
			}
			if backing != "" && backingFmt == "" {
				return fmt.Errorf("convert -B: the backing file's format must be given (-F)")
			}
			mode, err := diskserve.ParseCacheMode(targetCache)
			if err != nil {
				return fmt.Errorf("convert -t: %w", err)
			}
			t := newimage.Target{Format: f, Options: opts, Compress: compress, Bitmaps: bitmaps,
				BackingFile: backing, BackingFormat: backingFmt, Unsafe: mode == diskserve.CacheUnsafe, Direct: mode.Direct()}
			if t.Copy.Sparse, err = parseSparse(sparse); err != nil {
				return err
			}
			t.Copy.Workers, t.Copy.Offload = workers, offload
			if into {
				rc, err := src.remote.config(nil)
				if err != nil {
					return err
				}
				t.Open.OpenFile = format.FileOpener(rc, mode)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			d, err := src.open(args[0], true, nil)
			if err != nil {
				return err
			}
			defer d.Close()
			progress, done := newProgress(showProgress, d.Size(), "converting")
			defer done()
			if into {
				return newimage.ConvertInto(ctx, d, args[1], t, isZero, progress)
			}
			return newimage.Convert(ctx, d, args[1], t, progress)
		},
	}
	fl := cmd.Flags()
	src.register(fl, withSnapshotL|withConfine, "SRC")
	fl.StringVarP(&dstFmt, "output-format", "O", "raw", "format of DST: "+strings.Join(writableNames(), ", "))
	fl.StringArrayVarP(&options, "options", "o", nil, "options of the output format, OPT=VALUE[,OPT=VALUE...]")
	fl.BoolVarP(&compress, "compress", "c", false, "store the data compressed (qcow2: zlib, or zstd with -o compression_type=zstd)")
	fl.BoolVarP(&showProgress, "progress", "p", false, "show a progress bar")
	fl.BoolVar(&bitmaps, "bitmaps", false, "copy SRC's persistent dirty bitmaps (qcow2 to qcow2), as qemu-img convert --bitmaps")
	fl.BoolVarP(&into, "no-create", "n", false, "write into DST as it is, an existing image of format -O (a file or a block device)")
	fl.BoolVar(&isZero, "target-is-zero", false, "with -n: DST reads zeroes already, so zero ranges are not written")
	fl.StringVarP(&backing, "backing", "B", "", "make DST an overlay of BACKING holding only what differs from it")
	fl.StringVarP(&backingFmt, "backing-format", "F", "", "the format of -B's BACKING")
	fl.StringVarP(&sparse, "sparse-size", "S", "4k", "bytes of zeroes that make a hole; 0: write every byte")
	fl.IntVarP(&workers, "parallel", "m", 4, "pieces copied at once")
	fl.BoolVarP(&outOfOrder, "out-of-order", "W", false, "accepted: diskserve always writes out of order")
	fl.StringVarP(&targetCache, "target-cache", "t", string(diskserve.CacheWriteback), "DST's cache mode: writeback, unsafe, none, directsync, writethrough")
	fl.BoolVarP(&offload, "copy-range-offloading", "C", false, "copy data inside the kernel (copy_file_range) where SRC and DST are raw files")
	fl.StringVarP(&src.cache, "source-cache", "T", string(diskserve.CacheWriteback), "SRC's cache mode: writeback, none (O_DIRECT), writethrough, directsync, unsafe")
	return cmd
}

// parseSparse reads -S: a size, 0 for none (returned as -1).
func parseSparse(s string) (int64, error) {
	n, err := diskserve.ParseSize(s)
	switch {
	case err != nil:
		return 0, fmt.Errorf("convert -S: %w", err)
	case n == 0:
		return -1, nil
	case n%512 != 0:
		return 0, fmt.Errorf("convert -S %s: a multiple of 512 is needed", s)
	}
	return n, nil
}

// writableNames names the built-in formats that can be written.
func writableNames() []string {
	var names []string
	for _, f := range newimage.Creatable(format.All()) {
		names = append(names, f.Name)
	}
	return names
}

// createOptionsHelp lists the -o options of the writable formats whose
// Creator pleases want, for help texts.
func createOptionsHelp(want func(*diskserve.Creator) bool) string {
	var b strings.Builder
	for _, f := range newimage.Creatable(format.All()) {
		if !want(f.Create) {
			continue
		}
		if len(f.Create.Options) == 0 {
			fmt.Fprintf(&b, "  %s: none\n", f.Name)
			continue
		}
		fmt.Fprintf(&b, "  %s:\n", f.Name)
		for _, o := range f.Create.Options {
			fmt.Fprintf(&b, "    %-18s %s (default %s)\n", o.Name, o.Help, o.Default)
		}
	}
	return b.String()
}
