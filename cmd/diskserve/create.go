package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/newimage"
)

func newCreateCommand() *cobra.Command {
	var (
		fmtName, backing, backingFmt string
		remoteF                      remoteFlags
		options, partitions          []string
	)
	cmd := &cobra.Command{
		Use:   "create -f FORMAT [-o OPT=VALUE,...] [-b BACKING [-F FORMAT]] [--partition LABEL=PATH[:rw][:type=T]]... IMAGE [SIZE]",
		Short: "Create a new image",
		Long: `create makes a new, empty image of FORMAT at IMAGE, replacing any file
there once it is complete, as qemu-img create does. SIZE takes the
suffixes K, M, G, T, P and E (powers of 1024); with a backing file it
defaults to the backing file's size. Formats that are written whole from
a source (Android sparse, zstd) are made with convert instead.

-o takes the format's options:
` + createOptionsHelp(func(c *diskserve.Creator) bool { return c.New != nil }) + `
-b records BACKING in the new image as given (qcow2); a relative name is
relative to IMAGE's directory. -F records its format; without -F the
format is detected.

--partition LABEL=PATH[:rw][:type=linux|efi|GUID] (repeatable, in disk
order) builds the image from other images, for the formats that can
(composite: a GPT-partitioned disk whose spec is IMAGE, with IMAGE.header,
IMAGE.footer and IMAGE.filler holding the partition table; partitions
start at 4 KiB boundaries, and read-write ones must be a multiple of
4 KiB).`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := args[0]
			rc, err := remoteF.config(nil)
			if err != nil {
				return err
			}
			open := func(p, fmtName string) (diskserve.DiskFile, error) {
				return format.Open(p, diskserve.Options{Format: fmtName, ReadOnly: true, OpenFile: format.FileOpener(rc, diskserve.CacheWriteback)})
			}
			f, err := diskserve.LookupFormat(format.All(), fmtName)
			if err != nil {
				return fmt.Errorf("create -f: %w", err)
			}
			a := diskserve.CreateArgs{Size: -1, BackingFile: backing, Components: partitions}
			if a.Options, err = diskserve.ParseCreateOptions(options); err != nil {
				return fmt.Errorf("create %s: %w", path, err)
			}
			if len(partitions) > 0 {
				if len(args) != 1 || backing != "" {
					return fmt.Errorf("create %s: an image built from --partition images takes no size and no backing file", path)
				}
				a.Open = func(p string) (diskserve.DiskFile, error) { return open(p, "") }
				if err := newimage.Create(path, f, a); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "Formatting '%s', fmt=%s partitions=%d\n", path, f.Name, len(partitions))
				return nil
			}
			if len(args) == 2 {
				if a.Size, err = diskserve.ParseSize(args[1]); err != nil {
					return err
				}
			}
			if backing != "" {
				bf, bsize, err := probeBacking(path, backing, backingFmt, open)
				if err != nil {
					return err
				}
				a.BackingFormat = bf
				if a.Size < 0 {
					a.Size = bsize
				}
			}
			if a.Size < 0 {
				return fmt.Errorf("create %s: a size is needed without a backing file", path)
			}
			if err := newimage.Create(path, f, a); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Formatting '%s', fmt=%s size=%d\n", path, f.Name, a.Size)
			return nil
		},
	}
	fl := cmd.Flags()
	remoteF.register(fl, false)
	fl.StringVarP(&fmtName, "format", "f", "raw", "format of the new image")
	fl.StringArrayVarP(&options, "options", "o", nil, "format options, OPT=VALUE[,OPT=VALUE...]")
	fl.StringVarP(&backing, "backing", "b", "", "backing file (qcow2; vpc, vhdx: a differencing disk; vmdk: a sparse delta disk)")
	fl.StringVarP(&backingFmt, "backing-format", "F", "", "format of the backing file; detected when omitted")
	fl.StringArrayVar(&partitions, "partition", nil, "an image to build IMAGE from (composite): LABEL=PATH[:rw][:type=linux|efi|GUID]")
	return cmd
}

// probeBacking opens the backing file as the new image will, relative to
// its directory, and returns its format and size.
func probeBacking(image, backing, backingFmt string, open func(path, format string) (diskserve.DiskFile, error)) (string, int64, error) {
	path, err := diskserve.ResolveRelative(image, backing)
	if err != nil {
		return "", 0, err
	}
	d, err := open(path, backingFmt)
	if err != nil {
		return "", 0, fmt.Errorf("backing file: %w", err)
	}
	defer d.Close()
	info := diskserve.Describe(d)
	return info.Format, info.VirtualSize, nil
}
