package vmdk

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"

	"github.com/diskserve/diskserve"
	"github.com/klauspost/compress/zlib"
	"golang.org/x/sync/errgroup"
)

// The create types diskserve makes, as -o subformat names them.
const (
	monolithicSparse = "monolithicSparse"
	monolithicFlat   = "monolithicFlat"
	twoGbSparse      = "twoGbMaxExtentSparse"
	twoGbFlat        = "twoGbMaxExtentFlat"
	streamOptimized  = "streamOptimized"
)

const (
	grainSectors  = 128          // 64 KiB grains, as qemu-img and VMware make them
	descSectors   = 20           // room for the embedded descriptor
	twoGbSectors  = 4 << 20      // 2 GiB: the largest extent of a twoGbMaxExtent disk
	toolsDefault  = "2147483647" // the tools version qemu-img records when none is given
	maxNewSectors = int64(1) << 32 * grainSectors
)

// creator makes VMDK disks with qemu-img's options.
var creator = &diskserve.Creator{
	Options: []diskserve.CreateOption{
		{Name: "subformat", Default: monolithicSparse, Help: "monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat or streamOptimized (convert only)"},
		{Name: "adapter_type", Default: "ide", Help: "ide, lsilogic, buslogic or legacyESX"},
		{Name: "hwversion", Default: "4", Help: "the virtual hardware version recorded"},
		{Name: "compat6", Default: "off", Help: "on: hardware version 6"},
		{Name: "toolsversion", Default: toolsDefault, Help: "the VMware tools version recorded"},
		{Name: "zeroed_grain", Default: "off", Help: "on: zero writes mark grains as zeroes instead of storing them"},
	},
	Backing: true,
	New: func(out *os.File, a diskserve.CreateArgs) error {
		o, err := parseOptions(a.Options)
		if err == nil && a.BackingFile != "" {
			err = o.delta(&a)
		}
		if err == nil {
			err = o.create(out, a)
		}
		if err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		return nil
	},
	Write: writeStream,
	Whole: func(o diskserve.CreateOptions) bool {
		return o.String("subformat", monolithicSparse) == streamOptimized
	},
}

// options are the -o options of a new disk, and the parent of a delta
// disk.
type options struct {
	subformat, adapter, hwversion, tools string
	zeroedGrain                          bool
	parentHint                           string // the backing file as given, or ""
	parentCID                            uint32
}

// parseOptions reads and checks the -o options.
func parseOptions(co diskserve.CreateOptions) (options, error) {
	o := options{
		subformat: co.String("subformat", monolithicSparse),
		adapter:   co.String("adapter_type", "ide"),
		tools:     co.String("toolsversion", toolsDefault),
	}
	if !slices.Contains([]string{monolithicSparse, monolithicFlat, twoGbSparse, twoGbFlat, streamOptimized}, o.subformat) {
		return o, fmt.Errorf("subformat %q is not one of monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized", o.subformat)
	}
	if !slices.Contains([]string{"ide", "lsilogic", "buslogic", "legacyESX"}, o.adapter) {
		return o, fmt.Errorf("adapter_type %q is not ide, lsilogic, buslogic or legacyESX", o.adapter)
	}
	compat6, err := co.Bool("compat6", false)
	if err != nil {
		return o, err
	}
	if o.zeroedGrain, err = co.Bool("zeroed_grain", false); err != nil {
		return o, err
	}
	hw, given := co["hwversion"]
	switch {
	case compat6 && given && hw != "6":
		return o, fmt.Errorf("compat6 and hwversion=%s disagree", hw)
	case compat6:
		o.hwversion = "6"
	case given:
		o.hwversion = hw
	default:
		o.hwversion = "4"
	}
	return o, nil
}

// descriptor returns the descriptor of a new disk of sectors sectors
// with the given extents.
func (o *options) descriptor(sectors int64, extents []extentLine) *descriptor {
	var cid [4]byte
	rand.Read(cid[:])
	parentCID := uint32(0xffffffff)
	if o.parentHint != "" {
		parentCID = o.parentCID
	}
	heads := int64(16)
	if o.adapter != "ide" {
		heads = 255
	}
	return &descriptor{
		Version:    1,
		CID:        binary.LittleEndian.Uint32(cid[:]),
		ParentCID:  parentCID,
		ParentHint: o.parentHint,
		CreateType: o.subformat,
		Extents:    extents,
		DDB: map[string]string{
			"virtualHWVersion":   o.hwversion,
			"geometry.cylinders": fmt.Sprint(sectors / (heads * 63)),
			"geometry.heads":     fmt.Sprint(heads),
			"geometry.sectors":   "63",
			"adapterType":        o.adapter,
			"toolsVersion":       o.tools,
		},
	}
}

// delta makes o a delta disk's over the VMDK a.BackingFile (relative to
// the new disk, or absolute), as qemu-img does: the parent's CID becomes
// the disk's parentCID and the name as given its parentFileNameHint, and
// a size of 0 the parent's. A flat disk has no grains to leave to a
// parent, and a parent of another format has no CID, so qemu refuses
// both, and so does diskserve.
func (o *options) delta(a *diskserve.CreateArgs) error {
	if a.BackingFormat != "" && a.BackingFormat != Name {
		return fmt.Errorf("the parent of a vmdk delta disk is a vmdk disk, not %s", a.BackingFormat)
	}
	if o.subformat != monolithicSparse && o.subformat != twoGbSparse {
		return fmt.Errorf("a %s disk cannot have a parent: only sparse ones can", o.subformat)
	}
	path, err := diskserve.ResolveRelative(a.Path, a.BackingFile)
	if err != nil {
		return err
	}
	desc, err := readDescriptor(path)
	if err != nil {
		return fmt.Errorf("parent %s: %w", a.BackingFile, err)
	}
	o.parentCID, o.parentHint = desc.CID, a.BackingFile
	if a.Size == 0 {
		for _, e := range desc.Extents {
			a.Size += e.Sectors * sectorSize
		}
	}
	return nil
}

// readDescriptor reads the descriptor of the VMDK at path: embedded in a
// sparse file, or a descriptor file.
func readDescriptor(path string) (*descriptor, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	head := make([]byte, headerLen)
	n, err := io.ReadFull(f, head)
	if err != nil && err != io.ErrUnexpectedEOF {
		return nil, err
	}
	head = head[:n]
	var text []byte
	switch {
	case n >= 4 && string(head[:4]) == sparseMagic:
		h, err := parseSparseHeader(head)
		if err != nil {
			return nil, err
		}
		if text, err = embeddedText(f, h); err != nil {
			return nil, err
		}
		if text == nil {
			return nil, fmt.Errorf("no embedded descriptor holds a CID")
		}
	case isDescriptor(head):
		if text, err = io.ReadAll(io.LimitReader(io.NewSectionReader(f, 0, maxDescriptor+1), maxDescriptor+1)); err != nil {
			return nil, err
		}
		if len(text) > maxDescriptor {
			return nil, fmt.Errorf("a descriptor file of more than %d bytes", maxDescriptor)
		}
	default:
		return nil, fmt.Errorf("not a vmdk disk")
	}
	return parseDescriptor(string(text))
}

// create makes an empty disk of a.Size bytes (rounded up to a sector) in
// out, and its extent files beside it.
func (o *options) create(out *os.File, a diskserve.CreateArgs) error {
	sectors := (a.Size + sectorSize - 1) / sectorSize
	if sectors > maxNewSectors {
		return fmt.Errorf("%d bytes is more than a vmdk disk holds", a.Size)
	}
	base := strings.TrimSuffix(filepath.Base(a.Path), ".vmdk")
	switch o.subformat {
	case monolithicSparse:
		line := extentLine{Access: "RW", Sectors: sectors, Type: "SPARSE", File: filepath.Base(a.Path)}
		return o.writeSparse(out, sectors, o.descriptor(sectors, []extentLine{line}).String(), false)
	case streamOptimized:
		return fmt.Errorf("streamOptimized disks are written whole: use convert")
	}
	var lines []extentLine
	for start, k := int64(0), 1; start < sectors || k == 1; k++ {
		n := sectors - start
		var name string
		switch o.subformat {
		case monolithicFlat:
			name = base + "-flat.vmdk"
		case twoGbFlat:
			n = min(n, twoGbSectors)
			name = fmt.Sprintf("%s-f%03d.vmdk", base, k)
		case twoGbSparse:
			n = min(n, twoGbSectors)
			name = fmt.Sprintf("%s-s%03d.vmdk", base, k)
		}
		f, err := a.Sidecar(name)
		if err != nil {
			return err
		}
		line := extentLine{Access: "RW", Sectors: n, Type: "FLAT", File: name}
		if o.subformat == twoGbSparse {
			line.Type = "SPARSE"
			err = o.writeSparse(f, n, "", false)
		} else {
			err = f.Truncate(n * sectorSize)
			if err == nil {
				err = f.Sync()
			}
		}
		if err != nil {
			return err
		}
		lines = append(lines, line)
		start += n
	}
	if _, err := out.WriteString(o.descriptor(sectors, lines).String()); err != nil {
		return err
	}
	return out.Sync()
}

// sparseLayout is where the metadata of a new sparse extent goes, in
// sectors, as qemu-img lays it out: the header, the descriptor, the
// redundant grain directory and its tables, the grain directory and its
// tables, then the grains from the next grain boundary.
type sparseLayout struct {
	tables, gdSectors, gtSectors int64
	rgd, gd, overhead            int64
}

func layout(sectors int64) sparseLayout {
	var l sparseLayout
	grains := (sectors + grainSectors - 1) / grainSectors
	l.tables = (grains + maxGTEs - 1) / maxGTEs
	l.gdSectors = (l.tables*4 + sectorSize - 1) / sectorSize
	l.gtSectors = maxGTEs * 4 / sectorSize
	l.rgd = 1 + descSectors
	l.gd = l.rgd + l.gdSectors + l.tables*l.gtSectors
	end := l.gd + l.gdSectors + l.tables*l.gtSectors
	l.overhead = (end + grainSectors - 1) / grainSectors * grainSectors
	return l
}

// header returns the extent header of a new sparse extent.
func (o *options) header(sectors int64, l sparseLayout, stream bool) []byte {
	b := make([]byte, headerLen)
	copy(b, sparseMagic)
	version, flags := uint32(1), uint32(flagNewlineTest|flagRGD)
	if o.zeroedGrain {
		version, flags = 2, flags|flagZeroGrain
	}
	if stream {
		version, flags = 3, flags|flagCompressed|flagMarkers
		le.PutUint16(b[77:], compressZlib)
	}
	le.PutUint32(b[4:], version)
	le.PutUint32(b[8:], flags)
	le.PutUint64(b[12:], uint64(sectors))
	le.PutUint64(b[20:], grainSectors)
	le.PutUint64(b[28:], 1)
	le.PutUint64(b[36:], descSectors)
	le.PutUint32(b[44:], maxGTEs)
	le.PutUint64(b[48:], uint64(l.rgd))
	le.PutUint64(b[56:], uint64(l.gd))
	le.PutUint64(b[64:], uint64(l.overhead))
	copy(b[73:77], "\n \r\n")
	return b
}

// directories returns the two grain directories of a new extent, each
// naming its tables.
func (l sparseLayout) directories() (gd, rgd []byte) {
	gd, rgd = make([]byte, l.tables*4), make([]byte, l.tables*4)
	for t := range l.tables {
		le.PutUint32(rgd[t*4:], uint32(l.rgd+l.gdSectors+t*l.gtSectors))
		le.PutUint32(gd[t*4:], uint32(l.gd+l.gdSectors+t*l.gtSectors))
	}
	return gd, rgd
}

// writeSparse writes an empty sparse extent of sectors sectors into f,
// with desc embedded (or none), its tables all empty.
func (o *options) writeSparse(f *os.File, sectors int64, desc string, stream bool) error {
	if len(desc) > descSectors*sectorSize {
		return fmt.Errorf("the descriptor takes %d bytes, more than its %d", len(desc), descSectors*sectorSize)
	}
	l := layout(sectors)
	meta := make([]byte, (1+descSectors)*sectorSize)
	copy(meta, o.header(sectors, l, stream))
	copy(meta[sectorSize:], desc)
	gd, rgd := l.directories()
	for _, w := range []struct {
		b   []byte
		off int64
	}{{meta, 0}, {rgd, l.rgd * sectorSize}, {gd, l.gd * sectorSize}} {
		if _, err := f.WriteAt(w.b, w.off); err != nil {
			return err
		}
	}
	if err := f.Truncate(l.overhead * sectorSize); err != nil {
		return err
	}
	return f.Sync()
}

// writeStream writes src as a streamOptimized disk: the metadata of an
// extent as writeSparse lays it out, each grain of src that holds data
// compressed after its marker, then the grain tables, and an end-of-stream
// marker. Grains are compressed in parallel and written in order.
func writeStream(ctx context.Context, out *os.File, path string, src diskserve.DiskFile, co diskserve.CreateOptions, progress func(int64)) error {
	o, err := parseOptions(co)
	if err != nil {
		return err
	}
	sectors := (src.Size() + sectorSize - 1) / sectorSize
	if sectors > maxNewSectors {
		return fmt.Errorf("%d bytes is more than a vmdk disk holds", src.Size())
	}
	line := extentLine{Access: "RW", Sectors: sectors, Type: "SPARSE", File: filepath.Base(path)}
	if err := o.writeSparse(out, sectors, o.descriptor(sectors, []extentLine{line}).String(), true); err != nil {
		return err
	}
	l := layout(sectors)
	grains := (sectors + grainSectors - 1) / grainSectors
	gte := make([]uint32, l.tables*maxGTEs)
	pos := l.overhead * sectorSize
	const grainLen = grainSectors * sectorSize
	batch := 64 // grains compressed before they are written in order
	slots := make([]grainSlot, batch)
	for first := int64(0); first < grains; first += int64(batch) {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(int64(batch), grains-first)
		var g errgroup.Group
		g.SetLimit(runtime.GOMAXPROCS(0))
		for k := range n {
			g.Go(func() error { return slots[k].compress(src, first+k, grainLen) })
		}
		if err := g.Wait(); err != nil {
			return err
		}
		for k := range n {
			b := slots[k].grain
			if b == nil {
				continue
			}
			if _, err := out.WriteAt(b, pos); err != nil {
				return err
			}
			gte[first+k] = uint32(pos / sectorSize)
			pos += int64(len(b))
		}
		if progress != nil {
			progress(min((first+n)*grainLen, src.Size()) - min(first*grainLen, src.Size()))
		}
	}
	tables := make([]byte, len(gte)*4)
	for i, e := range gte {
		le.PutUint32(tables[i*4:], e)
	}
	for _, at := range []int64{l.rgd, l.gd} {
		if _, err := out.WriteAt(tables, (at+l.gdSectors)*sectorSize); err != nil {
			return err
		}
	}
	if _, err := out.WriteAt(make([]byte, sectorSize), pos); err != nil { // end of stream
		return err
	}
	return out.Sync()
}

// A grainSlot compresses one grain at a time, keeping its buffers from
// one grain to the next.
type grainSlot struct {
	in    []byte
	out   bytes.Buffer
	grain []byte // the last grain compressed: marker, zlib data, padding to a sector; nil if it read as zeroes
}

// deflaters keeps zlib writers for reuse across grains: each holds
// hundreds of KiB of state that a new one allocates and clears.
var deflaters sync.Pool

// compress makes grain g of src a stream grain in s.grain.
func (s *grainSlot) compress(src diskserve.DiskFile, g, grainLen int64) error {
	off := g * grainLen
	if s.in == nil {
		s.in = make([]byte, grainLen)
	}
	p := s.in[:min(grainLen, src.Size()-off)]
	s.grain = nil
	if err := diskserve.ReadFullAt(src, p, off); err != nil && err != io.EOF {
		return err
	}
	if diskserve.IsZero(p) {
		return nil
	}
	s.out.Reset()
	s.out.Write(make([]byte, 12))
	zw, ok := deflaters.Get().(*zlib.Writer)
	if ok {
		zw.Reset(&s.out)
	} else {
		zw = zlib.NewWriter(&s.out)
	}
	_, err := zw.Write(p)
	if err == nil {
		err = zw.Close()
	}
	deflaters.Put(zw)
	if err != nil {
		return err
	}
	b := s.out.Bytes()
	le.PutUint64(b, uint64(off/sectorSize))
	le.PutUint32(b[8:], uint32(len(b)-12))
	pad := (sectorSize - len(b)%sectorSize) % sectorSize
	s.grain = append(b, make([]byte, pad)...)
	return nil
}
