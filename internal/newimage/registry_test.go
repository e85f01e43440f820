package newimage_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/formatbench"
	"github.com/diskserve/diskserve/internal/newimage"
)

// testFormat is a format that exists only in this test: a 4 KiB header
// (magic, virtual size, a label) and the disk's bytes after it. Adding it
// to the format list is the only change that makes it creatable,
// convertible and benchable.
var testFormat = diskserve.Format{
	Name:  "testfmt",
	Magic: testMagic,
	Open: func(c diskserve.DiskFile, _ *diskserve.OpenContext) (diskserve.DiskFile, error) {
		var h [testHeader]byte
		if err := diskserve.ReadFullAt(c, h[:], 0); err != nil {
			return nil, err
		}
		size := int64(binary.BigEndian.Uint64(h[8:]))
		if size < 0 || size > c.Size()-testHeader {
			return nil, diskserve.Corrupt("testfmt", 8, "size %d does not fit the file", size)
		}
		return &testDisk{Passthrough: diskserve.Passthrough{D: c}, size: size, label: string(bytes.TrimRight(h[16:80], "\x00"))}, nil
	},
	Create: &diskserve.Creator{
		Options: []diskserve.CreateOption{{Name: "label", Default: "", Help: "a name kept in the header"}},
		New: func(out *os.File, a diskserve.CreateArgs) error {
			label := a.Options.String("label", "")
			var h [testHeader]byte
			copy(h[:], testMagic)
			binary.BigEndian.PutUint64(h[8:], uint64(a.Size))
			copy(h[16:80], label)
			if _, err := out.Write(h[:]); err != nil {
				return err
			}
			return out.Truncate(testHeader + a.Size)
		},
	},
}

const (
	testMagic  = "DSTEST\x00\x01"
	testHeader = 4096
)

// testDisk is an open testfmt image: the container shifted by its header.
type testDisk struct {
	diskserve.Passthrough
	size  int64
	label string
}

func (d *testDisk) Size() int64 { return d.size }

func (d *testDisk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(d.size, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	n, err := d.D.ReadAt(p, testHeader+off)
	if n == len(p) {
		err = eof
	}
	return n, err
}

func (d *testDisk) WriteAt(p []byte, off int64) (int, error) {
	if err := diskserve.CheckWrite(d, off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.D.WriteAt(p, testHeader+off)
}

func (d *testDisk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	return append(dst, diskserve.Extent{Off: off, Len: n}), nil
}

func (d *testDisk) LocateHost(off, n int64) (diskserve.HostLocation, error) {
	return diskserve.LocateHost(d.D, testHeader+off, n)
}

func (d *testDisk) Describe(info *diskserve.Info) {
	*info = diskserve.Describe(d.D)
	info.Format, info.VirtualSize = "testfmt", d.size
	info.Specific = map[string]any{"label": d.label}
}

// withTestFormat returns the built-in formats with testfmt before raw.
func withTestFormat() diskserve.Options {
	all := format.All()
	formats := append(all[:len(all)-1:len(all)-1], testFormat, all[len(all)-1])
	return format.Options(diskserve.Options{Formats: formats})
}

func TestTestFormatCreatable(t *testing.T) {
	opts := withTestFormat()
	path := filepath.Join(t.TempDir(), "new.img")
	if err := newimage.Create(path, testFormat, diskserve.CreateArgs{Size: 1 << 20, Options: diskserve.CreateOptions{"label": "hello"}}); err != nil {
		t.Fatal(err)
	}
	d, err := diskserve.Open(path, opts) // sniffed, not named
	if err != nil {
		t.Fatal(err)
	}
	info := diskserve.Describe(d)
	d.Close()
	if info.Format != "testfmt" || info.VirtualSize != 1<<20 || info.Specific["label"] != "hello" {
		t.Errorf("the new image opens as %+v", info)
	}
	err = newimage.Create(path, testFormat, diskserve.CreateArgs{Size: 1 << 20, Options: diskserve.CreateOptions{"colour": "red"}})
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte(`unknown testfmt option "colour" (label)`)) {
		t.Errorf("an unknown option: %v", err)
	}
}

func TestTestFormatConvertible(t *testing.T) {
	opts := withTestFormat()
	want := make([]byte, 3<<20+512)
	rand.NewChaCha8([32]byte{1}).Read(want[1<<20 : 2<<20])
	src := disktest.NewMemory(want, true)
	dst := filepath.Join(t.TempDir(), "out.img")
	if err := newimage.Convert(context.Background(), src, dst, newimage.Target{Format: testFormat, Open: opts}, nil); err != nil {
		t.Fatal(err)
	}
	opts.ReadOnly = true
	d, err := diskserve.Open(dst, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	disktest.Check(t, d, want)
	if err := newimage.Convert(context.Background(), src, dst+"2", newimage.Target{Format: testFormat, Compress: true, Open: opts}, nil); err == nil {
		t.Error("a format that does not declare compression converted with -c")
	}
}

func TestTestFormatBenchable(t *testing.T) {
	opts := withTestFormat()
	if got := formatbench.Variants(opts.Formats); !slices.Contains(got, "testfmt") {
		t.Fatalf("the bench's variants %v lack testfmt", got)
	}
	rep, err := formatbench.Run(context.Background(), formatbench.Config{
		Formats:  []string{"testfmt"},
		Patterns: formatbench.Patterns,
		Depths:   []int{2},
		Runtime:  20 * time.Millisecond,
		Source:   formatbench.Generated(4 << 20),
		Dir:      t.TempDir(),
		Open:     opts,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Results) != len(formatbench.Patterns) {
		t.Fatalf("%d results, want %d", len(rep.Results), len(formatbench.Patterns))
	}
	for _, r := range rep.Results {
		if r.Format != "testfmt" || r.Skipped != "" || r.Ops == 0 {
			t.Errorf("result %+v", r)
		}
	}
}
