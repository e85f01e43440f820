package diskserve

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
)

// A Creator is how a [Format] makes new images: the options it takes and
// how it writes. `diskserve create`, `convert` and `bench` are driven by
// it, so a format that declares one is creatable, convertible and
// benchable with no other change.
//
// A format has one of two ways of writing, or both (then Whole says
// which options take which):
//
//   - New makes an empty image, reading as zeroes, that the caller opens
//     with the format's Open and writes like any disk (raw, qcow2,
//     composite).
//   - Write writes a whole image front to back in one pass from a source
//     disk (Android sparse, seekable zstd): formats whose layout depends on
//     the data and that cannot be written in place.
//
// A format that is only read has no Creator.
type Creator struct {
	// Options are the -o options the format takes, in the order help
	// lists them. [CreateOptions.Check] refuses any other name.
	Options []CreateOption

	// Backing says that New records a backing file
	// ([CreateArgs.BackingFile]); other formats refuse one.
	Backing bool

	// Components says that New can build the image from other images
	// ([CreateArgs.Components]), and then takes no size.
	Components bool

	// Compressed says that disks New makes can store data compressed
	// through [WriteCompressed], as `convert -c` asks.
	Compressed bool

	// New makes an empty image in out, a new empty file that will be
	// named a.Path once the image is complete (until then it may have no
	// name at all). Files an image needs beside it come from a.Sidecar.
	// nil when the format has only Write.
	New func(out *os.File, a CreateArgs) error

	// Write writes the content of src to out, a new empty file that will
	// be named path, as an image of this format, reporting the source
	// bytes it has covered to progress (which may be nil). It stops with
	// ctx's error when ctx is done. nil when the format has only New.
	Write func(ctx context.Context, out *os.File, path string, src DiskFile, o CreateOptions, progress func(int64)) error

	// Whole, for a format with both New and Write, says which options
	// ask for an image written whole by Write (VMDK's streamOptimized
	// subformat); the others are made by New and filled in place.
	Whole func(o CreateOptions) bool

	// Measure, if set, says how large a file an image of the format
	// takes, as `qemu-img measure` computes it: with options o (those of
	// Options, and "preallocation" and "backing_file" where the format
	// has them), holding src's content, or empty and size bytes large
	// when src is nil.
	Measure func(o CreateOptions, size int64, src DiskFile) (Measurement, error)

	// Amend, if set, changes options o of the open image d, opened
	// read-write by this format, as `qemu-img amend` does; options it
	// cannot change it refuses, before changing anything.
	Amend func(d DiskFile, o CreateOptions) error

	// Preallocate, if set, allocates [off, off+n) of the open image d,
	// opened read-write by this format, as preallocation mode mode
	// ("metadata", "falloc" or "full", as qemu's) would have at creation:
	// what `resize --preallocation` does to the space a resize adds.
	Preallocate func(d DiskFile, off, n int64, mode string) error
}

// A Measurement is the file size a new image needs ([Creator.Measure]).
type Measurement struct {
	Required       int64 // for the content, with its metadata
	FullyAllocated int64 // were every cluster written
	// Bitmaps is the space the source's persistent dirty bitmaps take,
	// when both the source and the new image keep them; nil otherwise.
	Bitmaps *int64
}

// WritesWhole reports whether images with options o are written whole,
// by Write, rather than made empty by New.
func (c *Creator) WritesWhole(o CreateOptions) bool {
	if c.Write == nil {
		return false
	}
	return c.New == nil || c.Whole != nil && c.Whole(o)
}

// A CreateOption is one option a [Creator] takes.
type CreateOption struct {
	Name    string // as given to -o: "cluster_size"
	Default string // what an option left out means, for help texts
	Help    string // one line, lower case
}

// CreateArgs are what [Creator.New] makes an image from.
type CreateArgs struct {
	// Path is where the image will be: what names recorded in it (a
	// composite's components) are relative to.
	Path string

	// Sidecar creates a new empty file that will appear as name, in the
	// directory of Path, when the image does (a composite's components and
	// partition tables). The caller closes nothing it returns: the image's
	// maker does.
	Sidecar func(name string) (*os.File, error)

	// Container opens the file New writes (out) as a read-write
	// container, for a format that fills in the image it has laid out
	// by opening it (qcow2's preallocation). The caller closes what it
	// returns.
	Container func() (DiskFile, error)

	// Size is the virtual size in bytes; unused with Components.
	Size int64

	// Options are the format's -o options, checked against
	// [Creator.Options].
	Options CreateOptions

	// BackingFile is recorded as given, and BackingFormat with it; both
	// are "" for an image without a backing file.
	BackingFile, BackingFormat string

	// Components are the images the new image is built from, as the user
	// wrote them (a composite's --partition LABEL=PATH[:rw][:type=T]).
	Components []string

	// Open opens an image read-only, for a format that must learn the
	// size of its components. It is set whenever Components is.
	Open func(path string) (DiskFile, error)
}

// CreateOptions are -o options by name, as the user gave them. Formats
// read them with the typed getters, which name the option in their errors.
type CreateOptions map[string]string

// ParseCreateOptions parses -o arguments, each a comma-separated list of
// OPT=VALUE or OPT (which means OPT=on); a later value of an option
// replaces an earlier one.
func ParseCreateOptions(args []string) (CreateOptions, error) {
	o := CreateOptions{}
	for _, kv := range strings.Split(strings.Join(args, ","), ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			v = "on" // a bare name turns a flag on, as in qemu-img
		}
		if k == "" {
			return nil, fmt.Errorf("option %q has no name", kv)
		}
		o[k] = v
	}
	return o, nil
}

// Check returns an error unless every option in o is one of those c
// declares; the error lists them.
func (o CreateOptions) Check(format string, c *Creator) error {
	for k := range o {
		if !slices.ContainsFunc(c.Options, func(opt CreateOption) bool { return opt.Name == k }) {
			if len(c.Options) == 0 {
				return fmt.Errorf("%s images take no options (got %q)", format, k)
			}
			names := make([]string, len(c.Options))
			for i, opt := range c.Options {
				names[i] = opt.Name
			}
			return fmt.Errorf("unknown %s option %q (%s)", format, k, strings.Join(names, ", "))
		}
	}
	return nil
}

// String returns option name, or def if it was not given.
func (o CreateOptions) String(name, def string) string {
	if v, ok := o[name]; ok {
		return v
	}
	return def
}

// Size returns option name as a size in bytes ([ParseSize]), or def.
func (o CreateOptions) Size(name string, def int64) (int64, error) {
	v, ok := o[name]
	if !ok {
		return def, nil
	}
	n, err := ParseSize(v)
	if err != nil {
		return 0, fmt.Errorf("option %s: %w", name, err)
	}
	return n, nil
}

// Int returns option name as a decimal integer, or def.
func (o CreateOptions) Int(name string, def int) (int, error) {
	v, ok := o[name]
	if !ok {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, fmt.Errorf("option %s: %q is not a number", name, v)
	}
	return n, nil
}

// Bool returns option name as on or off (also true/false, yes/no), or def.
func (o CreateOptions) Bool(name string, def bool) (bool, error) {
	v, ok := o[name]
	if !ok {
		return def, nil
	}
	switch v {
	case "on", "true", "yes":
		return true, nil
	case "off", "false", "no":
		return false, nil
	}
	return false, fmt.Errorf("option %s: %q is not on or off", name, v)
}

// ParseSize parses a size in bytes with an optional suffix K, M, G, T, P
// or E (powers of 1024, either case), as qemu-img does.
func ParseSize(s string) (int64, error) {
	shift := 0
	num := s
	if n := len(num); n > 0 {
		if i := strings.IndexByte("KMGTPE", num[n-1]&^0x20); i >= 0 && num[n-1] >= 'A' {
			shift = 10 * (i + 1)
			num = num[:n-1]
		}
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q is not a size", s)
	}
	size := v * float64(int64(1)<<shift)
	if size > 1<<62 || size != float64(int64(size)) {
		return 0, fmt.Errorf("%q is not a whole number of bytes below 4 EiB", s)
	}
	return int64(size), nil
}

// LookupFormat returns the format of formats called name; the error wraps
// [ErrUnknownFormat] and lists the names known.
func LookupFormat(formats []Format, name string) (Format, error) {
	for _, f := range formats {
		if f.Name == name {
			return f, nil
		}
	}
	names := make([]string, len(formats))
	for i, f := range formats {
		names[i] = f.Name
	}
	return Format{}, fmt.Errorf("%w %q (known: %s)", ErrUnknownFormat, name, strings.Join(names, ", "))
}
