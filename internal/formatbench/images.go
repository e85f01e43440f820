package formatbench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/format/sparse"
	"github.com/diskserve/diskserve/format/zstd"
)

// The formats Run can build, in the order tables show them.
const (
	Raw             = "raw"
	Qcow2           = "qcow2"
	Qcow2Compressed = "qcow2-compressed"
	Composite       = "composite"
	Sparse          = sparse.Name
	Zstd            = zstd.Name
)

// Formats lists them.
var Formats = []string{Raw, Qcow2, Qcow2Compressed, Composite, Sparse, Zstd}

// writable reports whether a format's images can be written, so write
// patterns run on it.
func writable(f string) bool { return f != Sparse && f != Zstd }

// build writes an image of format f holding src's content into dir and
// returns its path and the format name to open it with.
func build(ctx context.Context, f string, src diskserve.DiskFile, dir string) (path, openAs string, err error) {
	path = filepath.Join(dir, "bench."+f)
	switch f {
	case Raw:
		return path, "raw", writeRaw(path, src, 0, src.Size())
	case Qcow2, Qcow2Compressed:
		if err := qcow2.Create(path, qcow2.CreateOptions{Size: src.Size()}); err != nil {
			return "", "", err
		}
		return path, "qcow2", copyInto(path, src, f == Qcow2Compressed)
	case Composite:
		// Two raw components, each half of the disk.
		half := src.Size() / 2 &^ 4095
		parts := []composite.Component{{Path: "part0.raw", Writable: true}, {Path: "part1.raw", Offset: half, Writable: true}}
		if err := writeRaw(filepath.Join(dir, parts[0].Path), src, 0, half); err != nil {
			return "", "", err
		}
		if err := writeRaw(filepath.Join(dir, parts[1].Path), src, half, src.Size()-half); err != nil {
			return "", "", err
		}
		spec := &composite.Spec{Version: 2, Length: src.Size(), Components: parts}
		return path, "composite", os.WriteFile(path, spec.Marshal(), 0o644)
	case Sparse, Zstd:
		out, err := os.Create(path)
		if err != nil {
			return "", "", err
		}
		defer out.Close()
		if f == Sparse {
			err = sparse.Write(ctx, out, src, 0, nil)
		} else {
			err = zstd.Write(ctx, out, src, zstd.WriteOptions{}, nil)
		}
		return path, f, err
	}
	return "", "", fmt.Errorf("cannot build a %q image (formats: %v)", f, Formats)
}

// writeRaw writes n bytes of src from off into a new raw file, leaving
// holes where src reads as zeroes.
func writeRaw(path string, src diskserve.DiskFile, off, n int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(n); err != nil {
		return err
	}
	return eachDataBlock(src, off, n, func(b []byte, at int64) error {
		_, err := f.WriteAt(b, at-off)
		return err
	})
}

// copyInto writes src's data blocks into the qcow2 image at path,
// compressed if asked.
func copyInto(path string, src diskserve.DiskFile, compress bool) error {
	d, err := format.Open(path, diskserve.Options{Format: "qcow2"})
	if err != nil {
		return err
	}
	cw := d.(interface {
		WriteCompressed(p []byte, off int64) error
	})
	cs := int(diskserve.Describe(d).ClusterSize)
	err = eachDataBlock(src, 0, src.Size(), func(b []byte, at int64) error {
		if compress {
			for k := 0; k < len(b); k += cs {
				if err := cw.WriteCompressed(b[k:min(len(b), k+cs)], at+int64(k)); err != nil {
					return err
				}
			}
			return nil
		}
		_, err := d.WriteAt(b, at)
		return err
	})
	return errors.Join(err, diskserve.Flush(d), d.Close())
}

// blockSize is the unit in which images are built: data blocks are
// copied, zero blocks skipped.
const blockSize = 1 << 20

// eachDataBlock calls fn for every block of [off, off+n) of src that
// holds anything but zeroes.
func eachDataBlock(src diskserve.DiskFile, off, n int64, fn func(b []byte, at int64) error) error {
	buf := make([]byte, blockSize)
	zero := make([]byte, blockSize)
	for at := off; at < off+n; at += blockSize {
		b := buf[:min(blockSize, off+n-at)]
		if err := diskserve.ReadFullAt(src, b, at); err != nil {
			return err
		}
		if string(b) == string(zero[:len(b)]) {
			continue
		}
		if err := fn(b, at); err != nil {
			return err
		}
	}
	return nil
}
