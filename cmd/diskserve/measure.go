package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
)

func newMeasureCommand() *cobra.Command {
	var (
		flags            imageFlags
		outFmt, sizeText string
		options          []string
	)
	cmd := &cobra.Command{
		Use:   "measure [--output=human|json] [-f FMT] [-l SNAPSHOT] [-O FMT] [-o OPTIONS] (IMAGE | --size SIZE)",
		Short: "Say how large a file an image would take",
		Long: `measure says how large a file an image of format -O (raw by default) takes,
holding IMAGE's content or empty and --size bytes large, as qemu-img
measure computes it: "required size" for the content with its metadata,
"fully allocated size" were every cluster written, and, for a qcow2
source and target, "bitmaps size" for the source's persistent dirty
bitmaps. -o takes the target's create options, and preallocation and
backing_file where the format has them (with a backing file, every
cluster of IMAGE is counted: what it shares with the backing file cannot
be known). raw and qcow2 are measured; other formats, as in qemu, are not.`,
		Args: func(cmd *cobra.Command, args []string) error {
			switch {
			case len(args) == 0 && sizeText == "":
				return errors.New("either --size N or one filename must be specified")
			case len(args) > 0 && sizeText != "":
				return errors.New("--size N cannot be used together with a filename")
			case len(args) > 1:
				return fmt.Errorf("measure takes one image, got %d arguments (see --help)", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if flags.output != "human" && flags.output != "json" {
				return fmt.Errorf("--output must be human or json, not %q", flags.output)
			}
			f, err := diskserve.LookupFormat(format.All(), outFmt)
			if err != nil {
				return err
			}
			if f.Create == nil || f.Create.Measure == nil {
				return fmt.Errorf("the %s format does not support size measurement", f.Name)
			}
			opts, err := diskserve.ParseCreateOptions(options)
			if err != nil {
				return err
			}
			c := *f.Create
			c.Options = slices.Clip(c.Options)
			has := func(name string) bool {
				return slices.ContainsFunc(c.Options, func(o diskserve.CreateOption) bool { return o.Name == name })
			}
			if !has("preallocation") {
				c.Options = append(c.Options, diskserve.CreateOption{Name: "preallocation"})
			}
			if c.Backing {
				c.Options = append(c.Options, diskserve.CreateOption{Name: "backing_file"})
			}
			if err := opts.Check(f.Name, &c); err != nil {
				return err
			}
			var m diskserve.Measurement
			if len(args) == 0 {
				size, err := diskserve.ParseSize(sizeText)
				if err != nil {
					return fmt.Errorf("--size: %w", err)
				}
				if m, err = c.Measure(opts, size, nil); err != nil {
					return err
				}
			} else {
				err := flags.withImage(args, true, func(d diskserve.DiskFile) error {
					m, err = c.Measure(opts, 0, d)
					return err
				})
				if err != nil {
					return err
				}
			}
			w := cmd.OutOrStdout()
			if flags.output == "json" {
				b, err := json.MarshalIndent(measureJSON{m.Bitmaps, m.Required, m.FullyAllocated}, "", "    ")
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(w, "%s\n", b)
				return err
			}
			fmt.Fprintf(w, "required size: %d\nfully allocated size: %d\n", m.Required, m.FullyAllocated)
			if m.Bitmaps != nil {
				fmt.Fprintf(w, "bitmaps size: %d\n", *m.Bitmaps)
			}
			return nil
		},
	}
	flags.register(cmd.Flags())
	fl := cmd.Flags()
	fl.StringVarP(&flags.snapshot, "snapshot", "l", "", "measure the qcow2 internal snapshot NAME (or ID) of IMAGE")
	fl.StringVarP(&outFmt, "output-format", "O", "raw", "the format of the image to measure for")
	fl.StringArrayVarP(&options, "options", "o", nil, "create options of the target format, as key=value[,key=value...]")
	fl.StringVar(&sizeText, "size", "", "measure an empty image of SIZE bytes (K, M, G, T suffixes)")
	return cmd
}

// measureJSON is the shape of qemu-img measure --output=json.
type measureJSON struct {
	Bitmaps        *int64 `json:"bitmaps,omitempty"`
	Required       int64  `json:"required"`
	FullyAllocated int64  `json:"fully-allocated"`
}
