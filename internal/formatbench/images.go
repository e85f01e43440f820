package formatbench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/newimage"
)

// compressedSuffix names the variant of a format whose data is stored
// compressed.
const compressedSuffix = "-compressed"

// Formats are the images Run builds by default: those of [Variants] of the
// built-in formats.
var Formats = Variants(format.All())

// Variants names the images Run can build with formats: one per format
// that can be written, and NAME-compressed for each that can store its
// data compressed, in the formats' order.
func Variants(formats []diskserve.Format) []string {
	var names []string
	for _, f := range newimage.Creatable(formats) {
		names = append(names, f.Name)
		if f.Create.Compressed {
			names = append(names, f.Name+compressedSuffix)
		}
	}
	return names
}

// A variant is an image Run builds: a format, its data compressed or not.
type variant struct {
	name     string
	format   diskserve.Format
	compress bool
}

// writable reports whether the variant's images can be written, so write
// patterns run on it.
func (v variant) writable() bool { return !v.format.ReadOnly }

// variantOf returns the variant called name, of one of formats.
func variantOf(formats []diskserve.Format, name string) (variant, error) {
	for _, f := range newimage.Creatable(formats) {
		switch name {
		case f.Name:
			return variant{name, f, false}, nil
		case f.Name + compressedSuffix:
			if f.Create.Compressed {
				return variant{name, f, true}, nil
			}
		}
	}
	return variant{}, fmt.Errorf("cannot build a %q image (formats: %v)", name, Variants(formats))
}

// build writes an image of variant v holding src's content into a new
// directory in dir, with the format's default options, and returns its
// path. The image may be several files: remove the directory.
func build(ctx context.Context, v variant, src diskserve.DiskFile, dir string, open diskserve.Options) (string, error) {
	imgDir, err := os.MkdirTemp(dir, "bench."+v.name+".")
	if err != nil {
		return "", err
	}
	path := filepath.Join(imgDir, "image")
	t := newimage.Target{Format: v.format, Compress: v.compress, Open: open}
	if err := newimage.Convert(ctx, src, path, t, nil); err != nil {
		os.RemoveAll(imgDir)
		return "", err
	}
	return path, nil
}
