package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
)

func newAmendCommand() *cobra.Command {
	var (
		flags   openFlags
		options []string
		quiet   bool
		force   bool
	)
	cmd := &cobra.Command{
		Use:   "amend [-f FMT] -o OPT=VALUE,... [-q] IMAGE",
		Short: "Change options of an existing image",
		Long: `amend changes options of IMAGE in place, as qemu-img amend does. qcow2
takes:

  compat=0.10|1.1    the version: 1.1 upgrades a version 2 image; 0.10
                     downgrades one, its zero clusters (snapshots' too)
                     expanded first as in qemu-img; refused, before
                     anything changes, with bitmaps (qemu-img 7.2
                     downgrades and leaves them inconsistent, their
                     clusters leaked: remove them first), extended L2
                     entries, zstd or refcounts of other than 16 bits
  lazy_refcounts=on|off
  size=SIZE          as resize (shrinking too)
  backing_file=NAME, backing_fmt=FORMAT
                     record another backing file or format, as rebase -u:
                     the data is not touched (qemu-img 7.2 refuses this)
  refcount_bits=N    the refcount width, 1 to 64 bits: new refcount
                     structures written after the end of the file, then
                     one header write switches to them (a crash leaves the
                     old ones or the new); refused where a count does not
                     fit

Options only creation sets (cluster_size, extended_l2, compression_type,
preallocation) are refused, as in qemu-img. Other formats have nothing to
amend.`,
		Args: oneImage,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(options) == 0 {
				return errors.New("must specify options (-o)")
			}
			opts, err := diskserve.ParseCreateOptions(options)
			if err != nil {
				return err
			}
			d, err := flags.open(args[0], false, nil)
			if err != nil {
				return err
			}
			fmtName := diskserve.Describe(d).Format
			f, err := diskserve.LookupFormat(format.All(), fmtName)
			if err != nil || f.Create == nil || f.Create.Amend == nil {
				d.Close()
				return fmt.Errorf("format driver %q does not support option amendment", fmtName)
			}
			if err := errors.Join(f.Create.Amend(d, opts), d.Close()); err != nil {
				return err
			}
			return nil
		},
	}
	flags.register(cmd.Flags(), withConfine, "IMAGE")
	cmd.Flags().StringArrayVarP(&options, "options", "o", nil, "the options to change, OPT=VALUE[,OPT=VALUE...]")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print nothing (amend prints nothing anyway)")
	cmd.Flags().BoolVar(&force, "force", false, "accepted for qemu-img's sake")
	return cmd
}
