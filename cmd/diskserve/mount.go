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
	"github.com/diskserve/diskserve/remote"
)

func newMountCommand() *cobra.Command {
	var f openFlags
	cmd := &cobra.Command{
		Use:   "mount [-f FORMAT] [-r] [--aio=ENGINE] [--cache=MODE] IMAGE MOUNTPOINT",
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
			d, err := f.open(image, false, log)
			if err != nil {
				return err
			}
			if d, err = f.aio.wrap(diskserve.WithCache(d, f.cacheMode), log); err != nil {
				return err
			}
			defer d.Close()
			name := diskserve.DisplayName(image) // no credentials in /proc/mounts
			if !remote.IsURL(image) {
				name, _ = filepath.Abs(image)
			}
			// From here a signal unmounts: one that arrived while the mount
			// came up, or right after it said so, would otherwise kill the
			// process and leave a dead mount behind.
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
			defer signal.Stop(sig)
			srv, err := fuse.Mount(d, mountpoint, fuse.Options{Name: "diskserve:" + strings.ReplaceAll(name, ",", "_"), Logger: log})
			if err != nil {
				return err
			}
			log.Info("mounted", "image", name, "at", mountpoint, "read-only", d.ReadOnly(), "engine", engineName(d))
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
	f.register(cmd.Flags(), withReadOnly|withSnapshot|withConfine|withAIO|withCache, "IMAGE")
	return cmd
}
