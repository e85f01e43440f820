package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/commit"
)

func newCommitCommand() *cobra.Command {
	var (
		flags             openFlags
		base              string
		keep, quiet, show bool
	)
	cmd := &cobra.Command{
		Use:   "commit [-f FMT] [-b BASE] [-d] [-q] [-p] IMAGE",
		Short: "Write an overlay's data into its backing file",
		Long: `commit writes what IMAGE, an overlay, holds into its backing file, or with
-b into BASE further down its backing chain (then with the data of every
image between them), as qemu-img commit does: "Image committed." It reads
only the ranges the committed layers hold, and copies on four goroutines
at once. BASE grows to IMAGE's size if it is smaller.

Then IMAGE is emptied (its clusters dropped, so that the backing file
shows through), unless -d is given or -b names a deeper image (as in
qemu-img, the images above BASE then keep their data). Only qcow2
overlays can be emptied: commit refuses another format's overlay without
-d before writing anything.

BASE is changed in place: every other image that uses it as a backing
file (or an image between IMAGE and BASE) sees the committed data too.
A crash during the copy leaves BASE partly written and IMAGE untouched,
so that IMAGE's chain still reads as before; a crash while IMAGE is
emptied leaves some of its clusters dropped, where BASE holds the same
data. Run it again to finish.`,
		Args: oneImage,
		RunE: func(cmd *cobra.Command, args []string) error {
			top := args[0]
			opts, err := flags.options(true, nil)
			if err != nil {
				return err
			}
			d, err := format.Open(top, opts)
			if err != nil {
				return err
			}
			info := diskserve.Describe(d)
			d.Close()
			target, layers, err := findBase(info, base)
			if err != nil {
				return err
			}
			empty := !keep && base == ""
			if empty && info.Format != "qcow2" {
				return fmt.Errorf("%s: only qcow2 overlays can be emptied after a commit, not %s ones: pass -d to keep its data", top, info.Format)
			}

			// The base, for writing first: the chain then reads its copy
			// of it without the lock.
			bopts := opts
			bopts.Format, bopts.ReadOnly = target.Format, false
			bopts.OpenFile = format.WriteBehind(opts.OpenFile)
			b, err := format.Open(target.Filename, bopts)
			if err != nil {
				return fmt.Errorf("open %s for writing: %w", target.Filename, err)
			}
			toClose := []diskserve.DiskFile{b} // closed on the way out unless closed before
			defer func() {
				for _, d := range toClose {
					d.Close()
				}
			}()
			topts := opts
			openFile := opts.OpenFile
			topts.OpenFile = func(path string, readOnly bool) (diskserve.DiskFile, error) {
				if samePath(path, target.Filename) {
					return commit.OpenUnlocked(path)
				}
				return openFile(path, readOnly)
			}
			t, err := format.Open(top, topts)
			if err != nil {
				return err
			}
			toClose = append(toClose, t)
			if t.Size() > b.Size() {
				if err := diskserve.Resize(b, t.Size()); err != nil {
					return fmt.Errorf("grow %s to %s's size: %w", target.Filename, top, err)
				}
			}
			progress, done := newProgress(show && !quiet, t.Size(), "committing")
			defer done()
			if err := commit.Copy(cmd.Context(), b, t, layers, progress); err != nil {
				return fmt.Errorf("commit %s into %s: %w", top, target.Filename, err)
			}
			if err := diskserve.Flush(b); err != nil {
				return fmt.Errorf("commit %s into %s: %w", top, target.Filename, err)
			}
			toClose = nil
			if err := errors.Join(t.Close(), b.Close()); err != nil {
				return err
			}
			if empty {
				o := opts
				o.ReadOnly = false
				d, err := format.Open(top, o)
				if err != nil {
					return fmt.Errorf("empty %s: %w", top, err)
				}
				err = diskserve.MakeEmpty(d)
				if err = errors.Join(err, d.Close()); err != nil {
					return fmt.Errorf("empty %s: %w", top, err)
				}
			}
			if !quiet {
				fmt.Fprintln(cmd.OutOrStdout(), "Image committed.")
			}
			return nil
		},
	}
	flags.register(cmd.Flags(), withConfine, "IMAGE")
	cmd.Flags().StringVarP(&base, "base", "b", "", "the image of the backing chain to commit into (default: the backing file); implies -d")
	cmd.Flags().BoolVarP(&keep, "keep", "d", false, "keep IMAGE's data after the commit instead of emptying it")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print nothing on success")
	cmd.Flags().BoolVarP(&show, "progress", "p", false, "show a progress bar")
	return cmd
}

// findBase finds the image of info's backing chain that commit writes
// into: name's (as given, or as the path it resolves to), or the backing
// file when name is "". layers is how many images lie above it.
func findBase(info diskserve.Info, name string) (base diskserve.Info, layers int, err error) {
	if info.Backing == nil {
		return base, 0, errors.New("image does not have a backing file")
	}
	if name == "" {
		return *info.Backing, 1, nil
	}
	for b, k := info.Backing, 1; b != nil; b, k = b.Backing, k+1 {
		if samePath(b.Filename, name) {
			return *b, k, nil
		}
	}
	return base, 0, fmt.Errorf("did not find %q in the backing chain of %q", name, info.Filename)
}

// samePath reports whether two paths name the same file: equal once
// cleaned and made absolute, or the same file on disk.
func samePath(a, b string) bool {
	aa, err1 := filepath.Abs(a)
	ab, err2 := filepath.Abs(b)
	if err1 == nil && err2 == nil && aa == ab {
		return true
	}
	sa, err1 := os.Stat(a)
	sb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(sa, sb)
}
