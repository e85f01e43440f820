package vmdk_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/format/vmdk"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/formattest"
	"github.com/diskserve/diskserve/internal/testtool"
)

// ESX's own sparse extents cannot be made with qemu-img, which only reads
// them. The tests write them here from a model of the disk, and qemu-img
// reads them as the oracle: diskserve must read what qemu reads, and what
// the model holds.

// grainKind is what a model grain holds.
type grainKind int

const (
	grainAbsent grainKind = iota
	grainStored
	grainZeroed   // SESPARSE zero grain
	grainUnmapped // SESPARSE unmapped (discarded) grain, read as zeroes
	grainCount    = 4
)

// esxModel is a disk of grains, each absent, stored with data, or
// zeroes.
type esxModel struct {
	sectors   int64 // capacity
	grainSize int64 // bytes
	kinds     []grainKind
	data      [][]byte // of stored grains

	// firstGrain is the number of an SESPARSE extent's first grain
	// slot used: past 4096, both parts of an entry's number count.
	firstGrain int
}

func newESXModel(seed uint64, sectors, grainSize int64, zeroes bool) *esxModel {
	rnd := rand.New(rand.NewPCG(seed, seed))
	bulk := rand.NewChaCha8([32]byte{byte(seed)})
	n := (sectors*512 + grainSize - 1) / grainSize
	m := &esxModel{sectors: sectors, grainSize: grainSize, kinds: make([]grainKind, n), data: make([][]byte, n), firstGrain: 4090}
	for i := range m.kinds {
		// Every third grain table's span left alone, so that some
		// tables are absent (both kinds have 4096 entries a table).
		if (i/4096)%3 == 1 {
			continue
		}
		k := grainKind(rnd.IntN(grainCount))
		if !zeroes && k > grainStored {
			k = grainStored
		}
		m.kinds[i] = k
		if k == grainStored {
			m.data[i] = make([]byte, grainSize)
			bulk.Read(m.data[i])
		}
	}
	return m
}

// content is what the disk reads over parent (nil: zeroes).
func (m *esxModel) content(parent []byte) []byte {
	b := make([]byte, m.sectors*512)
	copy(b, parent)
	for i, k := range m.kinds {
		lo := int64(i) * m.grainSize
		hi := min(lo+m.grainSize, int64(len(b)))
		switch k {
		case grainStored:
			copy(b[lo:hi], m.data[i])
		case grainZeroed, grainUnmapped:
			clear(b[lo:hi])
		}
	}
	return b
}

// writeCOWD writes the model as an ESX sparse extent: the header, the
// grain directory (with spare entries, as ESX sizes it), the tables of
// the grains stored, then the grains in shuffled order.
func (m *esxModel) writeCOWD(t testing.TB, path string) {
	const gtes = 4096
	grainSectors := m.grainSize / 512
	tables := (int64(len(m.kinds)) + gtes - 1) / gtes
	dirEntries := tables + 5
	dirSector := int64(4)
	next := dirSector + (dirEntries*4+511)/512 // the next free sector
	gd := make([]uint32, dirEntries)
	for tb := range tables {
		for i := tb * gtes; i < min((tb+1)*gtes, int64(len(m.kinds))); i++ {
			if m.kinds[i] == grainStored {
				gd[tb] = uint32(next)
				next += gtes * 4 / 512
				break
			}
		}
	}
	f := createFile(t, path)
	defer f.Close()
	var gts [][]uint32
	for range tables {
		gts = append(gts, make([]uint32, gtes))
	}
	order := rand.New(rand.NewPCG(7, 7)).Perm(len(m.kinds))
	for _, i := range order {
		if m.kinds[i] != grainStored {
			continue
		}
		gts[i/gtes][i%gtes] = uint32(next)
		writeAt(t, f, m.data[i], next*512)
		next += grainSectors
	}
	h := make([]byte, 2048)
	copy(h, "COWD")
	for i, v := range []uint32{1, 3, uint32(m.sectors), uint32(grainSectors), uint32(dirSector), uint32(dirEntries), uint32(next)} {
		binary.LittleEndian.PutUint32(h[4+4*i:], v)
	}
	writeAt(t, f, h, 0)
	writeAt(t, f, le32s(gd), dirSector*512)
	for tb, sec := range gd[:tables] {
		if sec != 0 {
			writeAt(t, f, le32s(gts[tb]), int64(sec)*512)
		}
	}
}

// writeSESparse writes the model as an SESPARSE extent: the constant and
// volatile headers, a journal header and an empty journal, the grain
// directory, the grain tables (in shuffled slots of the tables' area) and
// the grains (in shuffled slots of the grains' area, from m.firstGrain).
func (m *esxModel) writeSESparse(t testing.TB, path string) {
	const (
		gtes      = 4096
		tableBase = 16
	)
	tables := (int64(len(m.kinds)) + gtes - 1) / gtes
	tableSlots := tables + 2
	firstGrain := m.firstGrain
	dirSectors := (tables*8+511)/512 + 1
	grainBase := int64(tableBase + tableSlots*64)
	f := createFile(t, path)
	defer f.Close()
	rnd := rand.New(rand.NewPCG(8, 8))
	slots := rnd.Perm(int(tableSlots))
	gd := make([]uint64, dirSectors*64)
	gts := make([][]uint64, tables)
	if 8+dirSectors > tableBase {
		t.Fatal("the grain directory overlaps the tables")
	}
	grainNo := rnd.Perm(len(m.kinds))
	for i, k := range m.kinds {
		tb := int64(i) / gtes
		if k == grainAbsent {
			continue
		}
		if gts[tb] == nil {
			gts[tb] = make([]uint64, gtes)
			gd[tb] = 0x1000000000000000 | uint64(slots[tb])
		}
		var e uint64
		switch k {
		case grainStored:
			g := uint64(firstGrain + grainNo[i])
			e = 0x3000000000000000 | (g&0xfff)<<48 | g>>12
			writeAt(t, f, m.data[i], (grainBase+int64(g)*8)*512)
		case grainZeroed:
			e = 0x2000000000000000
		case grainUnmapped:
			e = 0x1000000000000000
		}
		gts[tb][int64(i)%gtes] = e
	}
	for tb, gt := range gts {
		if gt != nil {
			writeAt(t, f, le64s(gt), (tableBase+int64(slots[tb])*64)*512)
		}
	}
	writeAt(t, f, le64s(gd), 8*512)
	head := []uint64{
		0xcafebabe, 0x0000000200000001, uint64(m.sectors), 8, 64, 0, 0, 0, 0, 0,
		1, 1, // volatile header
		2, 1, // journal header
		3, 5, // journal
		8, uint64(dirSectors), // grain directory
		tableBase, uint64(tableSlots) * 64, // grain tables
		0, 0, 0, 0, // free bitmap, backmap
		uint64(grainBase), uint64(len(m.kinds)+firstGrain) * 8, // grains
	}
	writeAt(t, f, padSector(le64s(head)), 0)
	writeAt(t, f, padSector(le64s([]uint64{0xcafecafe, 0, 1, 0})), 512)
}

func createFile(t testing.TB, path string) *os.File {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func writeAt(t testing.TB, f *os.File, b []byte, off int64) {
	t.Helper()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func le32s(v []uint32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], x)
	}
	return b
}

func le64s(v []uint64) []byte {
	b := make([]byte, 8*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint64(b[8*i:], x)
	}
	return b
}

func padSector(b []byte) []byte { return append(b, make([]byte, 512-len(b))...) }

// esxDescriptor writes the descriptor of a disk of one extent of type
// kind, over parent if it is not "".
func esxDescriptor(t testing.TB, path, createType, kind, extent string, sectors int64, parent string, parentCID uint32) {
	t.Helper()
	text := fmt.Sprintf("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=1a2b3c4d\nparentCID=%08x\nisNativeSnapshot=\"no\"\ncreateType=\"%s\"\n", parentCID, createType)
	if parent != "" {
		text += fmt.Sprintf("parentFileNameHint=\"%s\"\n", parent)
	}
	text += fmt.Sprintf("# Extent description\nRW %d %s \"%s\"\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"14\"\n", sectors, kind, extent)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestESXSparseExtents reads vmfsSparse (COWD) and seSparse disks, alone
// and as delta disks over a parent qemu-img made: diskserve reads what
// qemu-img reads and what the model holds, passes the conformance suite
// read-only, and refuses to open them for writing.
func TestESXSparseExtents(t *testing.T) {
	for _, tc := range []struct {
		name, createType, kind string
		grain                  int64
		zeroes                 bool
		write                  func(m *esxModel, t testing.TB, path string)
	}{
		{"vmfsSparse", "vmfsSparse", "VMFSSPARSE", 512, false, (*esxModel).writeCOWD},
		{"vmfsSparse 4K grains", "vmfsSparse", "VMFSSPARSE", 4096, false, (*esxModel).writeCOWD},
		{"seSparse", "seSparse", "SESPARSE", 4096, true, (*esxModel).writeSESparse},
	} {
		// Three grain tables' span, and part of a fourth.
		sectors := 3*4096*tc.grain/512 + 40
		for _, delta := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s delta=%v", tc.name, delta), func(t *testing.T) {
				dir := t.TempDir()
				var parentName string
				var parentCID uint32 = 0xffffffff
				var parentData []byte
				if delta {
					base, data := formattest.Base(t, dir, sectors*512)
					parentName = "base.vmdk"
					testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", base, filepath.Join(dir, parentName))
					parentCID, parentData = qemuCID(t, filepath.Join(dir, parentName)), data
				}
				m := newESXModel(uint64(tc.grain), sectors, tc.grain, tc.zeroes)
				extent := "disk-" + strings.ToLower(tc.kind) + ".vmdk"
				tc.write(m, t, filepath.Join(dir, extent))
				desc := filepath.Join(dir, "disk.vmdk")
				esxDescriptor(t, desc, tc.createType, tc.kind, extent, sectors, parentName, parentCID)

				want := m.content(parentData)
				if got := testtool.QemuRaw(t, desc, "-f", "vmdk"); !bytes.Equal(got, want) {
					t.Fatal("qemu-img reads other bytes than the model holds: the test wrote the extent wrong")
				}
				w, err := format.Open(desc, diskserve.Options{})
				if err == nil {
					w.Close()
					t.Fatal("opened for writing")
				}
				if !strings.Contains(err.Error(), "read-only") || !strings.Contains(err.Error(), extent) {
					t.Errorf("open for writing: %v, want an error naming the extent and saying it is read-only", err)
				}
				d, err := format.Open(desc, diskserve.Options{ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				if info := diskserve.Describe(d); info.Format != "vmdk" || info.Specific["create-type"] != tc.createType {
					t.Errorf("info: format %q, create type %v", info.Format, info.Specific["create-type"])
				}
				disktest.Check(t, d, want)

			})
		}
	}

	// qemu-img probes a lone COWD file as VMDK but then fails to open it
	// (it looks for a descriptor after the header); diskserve opens it as
	// the disk it describes.
	t.Run("lone COWD extent", func(t *testing.T) {
		dir := t.TempDir()
		m := newESXModel(3, 3*4096+40, 512, false)
		img := filepath.Join(dir, "redo-delta.vmdk")
		m.writeCOWD(t, img)
		want := m.content(nil)
		d, err := format.Open(img, diskserve.Options{ReadOnly: true}) // found by its magic
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		formattest.CheckContent(t, d, want)
	})
}

// TestESXSparseHostile refuses damaged COWD and SESPARSE extents, naming
// what is wrong.
func TestESXSparseHostile(t *testing.T) {
	const sectors = 4096 * 8
	dir := t.TempDir()
	m := newESXModel(5, sectors, 4096, true)
	good, err := func() ([]byte, error) {
		m.writeSESparse(t, filepath.Join(dir, "good"))
		return os.ReadFile(filepath.Join(dir, "good"))
	}()
	if err != nil {
		t.Fatal(err)
	}
	put64 := func(b []byte, off int, v uint64) []byte { binary.LittleEndian.PutUint64(b[off:], v); return b }
	for _, c := range []struct {
		name, msg string
		edit      func([]byte) []byte
	}{
		{"journal to replay", "journal must be replayed", func(b []byte) []byte { return put64(b, 512+24, 1) }},
		{"volatile magic", "volatile header", func(b []byte) []byte { return put64(b, 512, 7) }},
		{"version", "version", func(b []byte) []byte { return put64(b, 8, 3) }},
		{"grain size", "grain size", func(b []byte) []byte { return put64(b, 24, 16) }},
		{"unknown field", "diskserve does not know", func(b []byte) []byte { return put64(b, 48, 1) }},
		{"directory entry", "grain directory entry", func(b []byte) []byte { return put64(b, 8*512, 0x2000000000000001) }},
		{"short directory", "the capacity needs", func(b []byte) []byte { return put64(b, 17*8, 0) }},
		{"huge directory", "more than diskserve loads", func(b []byte) []byte { return put64(b, 17*8, 1<<40) }},
		{"table entry kind", "grain table entry", func(b []byte) []byte {
			slot := binary.LittleEndian.Uint64(b[8*512:]) & 0xffffffff
			return put64(b, int(16+slot*64)*512+8, 0x4000000000000000)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			extent := "bad-sesparse.vmdk"
			if err := os.WriteFile(filepath.Join(dir, extent), c.edit(bytes.Clone(good)), 0o644); err != nil {
				t.Fatal(err)
			}
			desc := filepath.Join(dir, "bad.vmdk")
			esxDescriptor(t, desc, "seSparse", "SESPARSE", extent, sectors, "", 0xffffffff)
			d, err := format.Open(desc, diskserve.Options{ReadOnly: true})
			if err == nil {
				d.Close()
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), c.msg) || !strings.Contains(err.Error(), extent) {
				t.Fatalf("%v, want an error naming %s and saying %q", err, extent, c.msg)
			}
		})
	}
}

// FuzzESXSparse opens fuzzed COWD and SESPARSE extents through a
// descriptor, and reads them, as formattest.FuzzImage does a one-file
// image: a bad extent is refused or fails its reads, never a panic.
func FuzzESXSparse(f *testing.F) {
	dir := f.TempDir()
	for i, write := range []func(*esxModel, testing.TB, string){(*esxModel).writeCOWD, (*esxModel).writeSESparse} {
		m := newESXModel(9, fuzzSectors, 4096, i == 1)
		m.firstGrain = 0
		for _, g := range m.data {
			clear(g) // trimmed off with the tables' zeroes: see openFuzzed
		}
		path := filepath.Join(dir, fmt.Sprint(i))
		write(m, f, path)
		b, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		b = bytes.TrimRight(b, "\x00")
		d, err := openFuzzed(i == 1, b)
		if err != nil {
			f.Fatalf("seed %d: %v", i, err)
		}
		d.Close()
		f.Add(i == 1, b)
	}
	f.Fuzz(func(t *testing.T, se bool, b []byte) {
		d, err := openFuzzed(se, b)
		if err != nil {
			return
		}
		defer d.Close()
		p := make([]byte, d.Size())
		d.ReadAt(p, 0)
	})
}

const fuzzSectors = 64

// openFuzzed opens extent as the one extent, SESPARSE if se, else
// VMFSSPARSE, of a disk of fuzzSectors. The extent reads zeroes past its
// end up to 256 KiB: grain tables are 16 or 32 KiB of mostly zeroes, and
// the fuzzer runs hundreds of times faster on seeds without them.
func openFuzzed(se bool, extent []byte) (diskserve.DiskFile, error) {
	if n := 256 << 10; len(extent) < n {
		extent = append(extent, make([]byte, n-len(extent))...)
	}
	kind := "VMFSSPARSE"
	if se {
		kind = "SESPARSE"
	}
	desc := fmt.Sprintf("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"x\"\nRW %d %s \"x-extent.vmdk\"\n", fuzzSectors, kind)
	return diskserve.Open("x.vmdk", diskserve.Options{
		Formats:  []diskserve.Format{vmdk.Format, raw.Format},
		Format:   vmdk.Name,
		ReadOnly: true,
		OpenFile: func(name string, _ bool) (diskserve.DiskFile, error) {
			switch filepath.Base(name) {
			case "x.vmdk":
				return disktest.NewMemory([]byte(desc), true), nil
			case "x-extent.vmdk":
				return disktest.NewMemory(extent, true), nil
			}
			return nil, os.ErrNotExist
		},
	})
}
