package vmdk_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/vmdk"
	"github.com/diskserve/diskserve/internal/formattest"
	"github.com/diskserve/diskserve/internal/newimage"
	"github.com/diskserve/diskserve/internal/testtool"
	"golang.org/x/sys/unix"
)

var (
	sparse      = formattest.Variant{Name: "monolithicSparse"}
	flat        = formattest.Variant{Name: "monolithicFlat", Options: []string{"subformat=monolithicFlat"}}
	twoGbSparse = formattest.Variant{Name: "twoGbMaxExtentSparse", Options: []string{"subformat=twoGbMaxExtentSparse"}}
	twoGbFlat   = formattest.Variant{Name: "twoGbMaxExtentFlat", Options: []string{"subformat=twoGbMaxExtentFlat"}}
	stream      = formattest.Variant{Name: "streamOptimized", Options: []string{"subformat=streamOptimized"}}
	zeroed      = formattest.Variant{Name: "zeroed_grain", Options: []string{"zeroed_grain=on"}}
	ova         = formattest.Variant{Name: "OVA options", Options: []string{"adapter_type=lsilogic,subformat=streamOptimized,compat6"}}
)

// TestReadsQemuImages: every subformat qemu-img converts to reads byte
// for byte, found by sniffing.
func TestReadsQemuImages(t *testing.T) {
	formattest.ReadsQemuImages(t, "vmdk", 9<<20+12345, true, []formattest.Variant{sparse, flat, twoGbSparse, twoGbFlat, stream, zeroed, ova})
}

// TestWritesLikeQemu: random workloads on the writable subformats read
// back the same through qemu-img, whose check stays clean.
func TestWritesLikeQemu(t *testing.T) {
	formattest.WritesLikeQemu(t, "vmdk", 9<<20+512, true, []formattest.Variant{sparse, flat, twoGbSparse, twoGbFlat, zeroed})
}

// TestConvertsLikeQemu: diskserve's conversions, the stream-optimised
// one included, compare equal in qemu-img.
func TestConvertsLikeQemu(t *testing.T) {
	formattest.ConvertsLikeQemu(t, "vmdk", 9<<20+1536, true, []formattest.Variant{sparse, flat, twoGbSparse, twoGbFlat, stream, zeroed, ova})
}

// TestInfoAgreesWithQemu: qemu-img info reads diskserve's disks with the
// create type and adapter asked for.
func TestInfoAgreesWithQemu(t *testing.T) {
	dir := t.TempDir()
	for _, v := range []formattest.Variant{sparse, flat, twoGbFlat, ova} {
		img := filepath.Join(dir, strings.ReplaceAll(v.Name, " ", "_")+".vmdk")
		if strings.Contains(v.Name, "OVA") {
			formattest.Convert(t, mustOpen(t, "../../testdata/raw/pattern.img", "raw"), img, "vmdk", v.Options)
		} else {
			formattest.Create(t, img, "vmdk", 5<<20, v.Options)
		}
		out := string(testtool.Run(t, "qemu-img", "info", img))
		want := v.Name
		if strings.Contains(v.Name, "OVA") {
			want = "streamOptimized"
		}
		if !strings.Contains(out, "create type: "+want) {
			t.Fatalf("qemu-img info:\n%s", out)
		}
		d := mustOpen(t, img, "")
		info := diskserve.Describe(d)
		if info.Specific["create-type"] != want {
			t.Fatalf("create type %v, want %s", info.Specific["create-type"], want)
		}
		if strings.Contains(v.Name, "OVA") && info.Specific["adapter-type"] != "lsilogic" {
			t.Fatalf("adapter %v", info.Specific["adapter-type"])
		}
	}
}

// TestSplitExtents: a 5 GiB twoGbMaxExtent disk of each kind, written by
// qemu-io and by diskserve across the 2 GiB extent boundaries; each reads
// the other's writes.
func TestSplitExtents(t *testing.T) {
	for _, sub := range []string{"twoGbMaxExtentSparse", "twoGbMaxExtentFlat"} {
		for _, maker := range []string{"qemu-img", "diskserve"} {
			t.Run(sub+"/"+maker, func(t *testing.T) {
				img := filepath.Join(t.TempDir(), "big.vmdk")
				if maker == "qemu-img" {
					testtool.Run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sub, img, "5G")
				} else {
					formattest.Create(t, img, "vmdk", 5<<30, []string{"subformat=" + sub})
				}
				testtool.Run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 2147479552 8192", "-c", "write -P 0x6b 4294967296 4096", img)
				d, err := format.Open(img, diskserve.Options{Format: "vmdk"})
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, 8192)
				if _, err := d.ReadAt(got, 2147479552); err != nil || strings.Count(string(got), "\x5a") != 8192 {
					t.Fatalf("qemu-io's write across the first boundary reads back wrong: %v", err)
				}
				p := []byte(strings.Repeat("\x7c", 12288))
				if _, err := d.WriteAt(p, 4294967296-4096); err != nil {
					t.Fatal(err)
				}
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
				testtool.Run(t, "qemu-io", "-f", "vmdk", "-c", "read -P 0x7c 4294963200 12288", "-c", "read -P 0x5a 2147479552 8192", img)
				testtool.QemuCheck(t, img)
			})
		}
	}
}

// TestVMFS: an ESXi disk (a descriptor with a VMFS extent) reads as its
// flat file does.
func TestVMFS(t *testing.T) {
	dir := t.TempDir()
	testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", "../../testdata/raw/pattern.img", filepath.Join(dir, "esx.vmdk"))
	desc, err := os.ReadFile(filepath.Join(dir, "esx.vmdk"))
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Replace(strings.Replace(string(desc), "monolithicFlat", "vmfs", 1), " FLAT ", " VMFS ", 1)
	if err := os.WriteFile(filepath.Join(dir, "esx.vmdk"), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	formattest.Golden(t, filepath.Join(dir, "esx.vmdk"), "vmdk", true)
}

// qemuDelta makes in dir, with qemu-img, a 4 MiB monolithicSparse parent
// of mixed data and holes and a delta disk over it, into which qemu-io
// writes with the command write.
func qemuDelta(t *testing.T, dir, write string) (parent, child string) {
	t.Helper()
	base, _ := formattest.Base(t, dir, 4<<20)
	parent = filepath.Join(dir, "parent.vmdk")
	testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", base, parent)
	child = filepath.Join(dir, "child.vmdk")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-b", "parent.vmdk", "-F", "vmdk", child)
	testtool.Run(t, "qemu-io", "-f", "vmdk", "-c", write, child)
	return parent, child
}

// TestDelta: a delta disk (parentFileNameHint) reads its parent where it
// holds nothing, and diskserve's writes into it read back through qemu.
func TestDelta(t *testing.T) {
	_, child := qemuDelta(t, t.TempDir(), "write -P 0x31 70000 100000")
	want := testtool.QemuRaw(t, child, "-f", "vmdk")
	d, err := format.Open(child, diskserve.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if info := diskserve.Describe(d); info.BackingFile != "parent.vmdk" || info.Backing == nil {
		t.Fatalf("backing %q %v", info.BackingFile, info.Backing)
	}
	formattest.CheckContent(t, d, want)
	p := []byte(strings.Repeat("\x42", 5000))
	if _, err := d.WriteAt(p, 3<<20+100); err != nil {
		t.Fatal(err)
	}
	copy(want[3<<20+100:], p)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if got := testtool.QemuRaw(t, child, "-f", "vmdk"); string(got) != string(want) {
		t.Fatal("qemu-img reads other bytes from the delta disk than diskserve wrote")
	}
	testtool.QemuCheck(t, child)
}

// TestConfined: a descriptor naming extents outside the directory is
// refused under --confine (the Glance CVE-2024-32498 class), and opens
// without it.
func TestConfined(t *testing.T) {
	root := t.TempDir()
	inside := filepath.Join(root, "images")
	if err := os.Mkdir(inside, 0o755); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(root, "secret")
	if err := os.WriteFile(secret, []byte(strings.Repeat("s", 4096)), 0o600); err != nil {
		t.Fatal(err)
	}
	policy, err := diskserve.Confine(inside)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{secret, "../secret", "/etc/passwd"} {
		img := filepath.Join(inside, "evil.vmdk")
		desc := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"" + name + "\" 0\n"
		if err := os.WriteFile(img, []byte(desc), 0o644); err != nil {
			t.Fatal(err)
		}
		d, err := format.Open(img, diskserve.Options{ReadOnly: true, ResolvePath: policy})
		if err == nil {
			d.Close()
			t.Fatalf("extent %q opened under confinement", name)
		}
		if !errors.Is(err, diskserve.ErrOutsideConfinement) {
			t.Fatalf("extent %q: %v, want an error wrapping ErrOutsideConfinement", name, err)
		}
	}
}

func TestGolden(t *testing.T) {
	for _, img := range []string{"pattern.vmdk", "pattern-stream.vmdk"} {
		t.Run(img, func(t *testing.T) { formattest.Golden(t, "../../testdata/vmdk/"+img, "vmdk", true) })
	}
}

// TestHostile opens damaged disks: each is refused with a vmdk error
// naming what is wrong.
func TestHostile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.vmdk")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vmdk", good, "8M")
	testtool.Run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 1 0 1M", good)
	le32 := func(b []byte, off int, v uint32) {
		b[off], b[off+1], b[off+2], b[off+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	}
	le64 := func(b []byte, off int, v uint64) { le32(b, off, uint32(v)); le32(b, off+4, uint32(v>>32)) }
	formattest.RefusesDamaged(t, "vmdk", good, []formattest.Damage{
		{Name: "huge capacity", Msg: "more than diskserve", Edit: func(b []byte) []byte { le64(b, 12, 1<<50); return b }},
		{Name: "grains beyond the load limit", Msg: "more than diskserve loads", Edit: func(b []byte) []byte { le64(b, 12, 1<<39); le64(b, 20, 8); return b }},
		{Name: "grain size", Msg: "grain size", Edit: func(b []byte) []byte { le64(b, 20, 3); return b }},
		{Name: "grain table entries", Msg: "entries per grain table", Edit: func(b []byte) []byte { le32(b, 44, 100000); return b }},
		{Name: "grain table past the end", Msg: "past the end of the file", Edit: func(b []byte) []byte { le32(b, 26*512, 0x7fffffff); return b }},
		{Name: "grain past the end", Msg: "past the end of the file", Edit: func(b []byte) []byte { le32(b, 27*512, 0x7ffffff0); return b }},
		{Name: "version", Msg: "version", Edit: func(b []byte) []byte { le32(b, 4, 9); return b }},
		{Name: "descriptor", Msg: "descriptor", Edit: func(b []byte) []byte { copy(b[512:], "nonsense\n"); return b }},
	})
}

// TestSelfParent: a delta disk that names itself as its parent stops at
// the nesting limit.
func TestSelfParent(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "self.vmdk")
	desc := "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\ncreateType=\"monolithicFlat\"\nparentFileNameHint=\"self.vmdk\"\nRW 8 FLAT \"self-flat.vmdk\" 0\n"
	if err := os.WriteFile(img, []byte(desc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "self-flat.vmdk"), make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := format.Open(img, diskserve.Options{ReadOnly: true})
	if err == nil {
		d.Close()
		t.Fatal("a disk that is its own parent opened")
	}
	if !errors.Is(err, diskserve.ErrNestingDepth) {
		t.Fatalf("%v, want an error wrapping ErrNestingDepth", err)
	}
}

func FuzzOpen(f *testing.F) {
	for _, img := range []string{"pattern.vmdk", "pattern-stream.vmdk"} {
		b, err := os.ReadFile("../../testdata/vmdk/" + img)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[:min(len(b), 65536)])
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { formattest.FuzzImage(t, vmdk.Format, b) })
}

func mustOpen(t *testing.T, path, fmtName string) diskserve.DiskFile {
	t.Helper()
	d, err := format.Open(path, diskserve.Options{Format: fmtName, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// qemuCID returns the CID qemu-img info reports of the VMDK at path.
func qemuCID(t *testing.T, path string) uint32 {
	t.Helper()
	var info struct {
		Specific struct {
			Data struct {
				CID uint32 `json:"cid"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(testtool.Run(t, "qemu-img", "info", "--output=json", path), &info); err != nil {
		t.Fatal(err)
	}
	return info.Specific.Data.CID
}

// TestCID: as in qemu, a disk opened for writing takes a new CID before
// its first change (and keeps its CID when nothing changes), written into
// an embedded descriptor or a descriptor file, even one whose CID was
// shorter than eight digits; a delta disk whose parent changed since it
// was made refuses to read from the parent, as qemu does, and still reads
// its own grains.
func TestCID(t *testing.T) {
	dir := t.TempDir()
	parent, child := qemuDelta(t, dir, "write -P 0x31 0 64k")
	flatDesc := filepath.Join(dir, "flat.vmdk")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", flatDesc, "1M")
	short := filepath.Join(dir, "short.vmdk")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", short, "1M")
	text, err := os.ReadFile(short)
	if err != nil {
		t.Fatal(err)
	}
	text = regexp.MustCompile(`(?m)^CID=[0-9a-f]+$`).ReplaceAll(text, []byte("CID=1a"))
	if err := os.WriteFile(short, text, 0o644); err != nil {
		t.Fatal(err)
	}

	write := func(path string, changes bool) {
		t.Helper()
		d, err := format.Open(path, diskserve.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if changes {
			if _, err := d.WriteAt([]byte("changed"), 100000); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, path := range []string{parent, flatDesc, short} {
		before := qemuCID(t, path)
		write(path, false)
		if got := qemuCID(t, path); got != before {
			t.Fatalf("%s: an open without writes changed the CID from %08x to %08x", path, before, got)
		}
		write(path, true)
		after := qemuCID(t, path)
		if after == before {
			t.Fatalf("%s: the CID stayed %08x after a write", path, after)
		}
		if cid := diskserve.Describe(mustOpen(t, path, "vmdk")).Specific["cid"]; cid != after {
			t.Fatalf("%s: diskserve reports CID %v, qemu-img %08x", path, cid, after)
		}
		testtool.QemuCheck(t, path)
	}
	if got := testtool.QemuRaw(t, short, "-f", "vmdk"); string(got[100000:100007]) != "changed" {
		t.Fatal("qemu-img does not read the write through the rewritten descriptor")
	}

	// The parent changed under the child: qemu and diskserve refuse the
	// parent's data, and both read the child's own grains.
	if out, err := exec.Command(testtool.Need(t, "qemu-io"), "-r", "-f", "vmdk", "-c", "read 1M 4k", child).CombinedOutput(); err == nil {
		t.Fatalf("qemu-io read a changed parent's data: the test's premise is gone\n%s", out)
	}
	testtool.Run(t, "qemu-io", "-r", "-f", "vmdk", "-c", "read -P 0x31 0 64k", child)
	d := mustOpen(t, child, "vmdk")
	if _, err := d.ReadAt(make([]byte, 4096), 1<<20); err == nil || !strings.Contains(err.Error(), "has changed since") {
		t.Fatalf("a read from the changed parent: %v", err)
	}
	own := make([]byte, 64<<10)
	if _, err := d.ReadAt(own, 0); err != nil || strings.Trim(string(own), "\x31") != "" {
		t.Fatalf("the child's own grains: %v", err)
	}
}

// TestCreateDelta: create -b makes a delta disk over a VMDK as qemu-img
// does: qemu reads it as its parent (its parentCID is the parent's CID)
// and agrees on the backing file; a write through qemu-io lands in the
// delta only, both tools then read the same bytes, and qemu-img check is
// clean. Flat disks and parents of other formats are refused, as qemu
// refuses them.
func TestCreateDelta(t *testing.T) {
	dir := t.TempDir()
	base, want := formattest.Base(t, dir, 4<<20)
	parent := filepath.Join(dir, "parent.vmdk")
	testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", base, parent)
	child := filepath.Join(dir, "child.vmdk")
	formattest.CreateChild(t, child, "vmdk", "parent.vmdk")
	var info struct {
		Size     int64  `json:"virtual-size"`
		Backing  string `json:"backing-filename"`
		Specific struct {
			Data struct {
				ParentCID uint32 `json:"parent-cid"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(testtool.Run(t, "qemu-img", "info", "--output=json", child), &info); err != nil {
		t.Fatal(err)
	}
	if info.Size != 4<<20 || info.Backing != "parent.vmdk" || info.Specific.Data.ParentCID != qemuCID(t, parent) {
		t.Fatalf("qemu-img info of the delta disk: %+v, the parent's CID %08x", info, qemuCID(t, parent))
	}
	if got := testtool.QemuRaw(t, child, "-f", "vmdk"); string(got) != string(want) {
		t.Fatal("qemu-img does not read the new delta disk as its parent")
	}
	testtool.Run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 1000000 200000", child)
	copy(want[1000000:1200000], strings.Repeat("\x5a", 200000))
	formattest.CheckContent(t, mustOpen(t, child, "vmdk"), want)
	testtool.QemuCheck(t, child)
	if got := testtool.QemuRaw(t, parent, "-f", "vmdk"); string(got[1000000:1200000]) == strings.Repeat("\x5a", 200000) {
		t.Fatal("the write reached the parent")
	}

	raw := filepath.Join(dir, "plain.raw")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", raw, "4M")
	f, _ := diskserve.LookupFormat(format.All(), "vmdk")
	for _, a := range []diskserve.CreateArgs{
		{Size: 4 << 20, BackingFile: "parent.vmdk", BackingFormat: "vmdk", Options: diskserve.CreateOptions{"subformat": "monolithicFlat"}},
		{Size: 4 << 20, BackingFile: "plain.raw", BackingFormat: "raw"},
	} {
		if err := newimage.Create(filepath.Join(dir, "refused.vmdk"), f, a); err == nil {
			t.Errorf("create %+v: no error", a)
		}
	}
}

// TestMapHost: a read inside one extent maps onto that extent's file, at
// the flat extent's offset or where a sparse extent stores the grain; a
// read across extents and any write are not mapped.
func TestMapHost(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "two.vmdk")
	desc := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n" +
		"RW 16 FLAT \"a-flat.vmdk\" 0\nRW 16 FLAT \"b-flat.vmdk\" 2\n"
	if err := os.WriteFile(img, []byte(desc), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string]byte{"a-flat.vmdk": 'a', "b-flat.vmdk": 'b'} {
		content := []byte(strings.Repeat(string(b), 9216))
		for i := range content {
			content[i] += byte(i / 512 % 7)
		}
		if err := os.WriteFile(filepath.Join(dir, name), content, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sparseImg := filepath.Join(dir, "sparse.vmdk")
	testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", "../../testdata/raw/pattern.img", sparseImg)
	for _, c := range []struct {
		img    string
		off, n int64
		write  bool
		mapped bool
	}{
		{img, 100, 4000, false, true},      // inside a
		{img, 8192 + 10, 500, false, true}, // inside b, past its 2-sector offset
		{img, 8000, 400, false, false},     // across a and b
		{img, 100, 4000, true, false},      // a write
		{sparseImg, 4096, 4096, false, true},
	} {
		d, err := format.Open(c.img, diskserve.Options{Format: "vmdk"})
		if err != nil {
			t.Fatal(err)
		}
		r, ok := diskserve.MapHost(d, c.off, c.n, c.write)
		if ok != c.mapped {
			t.Errorf("%s %d+%d (write %v): mapped %v, want %v", filepath.Base(c.img), c.off, c.n, c.write, ok, c.mapped)
		}
		if ok {
			want := make([]byte, c.n)
			if _, err := d.ReadAt(want, c.off); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, c.n)
			if _, err := unix.Pread(r.FD, got, r.Off); err != nil || !bytes.Equal(got, want) {
				t.Errorf("%s %d+%d: the mapped bytes at %d differ from the disk's (%v)", filepath.Base(c.img), c.off, c.n, r.Off, err)
			}
			r.Done()
		}
		d.Close()
	}
}
