// Package format lists diskserve's built-in image formats and opens images
// with them.
//
// It is the only package that knows every format: the root package holds
// the format-agnostic opener, and each format lives in its own package under
// format/, importing only the root.
package format

import (
	"fmt"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/format/sparse"
	"github.com/diskserve/diskserve/format/vdi"
	"github.com/diskserve/diskserve/format/vhd"
	"github.com/diskserve/diskserve/format/vhdx"
	"github.com/diskserve/diskserve/format/vmdk"
	"github.com/diskserve/diskserve/format/zstd"
	"github.com/diskserve/diskserve/remote"
)

// All returns the built-in formats in the order the opener tries them.
// Raw matches every file and comes last.
func All() []diskserve.Format {
	return []diskserve.Format{
		composite.Format,
		qcow2.Format,
		sparse.Format,
		zstd.Format,
		vdi.Format,
		vhd.Format,
		vhdx.Format,
		vmdk.Format,
		raw.Format,
	}
}

// Options returns opts with the built-in formats and the default file
// opener ([OpenFile]) filled in where opts leaves them empty.
func Options(opts diskserve.Options) diskserve.Options {
	if opts.Formats == nil {
		opts.Formats = All()
	}
	if opts.OpenFile == nil {
		opts.OpenFile = OpenFile
	}
	return opts
}

// OpenFile opens the container of an image: an object in S3 or on an
// HTTP(S) server for a URL (read-only, through the block cache in the
// user's cache directory), a local file or block device for any other
// name ([raw.OpenFile]). It is [FileOpener] of the default configuration.
func OpenFile(name string, readOnly bool) (diskserve.DiskFile, error) {
	return FileOpener(remote.Config{}, diskserve.CacheWriteback)(name, readOnly)
}

// FileOpener returns an [diskserve.Options.OpenFile] that opens URLs as
// cfg says ([remote.Config.Open]) and local names with [raw.OpenFile], or
// [raw.OpenFileDirect] when the cache mode bypasses the page cache. Under
// the unsafe mode the local files opened for writing ignore flushes
// ([IgnoreFlushes]). (A remote image's block cache keeps its own ways: it
// writes fetched chunks with O_DIRECT whatever the mode.)
func FileOpener(cfg remote.Config, cache diskserve.CacheMode) func(name string, readOnly bool) (diskserve.DiskFile, error) {
	open := fileOpener(cfg, cache)
	if cache == diskserve.CacheUnsafe {
		return IgnoreFlushes(open)
	}
	return open
}

func fileOpener(cfg remote.Config, cache diskserve.CacheMode) func(name string, readOnly bool) (diskserve.DiskFile, error) {
	return func(name string, readOnly bool) (diskserve.DiskFile, error) {
		if !remote.IsURL(name) {
			if cache.Direct() {
				return raw.OpenFileDirect(name, readOnly)
			}
			return raw.OpenFile(name, readOnly)
		}
		if !readOnly {
			return nil, fmt.Errorf("%s: a remote image is read-only (serve it with -r, or writable with serve --overlay DIR, or make a local qcow2 overlay of it): %w", diskserve.DisplayName(name), diskserve.ErrReadOnly)
		}
		d, err := cfg.Open(name)
		if err != nil {
			return nil, err // not a nil *cache.Disk in an interface
		}
		return d, nil
	}
}

// IgnoreFlushes returns open with the files it opens for writing ignoring
// flushes, a format's own included (the ordering flushes of a qcow2 or a
// VHDX between data and the metadata that points at it), as qemu's unsafe
// cache mode ignores them at every layer: nothing waits for the disk, and
// a host crash can leave the image corrupt.
func IgnoreFlushes(open func(name string, readOnly bool) (diskserve.DiskFile, error)) func(name string, readOnly bool) (diskserve.DiskFile, error) {
	return func(name string, readOnly bool) (diskserve.DiskFile, error) {
		d, err := open(name, readOnly)
		if err != nil || readOnly {
			return d, err
		}
		return diskserve.WithCache(d, diskserve.CacheUnsafe), nil
	}
}

// WriteBehind returns open with the local files it opens for writing set
// to write behind ([raw.Disk.SetWriteBehind]), for the commands that
// copy much data into an image and flush it once at the end.
func WriteBehind(open func(name string, readOnly bool) (diskserve.DiskFile, error)) func(name string, readOnly bool) (diskserve.DiskFile, error) {
	return func(name string, readOnly bool) (diskserve.DiskFile, error) {
		d, err := open(name, readOnly)
		if r, ok := d.(*raw.Disk); ok && err == nil {
			r.SetWriteBehind()
		}
		return d, err
	}
}

// Open opens the image at path with the built-in formats: it is
// [diskserve.Open] with [Options] applied to opts.
func Open(path string, opts diskserve.Options) (diskserve.DiskFile, error) {
	return diskserve.Open(path, Options(opts))
}

// Names returns the names of the built-in formats, for help texts.
func Names() []string {
	var names []string
	for _, f := range All() {
		names = append(names, f.Name)
	}
	return names
}
