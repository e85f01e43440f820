package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
)

func newSnapshotCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "List, create, apply and delete an image's internal snapshots",
		Long: `snapshot works on the internal snapshots of an image (qcow2): list, create,
apply and delete do what qemu-img snapshot -l, -c, -a and -d do, and
interchangeably with it; a snapshot is named by its ID or its name.
diskserve serve --snapshot NAME serves one of them read-only.

Copies of a disk's content kept outside the image are bundles (diskserve
bundle); a qcow2 overlay put over a served image while clients stay
attached is a live overlay (diskserve control overlay).`,
	}
	cmd.AddCommand(newSnapshotListCommand(),
		newInternalSnapshotCommand("create", "Record IMAGE's current content as internal snapshot NAME", func(d diskserve.DiskFile, name string) error {
			_, err := diskserve.CreateSnapshot(d, name)
			return err
		}),
		newInternalSnapshotCommand("apply", "Revert IMAGE to internal snapshot NAME, discarding what was written since", diskserve.ApplySnapshot),
		newInternalSnapshotCommand("delete", "Delete internal snapshot NAME of IMAGE", diskserve.DeleteSnapshot))
	return cmd
}

// newInternalSnapshotCommand returns the subcommand that opens IMAGE for
// writing and calls op on it with NAME.
func newInternalSnapshotCommand(verb, short string, op func(diskserve.DiskFile, string) error) *cobra.Command {
	var f openFlags
	cmd := &cobra.Command{
		Use:   verb + " [-f FORMAT] IMAGE NAME",
		Short: short,
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			d, err := f.open(args[0], false, nil)
			if err != nil {
				return err
			}
			err = op(d, args[1])
			if cerr := d.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			return nil
		},
	}
	f.register(cmd.Flags(), 0, "IMAGE")
	return cmd
}

func newSnapshotListCommand() *cobra.Command {
	var f imageFlags
	cmd := &cobra.Command{
		Use:   "list [-f FORMAT] [--output=human|json] IMAGE",
		Short: "List an image's internal snapshots",
		Args:  oneImage,
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.withImage(args, true, func(d diskserve.DiskFile) error {
				snaps := diskserve.Describe(d).Snapshots
				if f.output == "json" {
					if snaps == nil {
						snaps = []diskserve.Snapshot{}
					}
					e := json.NewEncoder(os.Stdout)
					e.SetIndent("", "  ")
					return e.Encode(snaps)
				}
				if len(snaps) == 0 {
					return nil // as qemu-img: nothing for an image without snapshots
				}
				fmt.Println("Snapshot list:")
				writeSnapshots(os.Stdout, snaps, "")
				return nil
			})
		},
	}
	f.register(cmd.Flags())
	return cmd
}
