package main

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/diffcopy"
)

func newRebaseCommand() *cobra.Command {
	var (
		flags                     openFlags
		backing, backingFmt       string
		unsafe, quiet, show, hasB bool
	)
	cmd := &cobra.Command{
		Use:   "rebase [-f FMT] [-u] -b BACKING [-F FMT] [-q] [-p] IMAGE",
		Short: "Change an overlay's backing file",
		Long: `rebase makes BACKING the backing file of IMAGE, as qemu-img rebase does.

In the safe mode (the default), IMAGE reads the same afterwards: wherever
IMAGE leaves a range to its backing chain and BACKING reads differently
there from the old chain, the old chain's bytes are written into IMAGE
first (sectors that differ, in runs). Ranges IMAGE holds itself are not
read, nor ranges both chains report as zeroes; the rest is compared on
four goroutines. The old backing file must open. -b "" rebases onto
nothing: IMAGE then holds everything it read from its chain, a
standalone image. qemu-img compare against the old chain proves the
content unchanged.

-u (unsafe) only records BACKING in the header: for a backing file that
was moved or renamed, or whose format must be recorded. IMAGE's data is
not read, and neither backing file needs to open.

BACKING is named as IMAGE will record it: a relative name is relative to
IMAGE's directory. -F gives its format; it is required with -b (as in
qemu-img), and recorded.

Only qcow2 images record a backing file that can change. The data is
written and made durable before the header changes, in one write: a
crash leaves IMAGE over its old backing file (with some of the new
backing file's differences already written, which the old chain reads
the same) or over the new one.`,
		Args: oneImage,
		RunE: func(cmd *cobra.Command, args []string) error {
			img := args[0]
			if !hasB {
				return errors.New("-b BACKING is required (-b \"\" for none)")
			}
			if backing != "" && backingFmt == "" {
				return fmt.Errorf("could not change the backing file to %q: backing format must be specified (-F)", backing)
			}
			opts, err := flags.options(false, nil)
			if err != nil {
				return err
			}
			opts.NoBacking = unsafe
			opts.OpenFile = format.WriteBehind(opts.OpenFile)
			d, err := format.Open(img, opts)
			if err != nil {
				return err
			}
			closed := false
			defer func() {
				if !closed {
					d.Close()
				}
			}()
			if !unsafe {
				var nb diskserve.DiskFile
				if backing != "" {
					path := backing
					if !filepath.IsAbs(path) {
						path = filepath.Join(filepath.Dir(img), path)
					}
					bopts := opts
					bopts.Format, bopts.ReadOnly, bopts.NoBacking = backingFmt, true, false
					if nb, err = format.Open(path, bopts); err != nil {
						return fmt.Errorf("could not open new backing file %q: %w", backing, err)
					}
					defer nb.Close()
				}
				progress, done := newProgress(show && !quiet, d.Size(), "rebasing")
				defer done()
				if err := diffcopy.Copy(cmd.Context(), d, d, nb, true, progress); err != nil {
					return fmt.Errorf("rebase %s: %w", img, err)
				}
				if err := diskserve.Flush(d); err != nil {
					return fmt.Errorf("rebase %s: %w", img, err)
				}
			}
			if backing == "" {
				backingFmt = ""
			}
			if err := diskserve.SetBacking(d, backing, backingFmt); err != nil {
				if errors.Is(err, errors.ErrUnsupported) && !errors.As(err, new(*diskserve.FormatError)) {
					return fmt.Errorf("%s: %s images do not record a backing file that can change", img, diskserve.Describe(d).Format)
				}
				return fmt.Errorf("could not change the backing file to %q: %w", backing, err)
			}
			closed = true
			return d.Close()
		},
	}
	flags.register(cmd.Flags(), withConfine, "IMAGE")
	cmd.Flags().StringVarP(&backing, "backing", "b", "", "the new backing file, as IMAGE records it (relative to IMAGE's directory); \"\" for none")
	cmd.Flags().StringVarP(&backingFmt, "backing-format", "F", "", "the new backing file's format, recorded in IMAGE")
	cmd.Flags().BoolVarP(&unsafe, "unsafe", "u", false, "only record the new backing file; IMAGE's content may change")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print nothing")
	cmd.Flags().BoolVarP(&show, "progress", "p", false, "show a progress bar")
	cmd.PreRun = func(cmd *cobra.Command, args []string) { hasB = cmd.Flags().Changed("backing") }
	return cmd
}
