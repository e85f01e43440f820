package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/format/qcow2"
)

func newCreateCommand() *cobra.Command {
	var (
		fmtName, backing, backingFmt string
		options, partitions          []string
	)
	cmd := &cobra.Command{
		Use:   "create -f FORMAT [-o OPT=VALUE,...] [-b BACKING [-F FORMAT]] [--partition LABEL=PATH[:rw][:type=T]]... IMAGE [SIZE]",
		Short: "Create a new image",
		Long: `create makes a new, empty image of FORMAT (raw or qcow2) at IMAGE, replacing
any file there, as qemu-img create does. SIZE takes the suffixes K, M, G, T,
P and E (powers of 1024); with a backing file it defaults to the backing
file's size.

qcow2 options (-o, comma-separated or repeated): cluster_size, compat
(0.10 or 1.1), refcount_bits, compression_type (zlib or zstd),
lazy_refcounts (on or off), extended_l2 (on or off).

-b records BACKING in the new qcow2 image as given; a relative name is
relative to IMAGE's directory. -F records its format; without -F the
format is detected.

-f composite builds a GPT-partitioned composite disk from --partition
LABEL=PATH[:rw][:type=linux|efi|GUID] (repeatable, in disk order): IMAGE is
the composite spec, and IMAGE.header, IMAGE.footer (and IMAGE.filler) hold
the partition table. Partitions start at 4 KiB boundaries; read-write ones
must be a multiple of 4 KiB.`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := args[0]
			if fmtName == "composite" {
				if len(args) != 1 || backing != "" || len(options) > 0 {
					return fmt.Errorf("create %s: a composite takes --partition arguments only", path)
				}
				if err := createComposite(path, partitions); err != nil {
					return fmt.Errorf("create %s: %w", path, err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "Formatting '%s', fmt=composite partitions=%d\n", path, len(partitions))
				return nil
			}
			var size int64 = -1
			if len(args) == 2 {
				var err error
				if size, err = parseSize(args[1]); err != nil {
					return err
				}
			}
			if backing != "" {
				bf, bsize, err := probeBacking(path, backing, backingFmt)
				if err != nil {
					return err
				}
				backingFmt = bf
				if size < 0 {
					size = bsize
				}
			}
			if size < 0 {
				return fmt.Errorf("create %s: a size is needed without a backing file", path)
			}
			switch fmtName {
			case "raw":
				if backing != "" || len(options) > 0 {
					return fmt.Errorf("create %s: raw images take no options and no backing file", path)
				}
				if err := createRaw(path, size); err != nil {
					return err
				}
			case "qcow2":
				o, err := qcow2Options(options)
				if err != nil {
					return fmt.Errorf("create %s: %w", path, err)
				}
				o.Size, o.BackingFile, o.BackingFormat = size, backing, backingFmt
				if err := qcow2.Create(path, o); err != nil {
					return err
				}
			default:
				return fmt.Errorf("create: format %q cannot be created (raw, qcow2 and composite can)", fmtName)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Formatting '%s', fmt=%s size=%d\n", path, fmtName, size)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&fmtName, "format", "f", "raw", "format of the new image: raw or qcow2")
	fl.StringArrayVarP(&options, "options", "o", nil, "format options, OPT=VALUE[,OPT=VALUE...]")
	fl.StringVarP(&backing, "backing", "b", "", "backing file (qcow2)")
	fl.StringVarP(&backingFmt, "backing-format", "F", "", "format of the backing file; detected when omitted")
	fl.StringArrayVar(&partitions, "partition", nil, "composite: LABEL=PATH[:rw][:type=linux|efi|GUID]")
	return cmd
}

// createComposite builds a GPT composite from --partition arguments.
func createComposite(path string, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("a composite needs at least one --partition")
	}
	var parts []composite.Partition
	for _, a := range args {
		label, rest, ok := strings.Cut(a, "=")
		if !ok {
			return fmt.Errorf("--partition %q is not LABEL=PATH[:rw][:type=T]", a)
		}
		fields := strings.Split(rest, ":")
		p := composite.Partition{Label: label, Path: fields[0]}
		for _, f := range fields[1:] {
			switch t, ok := strings.CutPrefix(f, "type="); {
			case f == "rw":
				p.Writable = true
			case ok && t == "linux":
				p.Type = composite.TypeLinux
			case ok && t == "efi":
				p.Type = composite.TypeEFI
			case ok:
				g, err := composite.ParseGUID(t)
				if err != nil {
					return fmt.Errorf("--partition %q: %w", a, err)
				}
				p.Type = g
			default:
				return fmt.Errorf("--partition %q: unknown option %q (rw, type=)", a, f)
			}
		}
		d, err := format.Open(p.Path, diskserve.Options{ReadOnly: true})
		if err != nil {
			return fmt.Errorf("partition %q: %w", label, err)
		}
		p.Size = d.Size()
		d.Close()
		parts = append(parts, p)
	}
	return composite.CreateGPT(path, parts)
}

// probeBacking opens the backing file as the new image will, relative to
// its directory, and returns its format and size.
func probeBacking(image, backing, backingFmt string) (string, int64, error) {
	path, err := diskserve.ResolveRelative(image, backing)
	if err != nil {
		return "", 0, err
	}
	d, err := format.Open(path, diskserve.Options{Format: backingFmt, ReadOnly: true})
	if err != nil {
		return "", 0, fmt.Errorf("backing file: %w", err)
	}
	defer d.Close()
	info := diskserve.Describe(d)
	return info.Format, info.VirtualSize, nil
}

func createRaw(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// qcow2Options parses -o values.
func qcow2Options(opts []string) (qcow2.CreateOptions, error) {
	var o qcow2.CreateOptions
	for _, kv := range strings.Split(strings.Join(opts, ","), ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return o, fmt.Errorf("option %q is not OPT=VALUE", kv)
		}
		var err error
		switch k {
		case "cluster_size":
			o.ClusterSize, err = parseSize(v)
		case "compat":
			o.Compat = v
		case "refcount_bits":
			o.RefcountBits, err = strconv.Atoi(v)
		case "compression_type":
			o.Compression = v
		case "lazy_refcounts":
			o.LazyRefcounts, err = parseOnOff(v)
		case "extended_l2":
			o.ExtendedL2, err = parseOnOff(v)
		default:
			return o, fmt.Errorf("unknown qcow2 option %q (cluster_size, compat, refcount_bits, compression_type, lazy_refcounts, extended_l2)", k)
		}
		if err != nil {
			return o, fmt.Errorf("option %s: %w", k, err)
		}
	}
	return o, nil
}

func parseOnOff(v string) (bool, error) {
	switch v {
	case "on", "true", "yes":
		return true, nil
	case "off", "false", "no":
		return false, nil
	}
	return false, fmt.Errorf("%q is not on or off", v)
}

// parseSize parses a size in bytes with an optional suffix K, M, G, T, P
// or E (powers of 1024, either case), as qemu-img does.
func parseSize(s string) (int64, error) {
	shift := 0
	if n := len(s); n > 0 {
		if i := strings.IndexByte("KMGTPE", s[n-1]&^0x20); i >= 0 && s[n-1] >= 'A' {
			shift = 10 * (i + 1)
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	size := v * float64(int64(1)<<shift)
	if size > 1<<62 || size != float64(int64(size)) {
		return 0, fmt.Errorf("%q is not a whole number of bytes below 4 EiB", s)
	}
	return int64(size), nil
}
