package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/internal/bundle"
	"github.com/diskserve/diskserve/internal/newimage"
)

func newBundleCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bundle",
		Short: "Save, verify and restore bundles: a disk's content with a manifest of digests",
		Long: `A bundle is a directory that holds a disk's content at one point in time
and a manifest.json: the manifest version, when and by which diskserve it
was made, the source image's format, size and chain, and a SHA-256 digest
of every 4 MiB of the guest-visible bytes.

save writes the bundle under a temporary name beside DIR and renames it
when complete, so an interrupted save leaves no DIR; what a killed save
left, the next save to DIR removes. The data is a hard link of the image
when the image is one plain file holding the disk byte for byte (raw)
and the bundle is on the same file system (no copy; the image must not be
written afterwards, as after a live overlay moved the guest onto a new
image), and a compact qcow2 otherwise (-o compress for a compressed one).
verify checks every digest; restore verifies, then writes IMAGE, which
appears whole or not at all.`,
	}
	cmd.AddCommand(newBundleSaveCommand(), newBundleVerifyCommand(), newBundleRestoreCommand())
	return cmd
}

func newBundleSaveCommand() *cobra.Command {
	var (
		src     openFlags
		options []string
	)
	cmd := &cobra.Command{
		Use:   "save [-f FORMAT] [-o compress] IMAGE DIR",
		Short: "Save IMAGE's content as a bundle in DIR",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			compress := false
			for _, o := range options {
				if o != "compress" {
					return fmt.Errorf("unknown save option %q (compress)", o)
				}
				compress = true
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return saveBundle(ctx, &src, args[0], args[1], compress)
		},
	}
	src.register(cmd.Flags(), 0, "IMAGE")
	cmd.Flags().StringSliceVarP(&options, "options", "o", nil, "compress: store the data as a compressed qcow2")
	return cmd
}

// saveBundle writes the bundle of image into dir, through a temporary
// directory beside it.
func saveBundle(ctx context.Context, f *openFlags, image, dir string, compress bool) (err error) {
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("bundle save: %s already exists", dir)
	}
	src, err := f.open(image, true, nil)
	if err != nil {
		return err
	}
	defer src.Close()
	info := diskserve.Describe(src)
	tmp, err := newimage.TempDir(dir)
	if err != nil {
		return fmt.Errorf("bundle save: %w", err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
			if ctx.Err() != nil {
				err = fmt.Errorf("bundle save interrupted (%v): %s was not written", context.Cause(ctx), dir)
			}
		}
	}()
	m := &bundle.Manifest{
		Version: bundle.Version, Created: time.Now().UTC(), DiskserveVersion: version, ChunkSize: bundle.ChunkSize,
		Source: bundle.Source{Path: image, Format: info.Format, VirtualSize: src.Size(), Chain: bundle.ChainOf(info)},
	}
	m.Data = bundle.Data{File: "disk.raw", Format: raw.Format.Name, How: "hardlink"}
	if compress || !wholeFile(src) || os.Link(info.Filename, filepath.Join(tmp, m.Data.File)) != nil {
		m.Data = bundle.Data{File: "disk.qcow2", Format: qcow2.Format.Name, How: "qcow2"}
		if compress {
			m.Data.How = "qcow2-compressed"
		}
		if err := newimage.Convert(ctx, src, filepath.Join(tmp, m.Data.File), newimage.Target{Format: qcow2.Format, Compress: compress}, nil); err != nil {
			return err
		}
	}
	if m.Digests, err = bundle.Digests(ctx, src); err != nil {
		return err
	}
	// The digests come from the source; the data must match them.
	data, err := format.Open(filepath.Join(tmp, m.Data.File), diskserve.Options{Format: m.Data.Format, ReadOnly: true})
	if err != nil {
		return err
	}
	err = bundle.Check(ctx, m, data)
	data.Close()
	if err != nil {
		return fmt.Errorf("bundle save: the data written does not match the source: %w", err)
	}
	if err := bundle.Write(tmp, m); err != nil {
		return err
	}
	if err := newimage.SyncDir(tmp); err != nil {
		return err
	}
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("bundle save: %s appeared meanwhile", dir)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	return newimage.SyncDir(filepath.Dir(dir))
}

// wholeFile reports whether d is one host file holding the disk byte for
// byte, so that a hard link of the file is a copy of the disk.
func wholeFile(d diskserve.DiskFile) bool {
	hr, ok := diskserve.MapHost(d, 0, min(1, d.Size()), false)
	return ok && hr.Whole
}

func newBundleVerifyCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "verify DIR",
		Short: "Check a bundle's manifest and every digest",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := verifyBundle(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			fmt.Printf("%s: %d bytes in %d chunks verified (manifest version %d, made %s)\n", args[0], m.Source.VirtualSize, len(m.Digests), m.Version, m.Created.Format(time.RFC3339))
			return nil
		},
	}
}

// verifyBundle reads dir's manifest and checks its data against it.
func verifyBundle(ctx context.Context, dir string) (*bundle.Manifest, error) {
	m, err := bundle.Read(dir)
	if err != nil {
		return nil, err
	}
	data, err := format.Open(filepath.Join(dir, m.Data.File), diskserve.Options{Format: m.Data.Format, ReadOnly: true})
	if err != nil {
		return nil, err
	}
	defer data.Close()
	if err := bundle.Check(ctx, m, data); err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	return m, nil
}

func newBundleRestoreCommand() *cobra.Command {
	var (
		outFmt     string
		expectSize string
		force      bool
	)
	cmd := &cobra.Command{
		Use:   "restore [-O FORMAT] [--expect-size SIZE] [--force] DIR IMAGE",
		Short: "Verify a bundle and write its content to IMAGE",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir, image := args[0], args[1]
			if _, err := os.Lstat(image); err == nil && !force {
				return fmt.Errorf("bundle restore: %s exists (--force replaces it)", image)
			}
			m, err := bundle.Read(dir)
			if err != nil {
				return err
			}
			if expectSize != "" {
				n, err := diskserve.ParseSize(expectSize)
				if err != nil {
					return fmt.Errorf("--expect-size: %w", err)
				}
				if n != m.Source.VirtualSize {
					return fmt.Errorf("bundle restore: the bundle holds %d bytes, --expect-size says %d", m.Source.VirtualSize, n)
				}
			}
			f, err := restoreFormat(outFmt, m.Source.Format)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			if _, err := verifyBundle(ctx, dir); err != nil {
				return err
			}
			data, err := format.Open(filepath.Join(dir, m.Data.File), diskserve.Options{Format: m.Data.Format, ReadOnly: true})
			if err != nil {
				return err
			}
			defer data.Close()
			return newimage.Convert(ctx, data, image, newimage.Target{Format: f}, nil)
		},
	}
	cmd.Flags().StringVarP(&outFmt, "output-format", "O", "", "format of IMAGE; default: the source's, if it is one file written in place (raw, qcow2), else raw")
	cmd.Flags().StringVar(&expectSize, "expect-size", "", "refuse a bundle whose disk is not this size")
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing IMAGE")
	return cmd
}

// restoreFormat returns the format restore writes: the one asked for, or
// else the source's if it is one file written in place, or else raw.
func restoreFormat(asked, source string) (diskserve.Format, error) {
	if asked != "" {
		return diskserve.LookupFormat(format.All(), asked)
	}
	f, err := diskserve.LookupFormat(format.All(), source)
	if err == nil && f.Create != nil && f.Create.New != nil && !f.Create.Components {
		return f, nil
	}
	return raw.Format, nil
}
