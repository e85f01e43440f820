package composite_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/testtool"
	"github.com/diskserve/diskserve/remote"
)

// TestSpecVector decodes crosvm's encoding of a header, a 1 MiB
// read-write partition at 0x5000 and a footer, written out by hand: the
// version is present, READ_ONLY and offset 0 are left out as proto3 does.
func TestSpecVector(t *testing.T) {
	vector := "0802" + // version 2
		"1211" + "0a0f" + hex.EncodeToString([]byte("disk.img.header")) +
		"1217" + "0a0f" + hex.EncodeToString([]byte("/img/system.img")) + "1080a001" + "1801" +
		"1215" + "0a0f" + hex.EncodeToString([]byte("disk.img.footer")) + "1080a041" +
		"1880c042" // length 0x10a000
	b, _ := hex.DecodeString(vector)
	s, err := composite.ParseSpec(b)
	if err != nil {
		t.Fatal(err)
	}
	want := []composite.Component{
		{Path: "disk.img.header", Offset: 0, Len: 0x5000},
		{Path: "/img/system.img", Offset: 0x5000, Len: 0x100000, Writable: true},
		{Path: "disk.img.footer", Offset: 0x105000, Len: 0x5000},
	}
	if s.Version != 2 || s.Length != 0x10a000 || len(s.Components) != 3 {
		t.Fatalf("spec %+v", s)
	}
	for i := range want {
		if s.Components[i] != want[i] {
			t.Errorf("component %d = %+v, want %+v", i, s.Components[i], want[i])
		}
	}
	// A component with a file offset (field 4), out of order, version left out.
	b, _ = hex.DecodeString("1205" + "0a01" + "62" + "1005" + // "b" at 5
		"1205" + "0a01" + "61" + "2007" + // "a" at 0, file offset 7
		"180a") // length 10
	if s, err = composite.ParseSpec(b); err != nil || s.Version != 0 || s.Components[0] != (composite.Component{Path: "a", Len: 5, FileOffset: 7}) || s.Components[1] != (composite.Component{Path: "b", Offset: 5, Len: 5}) {
		t.Fatalf("spec %+v, %v", s, err)
	}
	// Marshal gives back the same bytes.
	if got := (&composite.Spec{Version: 2, Length: 0x10a000, Components: want}).Marshal(); !bytes.Equal(got[len(composite.Magic):], mustHex(vector)) {
		t.Errorf("Marshal = %x\nwant      %s", got[len(composite.Magic):], vector)
	}
}

func mustHex(s string) []byte {
	b, _ := hex.DecodeString(s)
	return b
}

func TestSpecHostile(t *testing.T) {
	spec := func(length int64, comps ...composite.Component) []byte {
		return (&composite.Spec{Version: 2, Length: length, Components: comps}).Marshal()[len(composite.Magic):]
	}
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"no components", spec(100), "no components"},
		{"two at one offset", spec(100, composite.Component{Path: "a"}, composite.Component{Path: "b"}), "overlaps"},
		{"first not at 0", spec(100, composite.Component{Path: "a", Offset: 10}), "starts at 10, not 0"},
		{"length inside the last", spec(5, composite.Component{Path: "a"}, composite.Component{Path: "b", Offset: 10}), `"b" at offset 10 is empty`},
		{"no path", spec(10, composite.Component{Offset: 0}), "no file path"},
		{"version 3", (&composite.Spec{Version: 3, Length: 10, Components: []composite.Component{{Path: "a"}}}).Marshal()[len(composite.Magic):], "version 3"},
		{"truncated", spec(100, composite.Component{Path: "abcdef"})[:5], "unexpected EOF"},
		{"bad tag", []byte{0xff}, "bad field tag"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := composite.ParseSpec(tc.b); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ParseSpec: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// writeParts writes component files and returns their content, concatenated as
// the composite shows them (from each file's offset).
func writeParts(t *testing.T, dir string, sizes []int64) []byte {
	t.Helper()
	var all []byte
	for i, n := range sizes {
		b := bytes.Repeat([]byte{byte('a' + i)}, int(n)+100)
		for k := range b {
			b[k] += byte(k % 7)
		}
		if err := os.WriteFile(filepath.Join(dir, "part"+string(rune('0'+i))), b, 0o644); err != nil {
			t.Fatal(err)
		}
		all = append(all, b[100:100+n]...)
	}
	return all
}

func writeSpec(t *testing.T, path string, s *composite.Spec) {
	t.Helper()
	if err := os.WriteFile(path, s.Marshal(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// layout returns a spec of the parts written by writeParts, each used
// from file offset 100.
func layout(sizes []int64, writable func(i int) bool) *composite.Spec {
	s := &composite.Spec{Version: 2}
	for i, n := range sizes {
		s.Components = append(s.Components, composite.Component{Path: "part" + string(rune('0'+i)), Offset: s.Length, FileOffset: 100, Writable: writable(i)})
		s.Length += n
	}
	return s
}

func TestConformance(t *testing.T) {
	sizes := []int64{1 << 20, 12345, 3<<20 + 1, 4096}
	for _, rw := range []bool{false, true} {
		t.Run(map[bool]string{false: "read-only", true: "read-write"}[rw], func(t *testing.T) {
			dir := t.TempDir()
			want := writeParts(t, dir, sizes)
			path := filepath.Join(dir, "disk.composite")
			writeSpec(t, path, layout(sizes, func(int) bool { return rw }))
			t.Chdir(t.TempDir()) // component names are relative to the composite's directory
			d, err := format.Open(path, diskserve.Options{ReadOnly: !rw})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			disktest.Check(t, d, want)
		})
	}
}

// TestConformanceDirect runs the conformance suite on a writable
// composite whose components are opened with O_DIRECT: they start at file
// offset 100 and end at sizes of no alignment, so most of its I/O takes the
// unaligned direct path.
func TestConformanceDirect(t *testing.T) {
	sizes := []int64{1 << 20, 12345, 3<<20 + 1, 4096}
	dir := t.TempDir()
	want := writeParts(t, dir, sizes)
	path := filepath.Join(dir, "disk.composite")
	writeSpec(t, path, layout(sizes, func(int) bool { return true }))
	d, err := format.Open(path, diskserve.Options{OpenFile: format.FileOpener(remote.Config{}, diskserve.CacheNone)})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	disktest.CheckWith(t, d, want, disktest.Options{ByteReads: 8 << 10})
}

// TestMixedComponents puts a qcow2 component beside raw ones, one of them
// writable: writes land in it alone, and writes that touch a read-only
// component fail and change nothing.
func TestMixedComponents(t *testing.T) {
	dir := t.TempDir()
	sizes := []int64{64 << 10, 64 << 10}
	writeParts(t, dir, sizes)
	q := filepath.Join(dir, "part2.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", q, "1M")
	s := layout(sizes, func(i int) bool { return i == 1 })
	s.Components = append(s.Components, composite.Component{Path: "part2.qcow2", Offset: s.Length})
	s.Length += 1 << 20
	path := filepath.Join(dir, "disk.composite")
	writeSpec(t, path, s)
	d, err := format.Open(path, diskserve.Options{})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, "part0"))
	if _, err := d.WriteAt([]byte("xyz"), 64<<10+5); err != nil {
		t.Fatalf("write to the writable component: %v", err)
	}
	if _, err := d.WriteAt(make([]byte, 10), 64<<10-5); !errors.Is(err, diskserve.ErrReadOnly) {
		t.Fatalf("write across a read-only component: %v", err)
	}
	if err := diskserve.WriteZeroes(d, 128<<10, 4096, 0); !errors.Is(err, diskserve.ErrReadOnly) {
		t.Fatalf("zero of the read-only qcow2: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, "part0"))
	p1, _ := os.ReadFile(filepath.Join(dir, "part1"))
	if !bytes.Equal(before, after) || string(p1[100+5:100+8]) != "xyz" {
		t.Fatal("writes landed in the wrong place")
	}
	testtool.Run(t, "qemu-img", "check", q)
	ro := must(format.Open(path, diskserve.Options{ReadOnly: true}))
	if r, err := diskserve.Check(ro, diskserve.RepairNone); err != nil || r.Corruptions+r.Leaks != 0 {
		t.Fatalf("check of the composite: %+v %v", r, err)
	}
	info := diskserve.Describe(ro)
	if len(info.Children) != 3 || info.Children[2].Format != "qcow2" {
		t.Fatalf("children %+v", info.Children)
	}
}

func must(d diskserve.DiskFile, err error) diskserve.DiskFile {
	if err != nil {
		panic(err)
	}
	return d
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	self := filepath.Join(dir, "self.composite")
	writeSpec(t, self, &composite.Spec{Version: 2, Length: 10, Components: []composite.Component{{Path: "self.composite"}}})
	short := filepath.Join(dir, "short.composite")
	os.WriteFile(filepath.Join(dir, "small"), make([]byte, 50), 0o644)
	writeSpec(t, short, &composite.Spec{Version: 2, Length: 100, Components: []composite.Component{{Path: "small"}}})
	missing := filepath.Join(dir, "missing.composite")
	writeSpec(t, missing, &composite.Spec{Version: 2, Length: 100, Components: []composite.Component{{Path: "nope"}}})
	for path, want := range map[string]string{
		self:    "maximum image nesting depth",
		short:   `component "small" is 50 bytes, shorter than its range`,
		missing: `component "nope": open`,
	} {
		fds := func() int { e, _ := os.ReadDir("/proc/self/fd"); return len(e) }
		before := fds()
		if _, err := format.Open(path, diskserve.Options{ReadOnly: true}); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("open %s: %v, want %q", filepath.Base(path), err, want)
		}
		if after := fds(); after != before {
			t.Errorf("open %s: %d descriptors before, %d after", filepath.Base(path), before, after)
		}
	}
}

func FuzzParseSpec(f *testing.F) {
	f.Add((&composite.Spec{Version: 2, Length: 10, Components: []composite.Component{{Path: "a", Writable: true}, {Path: "b", Offset: 5, FileOffset: 3}}}).Marshal()[len(composite.Magic):])
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := composite.ParseSpec(b)
		if err != nil {
			return
		}
		pos := int64(0)
		for _, c := range s.Components {
			if c.Offset != pos || c.Len <= 0 {
				t.Fatalf("components do not tile: %+v", s.Components)
			}
			pos += c.Len
		}
		if pos != s.Length {
			t.Fatalf("components end at %d, length %d", pos, s.Length)
		}
	})
}
