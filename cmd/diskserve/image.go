package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
)

// imageFlags are the flags of every subcommand that opens one image.
type imageFlags struct {
	format string
	output string
	verify bool
}

func (f *imageFlags) register(fs *pflag.FlagSet) {
	fs.StringVarP(&f.format, "format", "f", "", "image format ("+strings.Join(format.Names(), ", ")+"); detected when omitted")
	fs.StringVar(&f.output, "output", "human", "output format: human or json")
	fs.BoolVar(&f.verify, "verify", false, "verify the image's checksums (Android sparse CRC32 chunks) when opening it")
}

func (f *imageFlags) validate() error {
	if f.output != "human" && f.output != "json" {
		return fmt.Errorf("--output must be human or json, not %q", f.output)
	}
	return nil
}

// open opens the image named by the command's argument.
func (f *imageFlags) open(path string, readOnly bool) (diskserve.DiskFile, error) {
	return format.Open(path, diskserve.Options{Format: f.format, ReadOnly: readOnly, Verify: f.verify})
}

// withImage validates the flags, opens the image named by args[0] and
// calls fn with it, closing it afterwards.
func (f *imageFlags) withImage(args []string, readOnly bool, fn func(diskserve.DiskFile) error) error {
	if err := f.validate(); err != nil {
		return err
	}
	d, err := f.open(args[0], readOnly)
	if err != nil {
		return err
	}
	defer d.Close()
	return fn(d)
}

// oneImage is the Args check of commands that take exactly one image.
func oneImage(cmd *cobra.Command, args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("%s takes one image, got %d arguments (see --help)", cmd.Name(), len(args))
	}
	return nil
}

// humanSize formats n bytes the way qemu-img does: "10 MiB", "1.5 GiB".
func humanSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v, i := float64(n), 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	s := strconv.FormatFloat(v, 'f', 3, 64)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s + " " + units[i]
}
