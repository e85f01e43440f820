package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
)

// Exit codes of check, those of qemu-img check.
const (
	checkFailed       = 1  // the check could not be completed
	checkCorrupt      = 2  // corruptions remain
	checkLeaks        = 3  // leaks remain, no corruptions
	checkNotSupported = 63 // the format has nothing to check
)

// exitCode is an error that ends the command with a given status, after
// the command has printed what it has to say.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func newCheckCommand() *cobra.Command {
	var (
		flags  imageFlags
		repair string
	)
	cmd := &cobra.Command{
		Use:   "check [-f FORMAT] [--output=human|json] [-r leaks|all] IMAGE",
		Short: "Check an image's metadata for errors and leaks",
		Long: `check verifies an image's metadata as qemu-img check does: for qcow2, that
every cluster's refcount matches the references to it (from the header,
the L1, L2 and refcount tables, the snapshots and the data) and that the
COPIED flags agree with the refcounts. A refcount below its references is an
error (data may be lost), one above is a leak (space is wasted).

-r leaks frees leaked clusters; -r all also raises refcounts that are too
low. Repairs open the image read-write.

Exit status, as qemu-img check: 0 no problem, 1 the check could not be
completed, 2 errors remain, 3 leaks remain (and no errors), 63 the format
has no checks.`,
		Args: oneImage,
		RunE: func(cmd *cobra.Command, args []string) error {
			level := diskserve.RepairNone
			switch repair {
			case "":
			case "leaks":
				level = diskserve.RepairLeaks
			case "all":
				level = diskserve.RepairAll
			default:
				return fmt.Errorf("-r must be leaks or all, not %q", repair)
			}
			return flags.withImage(args, level == diskserve.RepairNone, func(d diskserve.DiskFile) error {
				return runCheck(cmd.OutOrStdout(), cmd.ErrOrStderr(), d, args[0], level, flags.output == "json")
			})
		},
	}
	flags.register(cmd.Flags())
	cmd.Flags().StringVarP(&repair, "repair", "r", "", "repair: leaks or all")
	return cmd
}

// runCheck checks d, prints the report and returns the exit status as an
// exitCode error.
func runCheck(stdout, stderr io.Writer, d diskserve.DiskFile, name string, level diskserve.Repair, asJSON bool) error {
	info := diskserve.Describe(d)
	r, err := diskserve.Check(d, level)
	switch {
	case errors.Is(err, diskserve.ErrUnsupported) && !errors.As(err, new(*diskserve.FormatError)):
		fmt.Fprintf(stderr, "diskserve: %s: %s images have no metadata to check\n", name, info.Format)
		return exitCode(checkNotSupported)
	case err != nil:
		return fmt.Errorf("check %s: %w", name, err)
	}
	if asJSON {
		err = writeQemuJSON(stdout, checkJSON{
			Filename: name, Format: info.Format,
			Corruptions: r.Corruptions - r.CorruptionsFixed, Leaks: r.Leaks - r.LeaksFixed,
			CorruptionsFixed: r.CorruptionsFixed, LeaksFixed: r.LeaksFixed,
			ImageEndOffset: r.ImageEndOffset, TotalClusters: r.TotalClusters, AllocatedClusters: r.Allocated,
			FragmentedClusters: r.Fragmented, CompressedClusters: r.Compressed,
		})
	} else {
		writeCheck(stdout, r)
	}
	switch {
	case err != nil:
		return err
	case r.Corruptions > r.CorruptionsFixed:
		return exitCode(checkCorrupt)
	case r.Leaks > r.LeaksFixed:
		return exitCode(checkLeaks)
	}
	return nil
}

// checkJSON is the shape of qemu-img check --output=json.
type checkJSON struct {
	ImageEndOffset     int64  `json:"image-end-offset,omitempty"`
	TotalClusters      int64  `json:"total-clusters,omitempty"`
	CheckErrors        int64  `json:"check-errors"`
	Leaks              int64  `json:"leaks,omitempty"`
	Corruptions        int64  `json:"corruptions,omitempty"`
	LeaksFixed         int64  `json:"leaks-fixed,omitempty"`
	CorruptionsFixed   int64  `json:"corruptions-fixed,omitempty"`
	AllocatedClusters  int64  `json:"allocated-clusters,omitempty"`
	FragmentedClusters int64  `json:"fragmented-clusters,omitempty"`
	CompressedClusters int64  `json:"compressed-clusters,omitempty"`
	Filename           string `json:"filename"`
	Format             string `json:"format"`
}

// writeCheck prints a report in qemu-img check's words.
func writeCheck(w io.Writer, r diskserve.CheckReport) {
	for _, m := range r.Messages {
		fmt.Fprintln(w, m)
	}
	if r.LeaksFixed+r.CorruptionsFixed > 0 {
		fmt.Fprintf(w, "The following inconsistencies were found and repaired:\n\n    %d leaked clusters\n    %d corruptions\n\n", r.LeaksFixed, r.CorruptionsFixed)
	}
	corrupt, leaks := r.Corruptions-r.CorruptionsFixed, r.Leaks-r.LeaksFixed
	if corrupt == 0 && leaks == 0 {
		fmt.Fprintln(w, "No errors were found on the image.")
	}
	if corrupt > 0 {
		fmt.Fprintf(w, "\n%d errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", corrupt)
	}
	if leaks > 0 {
		fmt.Fprintf(w, "\n%d leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", leaks)
	}
	if r.TotalClusters > 0 && r.Allocated > 0 {
		a := float64(r.Allocated)
		fmt.Fprintf(w, "%d/%d = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n", r.Allocated, r.TotalClusters,
			100*a/float64(r.TotalClusters), 100*float64(r.Fragmented)/a, 100*float64(r.Compressed)/a)
	}
	if r.ImageEndOffset != 0 {
		fmt.Fprintf(w, "Image end offset: %d\n", r.ImageEndOffset)
	}
}
