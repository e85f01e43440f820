package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/compare"
)

// Exit codes of compare, those of qemu-img compare.
const (
	compareDiffer     = 1 // the images differ
	compareOpenFailed = 2 // an image could not be opened
	compareStatusFail = 3 // an image's allocation could not be learnt
	compareReadFailed = 4 // an image could not be read
)

func newCompareCommand() *cobra.Command {
	var (
		a                     openFlags
		bFormat               string
		strict, quiet, bar, u bool
	)
	cmd := &cobra.Command{
		Use:   "compare [-f FMT] [-F FMT] [-s] [-q] [-p] IMAGE1 IMAGE2",
		Short: "Compare the contents of two images",
		Long: `compare reports whether two images read the same, as qemu-img compare
does: "Images are identical.", or the first 512-byte sector at which they
differ ("Content mismatch at offset N!"). Images of different sizes are
equal when the larger one's tail reads as zeroes ("Warning: Image size
mismatch!"). Ranges both images report as zeroes are not read, so sparse
images compare in the time their data takes to read; data is read on
several goroutines at once.

-s (strict) also fails on differing sizes and on ranges whose allocation
differs: data in one image, zeroes or unallocated in the other, as
"diskserve map" reports them.

Exit status, as qemu-img compare: 0 the images are identical, 1 they
differ, 2 an image could not be opened, 3 an image's allocation could not
be read, 4 an image's data could not be read.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 2 {
				return fmt.Errorf("compare takes two images, got %d arguments (see --help)", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			b := a
			b.format = bFormat
			var disks [2]diskserve.DiskFile
			for k, f := range []*openFlags{&a, &b} {
				d, err := f.open(args[k], true, nil)
				if err != nil {
					fmt.Fprintf(cmd.ErrOrStderr(), "diskserve: %v\n", err)
					return exitCode(compareOpenFailed)
				}
				defer d.Close()
				disks[k] = d
			}
			var opts compare.Options
			opts.Strict = strict
			var done func()
			opts.Progress, done = newProgress(bar && !quiet, max(disks[0].Size(), disks[1].Size()), "comparing")
			defer done()
			r, err := compare.Disks(cmd.Context(), disks[0], disks[1], opts)
			if err != nil {
				var ce *compare.Error
				if !errors.As(err, &ce) {
					return err
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "diskserve: %s: %v\n", args[ce.Disk], ce)
				if compare.IsStatus(err) {
					return exitCode(compareStatusFail)
				}
				return exitCode(compareReadFailed)
			}
			say := func(format string, args ...any) {
				if !quiet {
					fmt.Fprintf(cmd.OutOrStdout(), format, args...)
				}
			}
			if r.SizesDiffer && (r.What == compare.Same || r.Off >= min(disks[0].Size(), disks[1].Size())) {
				say("Warning: Image size mismatch!\n")
			}
			switch r.What {
			case compare.Size:
				say("Strict mode: Image size mismatch!\n")
			case compare.Status:
				say("Strict mode: Offset %d block status mismatch!\n", r.Off)
			case compare.Content:
				say("Content mismatch at offset %d!\n", r.Off)
			default:
				say("Images are identical.\n")
				return nil
			}
			return exitCode(compareDiffer)
		},
	}
	fl := cmd.Flags()
	a.register(fl, withConfine, "IMAGE1")
	fl.StringVarP(&bFormat, "b-format", "F", "", "format of IMAGE2; detected when omitted")
	fl.BoolVarP(&strict, "strict", "s", false, "also fail on differing sizes and allocation")
	fl.BoolVarP(&quiet, "quiet", "q", false, "print nothing; the exit status says")
	fl.BoolVarP(&bar, "progress", "p", false, "show a progress bar")
	fl.BoolVarP(&u, "force-share", "U", false, "accepted for qemu-img's sake: both images are opened read-only, with a shared lock that only a writer's lock refuses")
	return cmd
}
