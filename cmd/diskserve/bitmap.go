package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
)

// bitmapEditor is what an image format offers to edit its persistent
// dirty bitmaps (qcow2 does).
type bitmapEditor interface {
	AddBitmap(name string, granularity int64, enabled bool) error
	RemoveBitmap(name string) error
	ClearBitmap(name string) error
	EnableBitmap(name string, enabled bool) error
	MergeBitmap(name string, src diskserve.DirtyBitmap) error
}

func newBitmapCommand() *cobra.Command {
	var (
		f                                     openFlags
		add, remove, clear, enable, disable   bool
		merge, srcFile, srcFormat, granString string
	)
	cmd := &cobra.Command{
		Use:   "bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] IMAGE BITMAP",
		Short: "Add, remove, clear, enable, disable or merge a qcow2 image's persistent dirty bitmaps",
		Long: `bitmap edits the persistent dirty bitmaps of a qcow2 image, with the flags of
qemu-img bitmap and interchangeably with it. Several operations may be
given at once; they run in this order, whatever the order on the command
line: --add (an enabled bitmap, --disable for a disabled one; -g sets its
granularity, default the cluster size), --clear, --merge SOURCE (the
bitmap SOURCE of IMAGE, or of -b SOURCE_FILE, is OR-ed into BITMAP),
--enable or --disable, --remove.

An enabled bitmap records every write while diskserve (or qemu) serves the
image; diskserve serve -B BITMAP lets backup tools read it over NBD.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			img, name := args[0], args[1]
			if !(add || remove || clear || enable || disable || merge != "") {
				return errors.New("bitmap: give at least one of --add, --remove, --clear, --enable, --disable, --merge")
			}
			if enable && disable {
				return errors.New("bitmap: --enable and --disable together")
			}
			var gran int64
			if granString != "" {
				var err error
				if gran, err = diskserve.ParseSize(granString); err != nil || gran <= 0 {
					return fmt.Errorf("-g %q: a granularity such as 64K is needed", granString)
				}
			}
			d, err := f.open(img, false, nil)
			if err != nil {
				return err
			}
			err = editBitmap(d, f, name, add, remove, clear, enable, disable, merge, srcFile, srcFormat, gran)
			if cerr := d.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("%s: %w", img, err)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	f.register(fl, 0, "IMAGE")
	fl.BoolVar(&add, "add", false, "add BITMAP, enabled unless --disable")
	fl.BoolVar(&remove, "remove", false, "remove BITMAP")
	fl.BoolVar(&clear, "clear", false, "clear every bit of BITMAP")
	fl.BoolVar(&enable, "enable", false, "make BITMAP record writes")
	fl.BoolVar(&disable, "disable", false, "make BITMAP stop recording writes")
	fl.StringVar(&merge, "merge", "", "set in BITMAP every bit set in bitmap SOURCE (of IMAGE, or of -b)")
	fl.StringVarP(&srcFile, "source-file", "b", "", "the image that holds --merge's SOURCE")
	fl.StringVarP(&srcFormat, "source-format", "F", "", "the format of -b's image")
	fl.StringVarP(&granString, "granularity", "g", "", "bytes per bit of a bitmap --add makes (a power of 2 from 512 to 2G)")
	return cmd
}

// editBitmap runs the operations asked for on bitmap name of d.
func editBitmap(d diskserve.DiskFile, f openFlags, name string, add, remove, clear, enable, disable bool, merge, srcFile, srcFormat string, gran int64) error {
	e, ok := d.(bitmapEditor)
	if !ok {
		return fmt.Errorf("the %s format has no dirty bitmaps", diskserve.Describe(d).Format)
	}
	if add {
		if err := e.AddBitmap(name, gran, !disable); err != nil {
			return err
		}
	}
	if clear {
		if err := e.ClearBitmap(name); err != nil {
			return err
		}
	}
	if merge != "" {
		src := d
		if srcFile != "" {
			sf := f
			sf.format, sf.readOnly = srcFormat, true
			s, err := sf.open(srcFile, true, nil)
			if err != nil {
				return err
			}
			defer s.Close()
			if s.Size() != d.Size() {
				return fmt.Errorf("merge: %s is %d bytes, the image %d", srcFile, s.Size(), d.Size())
			}
			src = s
		}
		b, err := diskserve.FindDirtyBitmap(src, merge)
		if err != nil {
			return err
		}
		if err := e.MergeBitmap(name, b); err != nil {
			return err
		}
	}
	if (enable || disable) && !add {
		if err := e.EnableBitmap(name, enable); err != nil {
			return err
		}
	}
	if remove {
		return e.RemoveBitmap(name)
	}
	return nil
}
