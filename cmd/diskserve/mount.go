package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/export/fuse"
	"github.com/diskserve/diskserve/format"
)

func newMountCommand() *cobra.Command {
	var (
		fmtName  string
		readOnly bool
		verify   bool
		aio      aioFlag
		confine  string
		snapshot string
	)
	cmd := &cobra.Command{
		Use:   "mount [-f FORMAT] [-r] [--aio=ENGINE] IMAGE MOUNTPOINT",
		Short: "Show an image's content as a file, through FUSE",
		Long: `mount serves the guest-visible bytes of IMAGE as a file until it is
interrupted (SIGINT or SIGTERM), then unmounts, flushes the image and exits.

If MOUNTPOINT is an existing regular file, the image appears at that path
(as qemu's FUSE export does); if it is a directory, it appears inside it as
"disk". The file supports read, write, fsync, fallocate (punch hole and zero
range) and SEEK_DATA/SEEK_HOLE, so cp --sparse, qemu-img and mkfs work on it.
Formats that cannot be written (Android sparse, zstd) need -r.

If the file is still open when the mount is stopped, it is detached at once
and served until the last open file is closed.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			image, mountpoint := args[0], args[1]
			log := slog.New(slog.NewTextHandler(os.Stderr, nil))
			opts := diskserve.Options{Format: fmtName, ReadOnly: readOnly || snapshot != "", Verify: verify, Logger: log, Snapshot: snapshot}
			if confine != "" {
				var err error
				if opts.ResolvePath, err = diskserve.Confine(confine); err != nil {
					return err
				}
			}
			d, err := format.Open(image, opts)
			if err != nil {
				return err
			}
			if d, err = aio.wrap(d, log); err != nil {
				return err
			}
			defer d.Close()
			abs, _ := filepath.Abs(image)
			srv, err := fuse.Mount(d, mountpoint, fuse.Options{Name: "diskserve:" + strings.ReplaceAll(abs, ",", "_"), Logger: log})
			if err != nil {
				return err
			}
			log.Info("mounted", "image", image, "at", mountpoint, "read-only", d.ReadOnly(), "engine", engineName(d))
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
			s := <-sig
			log.Info("unmounting", "signal", s.String())
			if err := srv.Unmount(); err != nil {
				return err
			}
			srv.Wait()
			if err := diskserve.Flush(d); err != nil {
				return fmt.Errorf("flush %s: %w", image, err)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&fmtName, "format", "f", "", "image format; detected when omitted")
	fl.BoolVarP(&readOnly, "read-only", "r", false, "mount read-only")
	fl.BoolVar(&verify, "verify", false, "verify the image's checksums (Android sparse CRC32 chunks) before mounting")
	fl.StringVar(&snapshot, "snapshot", "", "mount the qcow2 internal snapshot NAME (or ID), read-only")
	aio.register(fl)
	fl.StringVar(&confine, "confine", "", "refuse backing files and components outside DIR (symlinks followed)")
	return cmd
}
