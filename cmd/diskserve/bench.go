package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/formatbench"
)

func newBenchCommand() *cobra.Command {
	var (
		formats, patterns, depths []string
		size, output, via, dir    string
		fromJSON                  string
		runtime                   time.Duration
		aio                       aioFlag
		remoteF                   remoteFlags
	)
	cmd := &cobra.Command{
		Use:   "bench [-f FORMAT,...] [--size SIZE] [--pattern PATTERN,...] [--qd N,...] [--aio ENGINE] [--via engine|nbd|fuse] [--output FORMAT] [SOURCE]",
		Short: "Compare disk formats: throughput, IOPS and latency of each",
		Long: `bench builds an image of each format (-f) holding the same content, runs
each pattern at each queue depth on it for --runtime, through diskserve's
I/O engine in process, its NBD server or its FUSE file (--via), and
reports MiB/s, IOPS and latency percentiles (p50, p99, p99.9) side by side.

The content is SOURCE's (an image of any format diskserve opens) or, without
SOURCE, --size bytes of 1 MiB blocks cycling through random data, text and
zeroes. Formats: ` + strings.Join(formatbench.Formats, ", ") + `. Patterns:
seqread and seqwrite (1 MiB requests), randread and randwrite (4 KiB);
writes are skipped on formats that are read-only (android-sparse, zstd).

--output human prints a table; json the figures; svg a grouped bar chart
(one group per pattern and depth, one bar per format); html the chart and
the table; --from-json FILE renders a saved JSON report again. Images are
built in --dir (default: the system's temporary directory) and removed
afterwards. Progress is shown on a terminal.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var c formatbench.Config
			for _, f := range formats {
				if !slices.Contains(formatbench.Formats, f) {
					return fmt.Errorf("unknown format %q (%s)", f, strings.Join(formatbench.Formats, ", "))
				}
			}
			c.Formats = formats
			for _, p := range patterns {
				pt, err := formatbench.PatternByName(p)
				if err != nil {
					return err
				}
				c.Patterns = append(c.Patterns, pt)
			}
			for _, q := range depths {
				n, err := strconv.Atoi(q)
				if err != nil || n < 1 || n > 1024 {
					return fmt.Errorf("queue depth %q is not a number from 1 to 1024", q)
				}
				c.Depths = append(c.Depths, n)
			}
			write := map[string]func(io.Writer, *formatbench.Report) error{
				"human": formatbench.WriteTable,
				"json":  formatbench.WriteJSON,
				"svg":   formatbench.WriteSVG,
				"html":  formatbench.WriteHTML,
			}[output]
			if write == nil {
				return fmt.Errorf("--output must be human, json, svg or html, not %q", output)
			}
			if fromJSON != "" { // render a saved report
				b, err := os.ReadFile(fromJSON)
				if err != nil {
					return err
				}
				var rep formatbench.Report
				if err := json.Unmarshal(b, &rep); err != nil {
					return fmt.Errorf("%s: %w", fromJSON, err)
				}
				return write(os.Stdout, &rep)
			}
			if !slices.Contains(formatbench.Vias, via) {
				return fmt.Errorf("--via must be one of %s, not %q", strings.Join(formatbench.Vias, ", "), via)
			}
			c.Via = via
			self, err := os.Executable()
			if err != nil {
				return err
			}
			c.Self = self
			mode, err := async.ParseMode(aio.mode)
			if err != nil {
				return err
			}
			c.Engine, c.Runtime = mode, runtime
			if len(args) == 1 {
				rc, err := remoteF.config(nil)
				if err != nil {
					return err
				}
				src, err := format.Open(args[0], diskserve.Options{ReadOnly: true, OpenFile: format.FileOpener(rc, diskserve.CacheWriteback)})
				if err != nil {
					return err
				}
				defer src.Close()
				c.Source = src
			} else {
				n, err := diskserve.ParseSize(size)
				if err != nil {
					return fmt.Errorf("--size: %w", err)
				}
				c.Source = formatbench.Generated(n)
			}
			if c.Dir, err = os.MkdirTemp(dir, "diskserve-bench-"); err != nil {
				return err
			}
			defer os.RemoveAll(c.Dir)
			if term.IsTerminal(int(os.Stderr.Fd())) {
				bar := progressbar.NewOptions(len(c.Formats)*len(c.Patterns)*len(c.Depths),
					progressbar.OptionSetWriter(os.Stderr),
					progressbar.OptionSetDescription("measuring"),
					progressbar.OptionSetPredictTime(true),
					progressbar.OptionShowCount(),
					progressbar.OptionClearOnFinish())
				defer bar.Finish()
				c.Progress = func(done, _ int) { bar.Set(done) }
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			rep, err := formatbench.Run(ctx, c)
			if err != nil {
				if ctx.Err() != nil {
					return errors.New("bench interrupted")
				}
				return err
			}
			return write(os.Stdout, rep)
		},
	}
	fl := cmd.Flags()
	fl.StringSliceVarP(&formats, "format", "f", formatbench.Formats, "formats to compare")
	fl.StringVar(&size, "size", "256M", "size of the generated content, without SOURCE")
	fl.StringSliceVar(&patterns, "pattern", []string{"seqread", "seqwrite", "randread", "randwrite"}, "patterns to run")
	fl.StringSliceVar(&depths, "qd", []string{"1", "16"}, "queue depths (requests in flight)")
	fl.DurationVar(&runtime, "runtime", 3*time.Second, "time per format, pattern and depth")
	fl.StringVar(&output, "output", "human", "human, json, svg or html")
	fl.StringVar(&via, "via", formatbench.ViaEngine, "path the requests take: engine (the I/O engine, in process), nbd (diskserve's NBD server over a Unix socket, one connection) or fuse (diskserve's FUSE file, O_DIRECT; needs /dev/fuse)")
	fl.StringVar(&dir, "dir", "", "directory to build the images in")
	fl.StringVar(&fromJSON, "from-json", "", "render the report saved by --output json in FILE instead of measuring")
	aio.register(fl)
	remoteF.register(fl, false)
	return cmd
}
