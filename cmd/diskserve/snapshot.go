package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/bundle"
)

func newSnapshotCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Save, verify and restore snapshot bundles of images",
		Long: `A snapshot bundle is a directory that holds a disk's content at one point
in time and a manifest.json: the manifest version, when and by which
diskserve it was made, the source image's format, size and chain, and a
SHA-256 digest of every 4 MiB of the guest-visible bytes.

save writes the bundle under a temporary name beside DIR and renames it
when complete, so an interrupted save leaves no DIR. The data is a hard
link of a raw image when the bundle is on the same file system (no copy;
the image must not be written afterwards, as after a live snapshot moved
the guest onto an overlay), and a compact qcow2 otherwise (-o compress for
a compressed one). verify checks every digest; restore verifies, then
writes IMAGE atomically.

list, create, apply and delete work on a qcow2 image's internal
snapshots, as qemu-img snapshot -l, -c, -a and -d do, and interchangeably
with it; a snapshot is named by its ID or its name. diskserve serve
--snapshot NAME serves one of them read-only.`,
	}
	cmd.AddCommand(newSnapshotListCommand(),
		newInternalSnapshotCommand("create", "Record IMAGE's current content as internal snapshot NAME", func(d diskserve.DiskFile, name string) error {
			_, err := diskserve.CreateSnapshot(d, name)
			return err
		}),
		newInternalSnapshotCommand("apply", "Revert IMAGE to internal snapshot NAME, discarding what was written since", diskserve.ApplySnapshot),
		newInternalSnapshotCommand("delete", "Delete internal snapshot NAME of IMAGE", diskserve.DeleteSnapshot),
		newSnapshotSaveCommand(), newSnapshotVerifyCommand(), newSnapshotRestoreCommand())
	return cmd
}

// newInternalSnapshotCommand returns the subcommand that opens IMAGE for
// writing and calls op on it with NAME.
func newInternalSnapshotCommand(verb, short string, op func(diskserve.DiskFile, string) error) *cobra.Command {
	var fmtName string
	cmd := &cobra.Command{
		Use:   verb + " [-f FORMAT] IMAGE NAME",
		Short: short,
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			d, err := format.Open(args[0], diskserve.Options{Format: fmtName})
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
	cmd.Flags().StringVarP(&fmtName, "format", "f", "", "format of IMAGE; detected when omitted")
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
				tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
				fmt.Fprintln(tw, "Snapshot list:")
				fmt.Fprintln(tw, "ID\tTAG\tVM SIZE\tDATE\tVM CLOCK")
				for _, s := range snaps {
					c := s.VMClock
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%02d:%02d:%02d.%03d\n", s.ID, s.Name, humanSize(int64(s.VMStateSize)),
						s.Date.Local().Format("2006-01-02 15:04:05"), int(c.Hours()), int(c.Minutes())%60, int(c.Seconds())%60, c.Milliseconds()%1000)
				}
				return tw.Flush()
			})
		},
	}
	f.register(cmd.Flags())
	return cmd
}

func newSnapshotSaveCommand() *cobra.Command {
	var (
		fmtName string
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
			return saveBundle(ctx, args[0], fmtName, args[1], compress)
		},
	}
	cmd.Flags().StringVarP(&fmtName, "format", "f", "", "format of IMAGE; detected when omitted")
	cmd.Flags().StringSliceVarP(&options, "options", "o", nil, "compress: store the data as a compressed qcow2")
	return cmd
}

// saveBundle writes the bundle of image into dir, through a temporary
// directory beside it.
func saveBundle(ctx context.Context, image, fmtName, dir string, compress bool) (err error) {
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("snapshot save: %s already exists", dir)
	}
	src, err := format.Open(image, diskserve.Options{Format: fmtName, ReadOnly: true})
	if err != nil {
		return err
	}
	defer src.Close()
	info := diskserve.Describe(src)
	tmp := filepath.Join(filepath.Dir(dir), "."+filepath.Base(dir)+".diskserve-"+strconv.Itoa(os.Getpid()))
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return fmt.Errorf("snapshot save: %w", err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
			if ctx.Err() != nil {
				err = fmt.Errorf("snapshot save interrupted (%v): %s was not written", context.Cause(ctx), dir)
			}
		}
	}()
	m := &bundle.Manifest{
		Version: bundle.Version, Created: time.Now().UTC(), DiskserveVersion: version, ChunkSize: bundle.ChunkSize,
		Source: bundle.Source{Path: image, Format: info.Format, VirtualSize: src.Size(), Chain: bundle.ChainOf(info)},
	}
	m.Data = bundle.Data{File: "disk.raw", Format: "raw", How: "hardlink"}
	if info.Format != "raw" || compress || os.Link(info.Filename, filepath.Join(tmp, m.Data.File)) != nil {
		m.Data = bundle.Data{File: "disk.qcow2", Format: "qcow2", How: "qcow2"}
		if compress {
			m.Data.How = "qcow2-compressed"
		}
		if err := convert(ctx, src, filepath.Join(tmp, m.Data.File), "qcow2", nil, compress, nil); err != nil {
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
		return fmt.Errorf("snapshot save: the data written does not match the source: %w", err)
	}
	if err := bundle.Write(tmp, m); err != nil {
		return err
	}
	if err := syncDir(tmp); err != nil {
		return err
	}
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("snapshot save: %s appeared meanwhile", dir)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	return syncDir(filepath.Dir(dir))
}

// syncDir makes a directory's entries durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(f.Sync(), f.Close())
}

func newSnapshotVerifyCommand() *cobra.Command {
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

func newSnapshotRestoreCommand() *cobra.Command {
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
				return fmt.Errorf("snapshot restore: %s exists (--force replaces it)", image)
			}
			m, err := bundle.Read(dir)
			if err != nil {
				return err
			}
			if expectSize != "" {
				n, err := parseSize(expectSize)
				if err != nil {
					return fmt.Errorf("--expect-size: %w", err)
				}
				if n != m.Source.VirtualSize {
					return fmt.Errorf("snapshot restore: the bundle holds %d bytes, --expect-size says %d", m.Source.VirtualSize, n)
				}
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			if _, err := verifyBundle(ctx, dir); err != nil {
				return err
			}
			if outFmt == "" {
				outFmt = "raw"
				if m.Source.Format == "qcow2" {
					outFmt = "qcow2"
				}
			}
			data, err := format.Open(filepath.Join(dir, m.Data.File), diskserve.Options{Format: m.Data.Format, ReadOnly: true})
			if err != nil {
				return err
			}
			defer data.Close()
			return convert(ctx, data, image, outFmt, nil, false, nil)
		},
	}
	cmd.Flags().StringVarP(&outFmt, "output-format", "O", "", "format of IMAGE (raw, qcow2, android-sparse, zstd); default: the source's if raw or qcow2, else raw")
	cmd.Flags().StringVar(&expectSize, "expect-size", "", "refuse a bundle whose disk is not this size")
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing IMAGE")
	return cmd
}
