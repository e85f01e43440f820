package diskserve

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/url"
	"path/filepath"
	"strings"
)

// A Format describes one on-disk image format to the opener.
//
// The opener sniffs an image by testing each format of [Options.Formats] in
// order, with Magic and then Match, and hands the image to the first format
// that claims it. A format that claims an image must then open it or fail:
// the opener never tries the next format, so a damaged qcow2 file is an
// error, not a raw disk.
type Format struct {
	// Name is the format's name: the value of `-f`, and what qcow2 records
	// as a backing file's format ("raw", "qcow2").
	Name string

	// Magic, if not empty, is a prefix the image must start with; a '?'
	// matches any byte, as in [image.RegisterFormat].
	Magic string

	// Match, if not nil, decides from the first bytes of the image (up to
	// [SniffSize]; fewer for a shorter file) whether it is of this format.
	// It is consulted only if Magic is empty or matched.
	Match func(head []byte) bool

	// Open opens the image held by c, the image file opened by
	// [Options.OpenFile]. Options and the nesting context come in oc;
	// formats that refer to other images open them with
	// [OpenContext.OpenChild] and nothing else.
	//
	// On success the returned disk owns c and closes it in its own Close
	// (a format stored verbatim, like raw, may return c itself). On error
	// Open closes whatever it opened itself and leaves c alone: the opener
	// closes it.
	Open func(c DiskFile, oc *OpenContext) (DiskFile, error)

	// Snapshots says that Open honours [OpenContext.Snapshot]: the format
	// has internal snapshots (qcow2). The opener refuses
	// [Options.Snapshot] for every other format.
	Snapshots bool

	// ReadOnly says that images of the format are never written in place
	// (they are written whole, by a [Creator]'s Write, or not at all): the
	// opener refuses to open one read-write, with an error that says how
	// to get a writable copy.
	ReadOnly bool

	// Create, if not nil, says how the format makes new images; a format
	// that is only read has none.
	Create *Creator
}

// SniffSize is how many bytes from the start of an image the opener reads
// to recognise its format: one aligned 4 KiB block, which also works when
// the file is opened with O_DIRECT.
const SniffSize = 4096

// DefaultMaxDepth is the nesting depth allowed when [Options.MaxDepth] is 0:
// an image at depth 10 (the eleventh in a backing chain) opens, one at depth
// 11 fails with [ErrNestingDepth]. crosvm and cloud-hypervisor use the same
// limit.
const DefaultMaxDepth = 10

// Options control [Open]. The zero value of each field means its default,
// except Formats and OpenFile, which the opener cannot do without; package
// format fills them with the built-in formats.
type Options struct {
	// Formats are the formats the opener knows, in the order it tries
	// them when sniffing. A format that matches anything (raw) goes last.
	Formats []Format

	// OpenFile opens the image file at path, read-only or read-write, as
	// the container that a format parses.
	OpenFile func(path string, readOnly bool) (DiskFile, error)

	// Format names the format of the top image, skipping sniffing. Nested
	// images carry their own format or are sniffed (see
	// [OpenContext.OpenChild]).
	Format string

	// ReadOnly opens the top image read-only.
	ReadOnly bool

	// MaxDepth is the deepest nesting allowed; 0 means [DefaultMaxDepth].
	MaxDepth int

	// ResolvePath maps a name recorded in an image (a backing file, a
	// composite component) to the path to open. referrer is the path of
	// the image that holds the name. The default resolves a relative name
	// against the referrer's directory and accepts every name; a server
	// that opens untrusted images sets a stricter policy, for example one
	// that refuses names outside a directory.
	ResolvePath func(referrer, name string) (string, error)

	// Snapshot, if not empty, names an internal snapshot (by ID or name)
	// of the image named to [Open] to open instead of its current state,
	// read-only. Formats without internal snapshots refuse it.
	Snapshot string

	// NoBacking opens the image named to [Open] without its backing
	// file: what the image leaves to it reads as zeroes. It is for
	// changing the backing file an image records (rebase -u), which must
	// work when that file is missing or its format unrecorded; formats
	// that can change it ([BackingChanger]) honour it.
	NoBacking bool

	// Verify asks formats that carry checksums of their data (Android
	// sparse CRC32 chunks) to verify them when opening, at the cost of
	// reading the whole image; an image that fails does not open.
	Verify bool

	// MetadataCache bounds the memory each image keeps of its format's
	// metadata tables (qcow2's L2 tables and refcount blocks, as qemu's
	// l2-cache-size and refcount-cache-size together); 0 means the
	// format's default.
	MetadataCache int64

	// Logger receives warnings about the images opened. nil discards them.
	Logger *slog.Logger
}

// Open opens the image at path, recognises its format (or uses
// opts.Format) and returns it as a DiskFile. Errors name the file with an
// [*fs.PathError].
func Open(path string, opts Options) (DiskFile, error) {
	if len(opts.Formats) == 0 || opts.OpenFile == nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: errors.New("diskserve.Options needs Formats and OpenFile (package format has the defaults)")}
	}
	if opts.MaxDepth == 0 {
		opts.MaxDepth = DefaultMaxDepth
	}
	if opts.ResolvePath == nil {
		opts.ResolvePath = ResolveRelative
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	oc := &OpenContext{opts: &opts, path: path, readOnly: opts.ReadOnly}
	return oc.open(opts.Format)
}

// ResolveRelative is the default [Options.ResolvePath]: an absolute name or
// a URL (scheme://...) is used as it is, and a relative one is taken
// relative to the referring image (as qemu does for backing files): to its
// directory, or for an image opened by URL, as a relative URL reference.
// It is never taken relative to the working directory.
func ResolveRelative(referrer, name string) (string, error) {
	switch {
	case name == "":
		return "", errors.New("empty image name")
	case isURL(name), filepath.IsAbs(name):
		return name, nil
	case isURL(referrer):
		base, err := url.Parse(referrer)
		if err != nil {
			return "", err
		}
		ref, err := url.Parse(name)
		if err != nil {
			return "", err
		}
		return base.ResolveReference(ref).String(), nil
	}
	return filepath.Join(filepath.Dir(referrer), name), nil
}

// isURL reports whether name is a URL (scheme://...) rather than a path.
func isURL(name string) bool {
	scheme, _, ok := strings.Cut(name, "://")
	return ok && scheme != "" && !strings.ContainsAny(scheme, "/.")
}

// DisplayName returns name as messages and reports may show it: a path as
// it is, a URL without its user information, query and fragment, which
// may hold credentials (a presigned URL's signature).
func DisplayName(name string) string {
	if !isURL(name) {
		return name
	}
	u, err := url.Parse(name)
	if err != nil {
		return "(an unparsable URL)"
	}
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return u.String()
}

// An OpenContext is what a [Format] gets to know about the image it opens:
// the path, the options, and the nesting depth. Formats that refer to other
// images open them only through [OpenContext.OpenChild], so that the depth
// limit and the path policy apply to every nested open.
type OpenContext struct {
	opts     *Options
	path     string
	readOnly bool
	depth    int // unexported so that no caller can reset it
}

// Path returns the path of the image being opened.
func (oc *OpenContext) Path() string { return oc.path }

// ReadOnly reports whether the image is being opened read-only.
func (oc *OpenContext) ReadOnly() bool { return oc.readOnly }

// Depth returns the nesting depth of the image being opened: 0 for the
// image named to [Open], 1 for its backing file or components, and so on.
func (oc *OpenContext) Depth() int { return oc.depth }

// Snapshot returns the internal snapshot to open instead of the image's
// current state ([Options.Snapshot]), for the image named to [Open] only:
// backing files and components open as they are.
func (oc *OpenContext) Snapshot() string {
	if oc.depth > 0 {
		return ""
	}
	return oc.opts.Snapshot
}

// NoBacking reports whether the image is opened without its backing file
// ([Options.NoBacking]): only the image named to [Open] is.
func (oc *OpenContext) NoBacking() bool { return oc.depth == 0 && oc.opts.NoBacking }

// Verify reports whether checksums should be verified at open
// ([Options.Verify]).
func (oc *OpenContext) Verify() bool { return oc.opts.Verify }

// MetadataCache returns [Options.MetadataCache].
func (oc *OpenContext) MetadataCache() int64 { return oc.opts.MetadataCache }

// Logger returns the logger for warnings about the image.
func (oc *OpenContext) Logger() *slog.Logger { return oc.opts.Logger }

// OpenChild opens an image that the current one refers to: a backing file,
// a composite component. name is as recorded in the current image and is
// resolved by [Options.ResolvePath]. format names the child's format, or is
// empty to sniff it; formats pass what the image records, and sniff only
// where their specification says to. The child is one level deeper than the
// current image; past [Options.MaxDepth] the open fails with an error
// wrapping [ErrNestingDepth], before any file is opened.
func (oc *OpenContext) OpenChild(name, format string, readOnly bool) (DiskFile, error) {
	if oc.depth >= oc.opts.MaxDepth {
		return nil, &fs.PathError{Op: "open", Path: DisplayName(name), Err: fmt.Errorf("%w (%d)", ErrNestingDepth, oc.opts.MaxDepth)}
	}
	path, err := oc.opts.ResolvePath(oc.path, name)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: DisplayName(name), Err: err}
	}
	child := &OpenContext{opts: oc.opts, path: path, readOnly: readOnly, depth: oc.depth + 1}
	return child.open(format)
}

// open opens oc.path as the named format, or sniffs it if format is "".
func (oc *OpenContext) open(format string) (DiskFile, error) {
	c, err := oc.opts.OpenFile(oc.path, oc.readOnly)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			return nil, err
		}
		return nil, &fs.PathError{Op: "open", Path: DisplayName(oc.path), Err: err}
	}
	f, err := oc.pick(c, format)
	if err == nil && f.ReadOnly && !oc.readOnly {
		err = Unsupported(f.Name, -1, "%s images cannot be written in place: open it read-only, or convert it first (diskserve convert -O raw)", f.Name)
	}
	if err == nil && oc.Snapshot() != "" {
		switch {
		case !f.Snapshots:
			err = fmt.Errorf("%s images have no internal snapshots (asked for %q)", f.Name, oc.Snapshot())
		case !oc.readOnly:
			err = fmt.Errorf("snapshot %q: snapshots open read-only", oc.Snapshot())
		}
	}
	if err == nil {
		var d DiskFile
		if d, err = f.Open(c, oc); err == nil {
			if format == "" && f.Magic == "" && f.Match == nil { // the catch-all: raw
				d = guardProbed(d, oc.path, oc.opts.Formats)
			}
			return d, nil
		}
	}
	c.Close()
	return nil, &fs.PathError{Op: "open", Path: DisplayName(oc.path), Err: err}
}

// pick returns the format called name, or the first format that matches
// the start of c.
func (oc *OpenContext) pick(c DiskFile, name string) (Format, error) {
	if name != "" {
		return LookupFormat(oc.opts.Formats, name)
	}
	head := make([]byte, min(SniffSize, max(c.Size(), 0)))
	if n, err := c.ReadAt(head, 0); n < len(head) {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Format{}, fmt.Errorf("read image header: %w", err)
	}
	for _, f := range oc.opts.Formats {
		if matchMagic(head, f.Magic) && (f.Match == nil || f.Match(head)) {
			return f, nil
		}
	}
	return Format{}, ErrUnknownFormat
}

// matchMagic reports whether head starts with magic, where '?' in magic
// matches any byte.
func matchMagic(head []byte, magic string) bool {
	if len(head) < len(magic) {
		return false
	}
	for i := range len(magic) {
		if magic[i] != '?' && magic[i] != head[i] {
			return false
		}
	}
	return true
}
