package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
)

func newResizeCommand() *cobra.Command {
	var (
		flags    openFlags
		shrink   bool
		quiet    bool
		prealloc string
	)
	cmd := &cobra.Command{
		Use:   "resize [-f FMT] [--shrink] [--preallocation=off|metadata|falloc|full] [-q] IMAGE [+|-]SIZE",
		Short: "Change an image's virtual size",
		Long: `resize sets IMAGE's virtual size to SIZE, or grows (+SIZE) or shrinks
(-SIZE) it by that much, as qemu-img resize does: "Image resized." on
success. Shrinking needs --shrink: the data past the new end is gone.

raw images are cut or extended; --preallocation=falloc allocates the new
space, full writes zeroes into it (off leaves a hole). qcow2 images grow
(the L1 table moves when it must; --preallocation=metadata, falloc or full
gives the new clusters host clusters as create -o preallocation does) and
shrink (the clusters and L2 tables past the new end are freed, then the
file is cut after its last used cluster). Other formats keep their size,
as in qemu.

The change is one step for raw images. A qcow2 grow writes a new L1 table
and its refcounts before the header names it; a shrink writes the header's
new size, then frees: a crash leaves the image at the old or the new size,
with at most leaked clusters (diskserve check -r leaks frees them).`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 2 {
				return fmt.Errorf("resize takes an image and a size, got %d arguments (see --help)", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			switch prealloc {
			case "off", "metadata", "falloc", "full":
			default:
				return fmt.Errorf("invalid preallocation mode %q (off, metadata, falloc or full)", prealloc)
			}
			d, err := flags.open(args[0], false, nil)
			if err != nil {
				return err
			}
			old := d.Size()
			size, err := newSize(old, args[1])
			if err == nil {
				err = resizeTo(d, old, size, shrink, prealloc)
			}
			if cerr := d.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
			if !quiet {
				fmt.Fprintln(cmd.OutOrStdout(), "Image resized.")
			}
			return nil
		},
	}
	flags.register(cmd.Flags(), withConfine, "IMAGE")
	cmd.Flags().BoolVar(&shrink, "shrink", false, "allow the image to shrink, losing what lies past its new end")
	cmd.Flags().StringVar(&prealloc, "preallocation", "off", "the new space: off, metadata (qcow2), falloc or full, as create -o preallocation")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print nothing on success")
	return cmd
}

// newSize parses a resize argument: SIZE, +SIZE or -SIZE relative to old.
func newSize(old int64, arg string) (int64, error) {
	sign := int64(0)
	switch {
	case strings.HasPrefix(arg, "+"):
		sign, arg = 1, arg[1:]
	case strings.HasPrefix(arg, "-"):
		sign, arg = -1, arg[1:]
	}
	n, err := diskserve.ParseSize(arg)
	if err != nil {
		return 0, fmt.Errorf("invalid image size specified: %w", err)
	}
	size := n
	if sign != 0 {
		size = old + sign*n
	}
	if size <= 0 {
		return 0, errors.New("new image size must be positive")
	}
	return size, nil
}

// resizeTo changes d's size from old to size.
func resizeTo(d diskserve.DiskFile, old, size int64, shrink bool, prealloc string) error {
	if size < old && !shrink {
		return fmt.Errorf("shrinking from %d to %d bytes loses the data past the new end: add --shrink if that is what you want", old, size)
	}
	if size < old && prealloc != "off" {
		return errors.New("preallocation can only be used for growing images")
	}
	var pre func(d diskserve.DiskFile, off, n int64, mode string) error
	if prealloc != "off" {
		name := diskserve.Describe(d).Format
		f, err := diskserve.LookupFormat(format.All(), name)
		if err != nil || f.Create == nil || f.Create.Preallocate == nil {
			return fmt.Errorf("--preallocation=%s: %s images cannot preallocate", prealloc, name)
		}
		pre = f.Create.Preallocate
		if err := pre(d, old, 0, prealloc); err != nil { // the mode checked before anything changes
			return err
		}
	}
	if err := diskserve.Resize(d, size); err != nil {
		if errors.Is(err, errors.ErrUnsupported) && !errors.As(err, new(*diskserve.FormatError)) {
			return fmt.Errorf("%s images cannot be resized", diskserve.Describe(d).Format)
		}
		return err
	}
	if pre != nil && size > old {
		if err := pre(d, old, size-old, prealloc); err != nil {
			return err
		}
	}
	return diskserve.Flush(d)
}
