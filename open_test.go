package diskserve_test

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
)

// nestFormat is a fake nesting format, standing in for qcow2 backing files
// and composite components: "NEST\n" followed by an optional child name.
// The child is sniffed; the image's data is its own container's bytes.
var nestFormat = diskserve.Format{
	Name:  "nest",
	Magic: "NEST",
	Open: func(c diskserve.DiskFile, oc *diskserve.OpenContext) (diskserve.DiskFile, error) {
		buf := make([]byte, c.Size())
		if _, err := c.ReadAt(buf, 0); err != nil {
			return nil, err
		}
		header, child, ok := bytes.Cut(buf, []byte("\n"))
		if !ok || string(header) != "NEST" {
			return nil, diskserve.Corrupt("nest", 0, "truncated header")
		}
		n := &nestDisk{DiskFile: c}
		if name := strings.TrimSpace(string(child)); name != "" {
			var err error
			if n.child, err = oc.OpenChild(name, "", true); err != nil {
				return nil, fmt.Errorf("child: %w", err)
			}
		}
		return n, nil
	},
}

type nestDisk struct {
	diskserve.DiskFile
	child diskserve.DiskFile
}

func (n *nestDisk) Close() error {
	if n.child != nil {
		n.child.Close()
	}
	return n.DiskFile.Close()
}

func nestOptions() diskserve.Options {
	return diskserve.Options{Formats: []diskserve.Format{nestFormat, raw.Format}, OpenFile: raw.OpenFile, ReadOnly: true}
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func write(t *testing.T, path, content string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// chain writes n nest images, each referring to the next by a relative
// name, the last one a leaf, and returns the path of the first.
func chain(t *testing.T, n int) string {
	dir := t.TempDir()
	for i := range n {
		content := "NEST\n"
		if i < n-1 {
			content += fmt.Sprintf("img%d\n", i+1)
		}
		write(t, filepath.Join(dir, fmt.Sprintf("img%d", i)), content)
	}
	return filepath.Join(dir, "img0")
}

func TestOpenNestingDepth(t *testing.T) {
	for _, tc := range []struct {
		images int
		ok     bool
	}{
		{1, true},
		{diskserve.DefaultMaxDepth + 1, true},  // the last image is at depth 10
		{diskserve.DefaultMaxDepth + 2, false}, // the last image would be at depth 11
	} {
		t.Run(fmt.Sprint(tc.images), func(t *testing.T) {
			top := chain(t, tc.images)
			before := openFDs(t)
			d, err := diskserve.Open(top, nestOptions())
			if tc.ok {
				if err != nil {
					t.Fatalf("Open of a chain of %d: %v", tc.images, err)
				}
				d.Close()
			} else if !errors.Is(err, diskserve.ErrNestingDepth) {
				t.Fatalf("Open of a chain of %d: %v, want ErrNestingDepth", tc.images, err)
			}
			if after := openFDs(t); after != before {
				t.Errorf("%d file descriptors open before, %d after", before, after)
			}
		})
	}
}

func TestOpenMaxDepthOption(t *testing.T) {
	opts := nestOptions()
	opts.MaxDepth = 2
	if d, err := diskserve.Open(chain(t, 3), opts); err != nil {
		t.Fatalf("chain of 3 with MaxDepth 2: %v", err)
	} else {
		d.Close()
	}
	if _, err := diskserve.Open(chain(t, 4), opts); !errors.Is(err, diskserve.ErrNestingDepth) {
		t.Fatalf("chain of 4 with MaxDepth 2: %v, want ErrNestingDepth", err)
	}
}

func TestOpenSelfReference(t *testing.T) {
	path := write(t, filepath.Join(t.TempDir(), "self"), "NEST\nself\n")
	before := openFDs(t)
	_, err := diskserve.Open(path, nestOptions())
	if !errors.Is(err, diskserve.ErrNestingDepth) {
		t.Fatalf("Open of a self-referencing image: %v, want ErrNestingDepth", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d file descriptors open before, %d after", before, after)
	}
	if !strings.HasPrefix(err.Error(), "open "+path+": child: open ") {
		t.Errorf("error does not name the chain: %v", err)
	}
}

func TestOpenChildRelativeToReferrer(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	write(t, filepath.Join(dir, "sub", "base"), "NEST\n")
	top := write(t, filepath.Join(dir, "top"), "NEST\nsub/base\n")
	t.Chdir(t.TempDir()) // resolving against the working directory would fail
	d, err := diskserve.Open(top, nestOptions())
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}

func TestOpenResolvePathPolicy(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "base"), "NEST\n")
	top := write(t, filepath.Join(dir, "top"), "NEST\n"+filepath.Join(dir, "base")+"\n")
	opts := nestOptions()
	errAbsolute := errors.New("absolute names are not allowed")
	opts.ResolvePath = func(referrer, name string) (string, error) {
		if filepath.IsAbs(name) {
			return "", errAbsolute
		}
		return diskserve.ResolveRelative(referrer, name)
	}
	before := openFDs(t)
	if _, err := diskserve.Open(top, opts); !errors.Is(err, errAbsolute) {
		t.Fatalf("Open with a refused child path: %v", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d file descriptors open before, %d after", before, after)
	}
}

func TestOpenSniffing(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, content string
		wantErr       error // nil: opens
		raw           bool  // opens as raw
	}{
		{"nest", "NEST\n", nil, false},
		{"raw", "hello, world", nil, true},
		{"short raw", "NE", nil, true},
		{"empty", "", nil, true},
		{"truncated header", "NEST", diskserve.ErrCorrupt, false},
		{"bad header", "NESTING\n", diskserve.ErrCorrupt, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := write(t, filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")), tc.content)
			d, err := diskserve.Open(path, nestOptions())
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Open: %v, want %v", err, tc.wantErr)
				}
				var pe *fs.PathError
				if !errors.As(err, &pe) || pe.Path != path || strings.Count(err.Error(), "\n") != 0 {
					t.Fatalf("error %q does not name the file on one line", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if _, isRaw := d.(*raw.Disk); isRaw != tc.raw {
				t.Fatalf("opened as %T", d)
			}
		})
	}
}

func TestOpenExplicitFormat(t *testing.T) {
	path := write(t, filepath.Join(t.TempDir(), "img"), "NEST\n")
	opts := nestOptions()
	opts.Format = "raw"
	d, err := diskserve.Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := d.(*raw.Disk); !ok {
		t.Errorf("-f raw opened %T", d)
	}
	d.Close()
	opts.Format = "vmdk"
	if _, err := diskserve.Open(path, opts); !errors.Is(err, diskserve.ErrUnknownFormat) || !strings.Contains(err.Error(), `"vmdk" (known: nest, raw)`) {
		t.Fatalf("unknown format: %v", err)
	}
}

func TestOpenBadInput(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, path, msg string
	}{
		{"missing", filepath.Join(dir, "missing.img"), "no such file or directory"},
		{"directory", dir, "is a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := diskserve.Open(tc.path, nestOptions())
			if err == nil || !strings.Contains(err.Error(), tc.path) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Open(%s) = %v, want an error naming it and saying %q", tc.path, err, tc.msg)
			}
		})
	}
	if _, err := diskserve.Open(filepath.Join(dir, "x"), diskserve.Options{}); err == nil {
		t.Fatal("Open without formats succeeded")
	}
}

// TestProbedRawRefusesMagic: an image opened as raw because nothing else
// claimed it refuses a write that would give it a qcow2 header, within
// one request or across two, and takes any other write; with the format
// named, the write goes through.
func TestProbedRawRefusesMagic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	qcow2ish := diskserve.Format{Name: "qcow2ish", Magic: "QFI\xfb"}
	opts := diskserve.Options{Formats: []diskserve.Format{qcow2ish, raw.Format}, OpenFile: raw.OpenFile}
	d, err := diskserve.Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt([]byte("QFI\xfb\x00\x00\x00\x03"), 0); !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), "qcow2ish") {
		t.Fatalf("writing a qcow2 magic into a probed raw image: %v", err)
	}
	if _, err := d.WriteAt([]byte("QF"), 0); err != nil {
		t.Fatalf("half a magic: %v", err)
	}
	if _, err := d.WriteAt([]byte("I\xfb"), 2); !errors.Is(err, fs.ErrPermission) {
		t.Fatalf("completing the magic with a second write: %v", err)
	}
	if _, err := d.WriteAt([]byte("QFI\xfb"), 4096); err != nil {
		t.Fatalf("a magic past the first sector: %v", err)
	}
	if _, ok := diskserve.MapHost(d, 0, 512, true); ok {
		t.Fatal("the head is mapped for writing past the check")
	}
	d.Close()
	opts.Format = "raw"
	named, err := diskserve.Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer named.Close()
	if _, err := named.WriteAt([]byte("QFI\xfb"), 0); err != nil {
		t.Fatalf("with -f raw the write is the user's choice: %v", err)
	}
}

// TestConfine refuses backing names that leave the directory: an absolute
// path, a ../ escape, a symlink inside that points out; names inside,
// relative or absolute, open.
func TestConfine(t *testing.T) {
	root := t.TempDir()
	jail := filepath.Join(root, "jail")
	outside := filepath.Join(root, "outside.img")
	os.MkdirAll(filepath.Join(jail, "sub"), 0o755)
	for _, p := range []string{outside, filepath.Join(jail, "sub", "base.img")} {
		os.WriteFile(p, make([]byte, 4096), 0o644)
	}
	os.Symlink(outside, filepath.Join(jail, "link.img"))
	os.Symlink("sub/base.img", filepath.Join(jail, "inlink.img"))
	resolve, err := diskserve.Confine(jail)
	if err != nil {
		t.Fatal(err)
	}
	referrer := filepath.Join(jail, "top.img")
	for name, ok := range map[string]bool{
		"sub/base.img":                      true,
		filepath.Join(jail, "sub/base.img"): true,
		"inlink.img":                        true,
		"missing.img":                       true, // inside; the open says it is missing
		outside:                             false,
		"../outside.img":                    false,
		"sub/../../outside.img":             false,
		"link.img":                          false,
		"/etc/passwd":                       false,
	} {
		path, err := resolve(referrer, name)
		if ok && err != nil {
			t.Errorf("%s: %v", name, err)
		}
		if !ok && !errors.Is(err, diskserve.ErrOutsideConfinement) {
			t.Errorf("%s: resolved to %q (%v), want a refusal", name, path, err)
		}
	}
	if _, err := diskserve.Confine(filepath.Join(root, "nope")); err == nil {
		t.Error("a missing confinement directory was accepted")
	}
}

// TestOpenReadOnlyFormat opens an image of a format that is never written
// in place: read-only it opens, read-write the opener refuses it, saying
// how to get a writable copy, before the format sees it.
func TestOpenReadOnlyFormat(t *testing.T) {
	path := write(t, filepath.Join(t.TempDir(), "img"), "FROZEN\n")
	opened := 0
	frozen := diskserve.Format{Name: "frozen", Magic: "FROZEN", ReadOnly: true, Open: func(c diskserve.DiskFile, _ *diskserve.OpenContext) (diskserve.DiskFile, error) {
		opened++
		return c, nil
	}}
	opts := diskserve.Options{Formats: []diskserve.Format{frozen, raw.Format}, OpenFile: raw.OpenFile}
	if _, err := diskserve.Open(path, opts); !errors.Is(err, errors.ErrUnsupported) || !strings.Contains(err.Error(), "frozen images cannot be written in place") || opened != 0 {
		t.Fatalf("a read-write open: %v (format opened %d times)", err, opened)
	}
	opts.ReadOnly = true
	d, err := diskserve.Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}

// TestResolveURLs resolves names against an image opened by URL as a
// relative URL reference, and keeps URLs and absolute paths as they are;
// Confine refuses every URL an image records.
func TestResolveURLs(t *testing.T) {
	for _, tc := range []struct{ referrer, name, want string }{
		{"https://h/dir/top.qcow2?sig=x", "base.qcow2", "https://h/dir/base.qcow2"},
		{"https://h/dir/top.qcow2", "../b/base.raw", "https://h/b/base.raw"},
		{"/local/top.qcow2", "http://h/base.raw", "http://h/base.raw"},
		{"https://h/dir/top.qcow2", "/local/base.raw", "/local/base.raw"},
		{"/local/top.qcow2", "base.raw", "/local/base.raw"},
		{"s3://golden/vm/top.qcow2", "base.qcow2", "s3://golden/vm/base.qcow2"},
	} {
		if got, err := diskserve.ResolveRelative(tc.referrer, tc.name); err != nil || got != tc.want {
			t.Errorf("ResolveRelative(%q, %q) = %q, %v; want %q", tc.referrer, tc.name, got, err, tc.want)
		}
	}
	confine, err := diskserve.Confine(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := confine(filepath.Join(t.TempDir(), "top.qcow2"), "http://169.254.169.254/latest?token=x"); !errors.Is(err, diskserve.ErrOutsideConfinement) || strings.Contains(err.Error(), "token") {
		t.Errorf("a URL under confinement: %v", err)
	}
	allowing, err := diskserve.Confine(t.TempDir(), "https://h/golden", "s3://bucket/")
	if err != nil {
		t.Fatal(err)
	}
	for name, ok := range map[string]bool{
		"https://h/golden/base.qcow2":      true,
		"https://h/golden":                 true,
		"s3://bucket/x/base.qcow2":         true,
		"https://h/goldenrod/base.qcow2":   false,
		"https://h/golden/../etc/passwd":   false,
		"s3://bucket2/base.qcow2":          false,
		"http://169.254.169.254/latest":    false,
		"https://h.evil/golden/base.qcow2": false,
	} {
		_, err := allowing(filepath.Join(t.TempDir(), "top.qcow2"), name)
		if (err == nil) != ok || err != nil && !errors.Is(err, diskserve.ErrOutsideConfinement) {
			t.Errorf("%s under --allow-url: %v", name, err)
		}
	}
}
