package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

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
	)
	cmd := &cobra.Command{
		Use:   "convert [-p] [-c] [-f FORMAT] -O FORMAT [-o OPT=VALUE,...] SRC DST",
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
cost a decompression. -p shows a progress bar on a terminal.`,
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
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			d, err := src.open(args[0], true, nil)
			if err != nil {
				return err
			}
			defer d.Close()
			var progress func(int64)
			if showProgress && term.IsTerminal(int(os.Stderr.Fd())) {
				bar := progressbar.NewOptions64(d.Size(),
					progressbar.OptionSetWriter(os.Stderr),
					progressbar.OptionSetDescription("converting"),
					progressbar.OptionShowBytes(true),
					progressbar.OptionSetPredictTime(true),
					progressbar.OptionFullWidth(),
					progressbar.OptionClearOnFinish())
				defer bar.Finish()
				progress = func(n int64) { bar.Add64(n) }
			}
			return newimage.Convert(ctx, d, args[1], newimage.Target{Format: f, Options: opts, Compress: compress, Bitmaps: bitmaps}, progress)
		},
	}
	fl := cmd.Flags()
	src.register(fl, withSnapshotL|withConfine, "SRC")
	fl.StringVarP(&dstFmt, "output-format", "O", "raw", "format of DST: "+strings.Join(writableNames(), ", "))
	fl.StringArrayVarP(&options, "options", "o", nil, "options of the output format, OPT=VALUE[,OPT=VALUE...]")
	fl.BoolVarP(&compress, "compress", "c", false, "store the data compressed (qcow2: zlib, or zstd with -o compression_type=zstd)")
	fl.BoolVarP(&showProgress, "progress", "p", false, "show a progress bar")
	fl.BoolVar(&bitmaps, "bitmaps", false, "copy SRC's persistent dirty bitmaps (qcow2 to qcow2), as qemu-img convert --bitmaps")
	return cmd
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
