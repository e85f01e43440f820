package main

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
)

// openFlag selects the open flags a command takes beyond -f and --verify.
type openFlag uint

const (
	withReadOnly  openFlag = 1 << iota // -r, --read-only
	withSnapshot                       // --snapshot NAME
	withSnapshotL                      // --snapshot NAME, also as -l (qemu-img convert's)
	withConfine                        // --confine DIR
	withAIO                            // --aio ENGINE
	withCache                          // --cache MODE
)

// openFlags are the flags with which a command opens its images, declared
// here once for every command.
type openFlags struct {
	format   string
	verify   bool
	readOnly bool
	snapshot string
	confine  string
	aio      aioFlag
	cache    string
	metaSize string
	remote   remoteFlags

	cacheMode diskserve.CacheMode // --cache, parsed by options
}

// register declares -f, --verify and the flags of has on fs. what names
// the images in help texts ("IMAGE", "SRC").
func (f *openFlags) register(fs *pflag.FlagSet, has openFlag, what string) {
	fs.StringVarP(&f.format, "format", "f", "", "format of "+what+" ("+strings.Join(format.Names(), ", ")+"); detected when omitted")
	fs.BoolVar(&f.verify, "verify", false, "verify "+what+"'s checksums (Android sparse CRC32 chunks) when opening it")
	if has&withReadOnly != 0 {
		fs.BoolVarP(&f.readOnly, "read-only", "r", false, "open "+what+" read-only")
	}
	switch {
	case has&withSnapshotL != 0:
		fs.StringVarP(&f.snapshot, "snapshot", "l", "", "use the qcow2 internal snapshot NAME (or ID) of "+what+", read-only, as qemu-img -l does")
	case has&withSnapshot != 0:
		fs.StringVar(&f.snapshot, "snapshot", "", "use the qcow2 internal snapshot NAME (or ID) of "+what+", read-only")
	}
	if has&withConfine != 0 {
		fs.StringVar(&f.confine, "confine", "", "refuse backing files and components outside DIR (symlinks followed); for images from untrusted sources")
	}
	if has&withAIO != 0 {
		f.aio.register(fs)
	}
	if has&withCache != 0 {
		fs.StringVar(&f.cache, "cache", string(diskserve.CacheWriteback), "cache mode, as qemu's: writeback (host page cache; writes durable on flush), none (O_DIRECT, bypassing it), writethrough (each write durable before its reply), directsync (both), unsafe (flushes ignored: for scratch disks)")
	}
	fs.StringVar(&f.metaSize, "metadata-cache", "0", "memory for the metadata tables of each image (qcow2 L2 tables and refcount blocks, as qemu's l2-cache-size); 0: the format's default (16M for qcow2)")
	f.remote.register(fs, has&withConfine != 0)
}

// options returns the opener's options for the flags; readOnly forces a
// read-only open, as a snapshot does.
func (f *openFlags) options(readOnly bool, log *slog.Logger) (diskserve.Options, error) {
	opts := diskserve.Options{
		Format:   f.format,
		ReadOnly: readOnly || f.readOnly || f.snapshot != "",
		Verify:   f.verify,
		Snapshot: f.snapshot,
		Logger:   log,
	}
	rc, err := f.remote.config(log)
	if err != nil {
		return opts, err
	}
	if opts.MetadataCache, err = diskserve.ParseSize(f.metaSize); err != nil || opts.MetadataCache < 0 {
		return opts, fmt.Errorf("--metadata-cache %q: a size such as 64M is needed", f.metaSize)
	}
	if f.cacheMode, err = diskserve.ParseCacheMode(f.cache); err != nil {
		return opts, fmt.Errorf("--cache: %w", err)
	}
	if f.cacheMode == diskserve.CacheUnsafe && log != nil {
		log.Warn("--cache=unsafe: flush requests are ignored, so a host crash or power loss can lose writes or corrupt the image")
	}
	opts.OpenFile = format.FileOpener(rc, f.cacheMode)
	switch {
	case f.confine != "":
		if opts.ResolvePath, err = diskserve.Confine(f.confine, f.remote.allowURLs...); err != nil {
			return opts, err
		}
	case len(f.remote.allowURLs) > 0:
		return opts, errors.New("--allow-url admits URLs under --confine; without --confine every URL is followed")
	}
	return opts, nil
}

// open opens the image at path with the flags' options.
func (f *openFlags) open(path string, readOnly bool, log *slog.Logger) (diskserve.DiskFile, error) {
	opts, err := f.options(readOnly, log)
	if err != nil {
		return nil, err
	}
	return format.Open(path, opts)
}

// imageFlags are the flags of the commands that report on one image:
// the open flags and --output.
type imageFlags struct {
	openFlags
	output string
}

func (f *imageFlags) register(fs *pflag.FlagSet) {
	f.openFlags.register(fs, withConfine, "IMAGE")
	fs.StringVar(&f.output, "output", "human", "output format: human or json")
}

// withImage validates the flags, opens the image named by args[0] and
// calls fn with it, closing it afterwards.
func (f *imageFlags) withImage(args []string, readOnly bool, fn func(diskserve.DiskFile) error) error {
	if f.output != "human" && f.output != "json" {
		return fmt.Errorf("--output must be human or json, not %q", f.output)
	}
	d, err := f.open(args[0], readOnly, nil)
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

// humanSize formats n bytes as qemu-img does: three significant digits
// of the largest binary unit that keeps them under 1000 ("10 MiB", "1.03
// MiB", "0.999 MiB"), in C's %g, whose rounding up gives "1e+03 KiB" just
// below 1000 KiB, as qemu-img prints it.
func humanSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	_, exp := math.Frexp(float64(n) / (1000.0 / 1024.0))
	i := min((exp-1)/10, len(units)-1)
	return fmt.Sprintf("%.3g %s", float64(n)/float64(uint64(1)<<(10*i)), units[i])
}
