package vmdk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/internal/blockmap"
	"github.com/klauspost/compress/zlib"
)

var le = binary.LittleEndian

// Sparse extent header flags.
const (
	flagNewlineTest = 1 << 0
	flagRGD         = 1 << 1 // redundant grain directory and tables
	flagZeroGrain   = 1 << 2 // a grain table entry of 1 is a grain of zeroes
	flagCompressed  = 1 << 16
	flagMarkers     = 1 << 17
)

const (
	sparseMagic   = "KDMV"
	cowdMagic     = "COWD" // an ESX sparse extent (vmfsSparse), VMware's version 3
	sectorSize    = 512
	headerLen     = 512
	gdAtEnd       = ^uint64(0) // stream-optimised: the grain directory is in the footer
	compressZlib  = 1
	markerFooter  = 3
	grainZero     = 1 // a grain table entry for a zero grain (flagZeroGrain)
	maxGrain      = 1 << 20
	maxGTEs       = 512
	fixedGTEs     = 4096    // entries per grain table of COWD and SESPARSE extents
	maxTables     = 1 << 20 // grain directory entries diskserve loads at most
	maxEntries    = 1 << 28 // grain table entries diskserve loads at most (1 GiB)
	seConstMagic  = 0xcafebabe
	seVolMagic    = 0xcafecafe
	seVersion     = 0x0000000200000001
	seGrainSize   = 8  // sectors: the only grain size of SESPARSE extents
	seTableSize   = 64 // sectors: the only grain table size of SESPARSE extents
	seTableMark   = 0x1000000000000000
	seKindMask    = 0xf000000000000000
	seUnmapped    = 0x1000000000000000 // an unmapped (discarded) grain: zeroes
	seZero        = 0x2000000000000000
	seAllocated   = 0x3000000000000000
	maxHostSector = 1<<32 - 1 // grain table entries kept in memory hold 32-bit sectors
)

// The kinds of sparse extent.
const (
	hosted   = iota // "KDMV": monolithicSparse, twoGbMaxExtentSparse, streamOptimized
	esx             // "COWD": vmfsSparse, ESX's redo logs
	seSparse        // ESXi's space-efficient sparse (SESPARSE)
)

// sparseHeader is what diskserve takes from the header of a sparse
// extent: of a hosted one (VMDK version 4 in VMware's numbering, versions
// 1 to 3 in its own field), or the fields a COWD or SESPARSE header has
// in common with it.
type sparseHeader struct {
	Kind       int
	Tables     int64  // grain directory entries
	TableBase  uint64 // SESPARSE: sector of grain table 0
	GrainBase  uint64 // SESPARSE: sector of grain 0
	Version    uint32
	Flags      uint32
	Capacity   uint64 // sectors
	GrainSize  uint64 // sectors
	DescOffset uint64 // sectors
	DescSize   uint64 // sectors
	NumGTEs    uint32 // entries per grain table
	RGDOffset  uint64 // sectors
	GDOffset   uint64 // sectors
	Overhead   uint64 // sectors
	Compress   uint16
}

// parseSparseHeader decodes and validates a sparse extent header.
func parseSparseHeader(b []byte) (sparseHeader, error) {
	var h sparseHeader
	if len(b) < headerLen || string(b[:4]) != sparseMagic {
		return h, corrupt(0, "no sparse extent header (magic %q)", sparseMagic)
	}
	h.Version = le.Uint32(b[4:])
	h.Flags = le.Uint32(b[8:])
	h.Capacity = le.Uint64(b[12:])
	h.GrainSize = le.Uint64(b[20:])
	h.DescOffset = le.Uint64(b[28:])
	h.DescSize = le.Uint64(b[36:])
	h.NumGTEs = le.Uint32(b[44:])
	h.RGDOffset = le.Uint64(b[48:])
	h.GDOffset = le.Uint64(b[56:])
	h.Overhead = le.Uint64(b[64:])
	h.Compress = le.Uint16(b[77:])
	if h.NumGTEs != 0 && h.GrainSize != 0 {
		_, h.Tables = h.grains()
	}
	return h, h.validate()
}

// validate checks the header's fields that diskserve relies on, with the
// grain directory offset as found (the footer's, for stream images).
func (h *sparseHeader) validate() error {
	switch {
	case h.Version < 1 || h.Version > 3:
		return unsupported("sparse extent version %d is not supported (1 to 3)", h.Version)
	case h.GrainSize == 0 || h.GrainSize > maxGrain/sectorSize || h.GrainSize&(h.GrainSize-1) != 0:
		return unsupported("grain size of %d sectors is not supported (a power of two up to %d)", h.GrainSize, maxGrain/sectorSize)
	case h.NumGTEs == 0 || h.NumGTEs > maxGTEs:
		return corrupt(44, "%d entries per grain table (at most %d)", h.NumGTEs, maxGTEs)
	}
	if err := h.validateSize(); err != nil {
		return err
	}
	switch {
	case h.Flags&flagCompressed != 0 && h.Compress != compressZlib:
		return unsupported("compression algorithm %d is not supported (deflate)", h.Compress)
	case h.Flags&flagCompressed != 0 && h.Flags&flagMarkers == 0:
		return unsupported("compressed grains without markers are not supported")
	}
	return nil
}

// validateSize checks the capacity and the grain directory of any kind of
// sparse extent: the directory must cover the capacity, and be small
// enough to load.
func (h *sparseHeader) validateSize() error {
	if h.Capacity > 1<<40 {
		return unsupported("a capacity of %d sectors is more than diskserve supports", h.Capacity)
	}
	_, need := h.grains()
	switch {
	case h.Tables > maxTables || need > maxTables:
		return unsupported("a grain directory of %d entries is more than diskserve loads (%d)", max(h.Tables, need), maxTables)
	case h.Tables < need:
		return corrupt(-1, "the grain directory has %d entries: the capacity needs %d", h.Tables, need)
	}
	return nil
}

// parseCOWDHeader decodes and validates the header of an ESX sparse
// extent: after the magic, its version and flags, then the capacity, the
// grain size (in sectors), the grain directory's sector and its number
// of entries, each 32 bits. Its grain tables have 4096 entries, which
// are sectors as a hosted extent's are.
func parseCOWDHeader(b []byte) (sparseHeader, error) {
	if len(b) < headerLen || string(b[:4]) != cowdMagic {
		return sparseHeader{}, corrupt(0, "no ESX sparse extent header (magic %q)", cowdMagic)
	}
	h := sparseHeader{
		Kind:      esx,
		Version:   le.Uint32(b[4:]),
		Flags:     le.Uint32(b[8:]),
		Capacity:  uint64(le.Uint32(b[12:])),
		GrainSize: uint64(le.Uint32(b[16:])),
		GDOffset:  uint64(le.Uint32(b[20:])),
		Tables:    int64(le.Uint32(b[24:])),
		NumGTEs:   fixedGTEs,
	}
	if h.GrainSize == 0 || h.GrainSize > maxGrain/sectorSize || h.GrainSize&(h.GrainSize-1) != 0 {
		return h, unsupported("grain size of %d sectors is not supported (a power of two up to %d)", h.GrainSize, maxGrain/sectorSize)
	}
	h.Flags = 0 // none of the hosted extents' flags: no zero grains, no compression
	return h, h.validateSize()
}

// parseSESparseHeader decodes and validates the constant header of an
// SESPARSE extent (its first sector) and its volatile header, vol, which
// lies where the constant header says. Every field is 64 bits. VMware
// has not published the format; the checks are as strict as qemu's, so
// that a variant diskserve has not seen is refused rather than misread.
func parseSESparseHeader(b, vol []byte) (sparseHeader, error) {
	u := func(i int) uint64 { return le.Uint64(b[i*8:]) }
	switch {
	case len(b) < headerLen || u(0) != seConstMagic:
		return sparseHeader{}, corrupt(0, "no SESPARSE header (magic %#x)", seConstMagic)
	case u(1) != seVersion:
		return sparseHeader{}, unsupported("SESPARSE version %#x is not supported (%#x)", u(1), seVersion)
	case u(3) != seGrainSize:
		return sparseHeader{}, unsupported("SESPARSE grain size of %d sectors is not supported (%d)", u(3), seGrainSize)
	case u(4) != seTableSize:
		return sparseHeader{}, unsupported("SESPARSE grain table size of %d sectors is not supported (%d)", u(4), seTableSize)
	case u(5) != 0:
		return sparseHeader{}, unsupported("SESPARSE flags %#x are not supported", u(5))
	case u(6)|u(7)|u(8)|u(9) != 0 || !diskserve.IsZero(b[26*8:headerLen]):
		return sparseHeader{}, unsupported("SESPARSE header fields diskserve does not know are set")
	}
	if len(vol) < headerLen || le.Uint64(vol) != seVolMagic {
		return sparseHeader{}, corrupt(int64(u(10))*sectorSize, "no SESPARSE volatile header (magic %#x)", seVolMagic)
	}
	if le.Uint64(vol[24:]) != 0 {
		return sparseHeader{}, unsupported("the SESPARSE extent's journal must be replayed (it was not closed cleanly), which diskserve cannot do: open it in ESXi first")
	}
	if !diskserve.IsZero(vol[32:headerLen]) {
		return sparseHeader{}, unsupported("SESPARSE volatile header fields diskserve does not know are set")
	}
	if u(16) > 1<<40 || u(17) > 1<<40 {
		return sparseHeader{}, corrupt(16*8, "grain directory of %d sectors at sector %d", u(17), u(16))
	}
	if u(18) < 2 || u(24) < 2 || u(18) > maxHostSector || u(24) > maxHostSector {
		return sparseHeader{}, corrupt(18*8, "grain tables at sector %d, grains at sector %d: inside the headers, or past what diskserve addresses", u(18), u(24))
	}
	h := sparseHeader{
		Kind:      seSparse,
		Capacity:  u(2),
		GrainSize: seGrainSize,
		NumGTEs:   fixedGTEs,
		GDOffset:  u(16),
		Tables:    int64(u(17) * sectorSize / 8),
		TableBase: u(18),
		GrainBase: u(24),
		Overhead:  u(24),
		Flags:     flagZeroGrain, // entries are kept in memory as a hosted extent's
	}
	return h, h.validateSize()
}

// grains returns the number of grains and grain tables of the extent.
func (h *sparseHeader) grains() (grains, tables int64) {
	grains = int64((h.Capacity + h.GrainSize - 1) / h.GrainSize)
	return grains, (grains + int64(h.NumGTEs) - 1) / int64(h.NumGTEs)
}

// A sparse is an open hosted sparse extent: grain directory and tables in
// memory, grains in the file, through the block-table engine.
type sparse struct {
	*blockmap.Disk
	name string
	h    sparseHeader
	gd   []uint32   // grain table sectors, 0 where a table is absent
	rgd  []uint32   // the redundant directory, or nil
	gt   [][]uint32 // each grain table's entries, nil for an absent one; guarded by blockmap's table lock
	free int64      // where the next grain goes; guarded by blockmap's allocation lock

	cache grainCache // of a stream-optimised extent
}

// openSparse opens the sparse extent in c, the file name; below reads
// the layers under the extent (its part of the parent), or is nil. The
// extent is an SESPARSE one if se (the descriptor says so: it has no
// magic of its own that qemu probes), else a hosted or COWD one by its
// magic.
func openSparse(c diskserve.DiskFile, name string, readOnly bool, below diskserve.DiskFile, se bool) (*sparse, error) {
	h, err := readSparseHeader(c, se)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	switch {
	case h.Flags&flagCompressed != 0 && !readOnly:
		return nil, diskserve.Unsupported(Name, -1, "%s: stream-optimised extents (compressed grains) cannot be written in place: open it read-only, or convert it", name)
	case h.Kind == esx && !readOnly:
		return nil, diskserve.Unsupported(Name, -1, "%s: ESX sparse (COWD) extents are read-only in diskserve (ESX keeps allocation state in them that it does not update): open it read-only, or convert it", name)
	case h.Kind == seSparse && !readOnly:
		return nil, diskserve.Unsupported(Name, -1, "%s: SESPARSE extents are read-only (as in qemu): open it read-only, or convert it", name)
	}
	s := &sparse{name: name, h: h}
	if err := s.load(c); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	s.free = (c.Size() + sectorSize - 1) / sectorSize * sectorSize
	s.free = max(s.free, int64(h.Overhead)*sectorSize)
	s.Disk = blockmap.New(blockmap.Config{
		Format:    Name,
		Path:      name,
		File:      c,
		Size:      int64(h.Capacity) * sectorSize,
		BlockSize: int64(h.GrainSize) * sectorSize,
		Table:     (*grainTable)(s),
		Backing:   below,
		ReadOnly:  readOnly,
	})
	return s, nil
}

// readSparseHeader reads and validates the header of the sparse extent in
// c: an SESPARSE one if se, else a hosted or COWD one by its magic.
func readSparseHeader(c diskserve.DiskFile, se bool) (sparseHeader, error) {
	hb := make([]byte, headerLen)
	if err := diskserve.ReadFullAt(c, hb, 0); err != nil {
		return sparseHeader{}, corrupt(0, "read header: %v", err)
	}
	switch {
	case se:
		var vol []byte
		if off := le.Uint64(hb[80:]); le.Uint64(hb) == seConstMagic && off < 1<<40 {
			vol = make([]byte, headerLen)
			if err := diskserve.ReadFullAt(c, vol, int64(off)*sectorSize); err != nil {
				return sparseHeader{}, corrupt(int64(off)*sectorSize, "read the SESPARSE volatile header: %v", err)
			}
		}
		return parseSESparseHeader(hb, vol)
	case string(hb[:4]) == cowdMagic:
		return parseCOWDHeader(hb)
	}
	h, err := parseSparseHeader(hb)
	if err == nil && h.GDOffset == gdAtEnd {
		h, err = footerHeader(c)
	}
	return h, err
}

// footerHeader reads the header a stream-optimised extent keeps in its
// footer, the sector before the end-of-stream marker, after a footer
// marker.
func footerHeader(c diskserve.DiskFile) (sparseHeader, error) {
	end := c.Size()
	if end < 3*sectorSize {
		return sparseHeader{}, corrupt(0, "the grain directory is in a footer, but the file is too short to hold one")
	}
	b := make([]byte, 2*sectorSize)
	if err := diskserve.ReadFullAt(c, b, end-3*sectorSize); err != nil {
		return sparseHeader{}, corrupt(end-3*sectorSize, "read footer: %v", err)
	}
	if le.Uint32(b[12:]) != markerFooter {
		return sparseHeader{}, corrupt(end-3*sectorSize, "no footer marker before the footer")
	}
	h, err := parseSparseHeader(b[sectorSize:])
	if err != nil {
		return h, err
	}
	if h.GDOffset == gdAtEnd {
		return h, corrupt(end-2*sectorSize, "the footer does not say where the grain directory is")
	}
	return h, nil
}

// load reads the grain directory (and the redundant one) and every grain
// table, and checks each entry against the file. In memory, a directory
// entry is the sector of its grain table (0: none), a table entry the
// sector of its grain (0: none; 1: zeroes, where the extent has zero
// grains), whatever the kind of extent.
func (s *sparse) load(c diskserve.DiskFile) error {
	grains, tables := s.h.grains()
	fileSize := c.Size()
	entry := int64(4) // bytes of a directory or table entry
	if s.h.Kind == seSparse {
		entry = 8
	}
	readDir := func(off uint64) ([]uint32, error) {
		if off > 1<<40 || int64(off)*sectorSize+tables*entry > fileSize {
			return nil, corrupt(-1, "grain directory of %d entries at sector %d is past the end of the file", tables, off)
		}
		b := make([]byte, tables*entry)
		if err := diskserve.ReadFullAt(c, b, int64(off)*sectorSize); err != nil {
			return nil, corrupt(int64(off)*sectorSize, "read grain directory: %v", err)
		}
		dir := make([]uint32, tables)
		for i := range dir {
			if entry == 4 {
				dir[i] = le.Uint32(b[i*4:])
				continue
			}
			e := le.Uint64(b[i*8:])
			if e == 0 {
				continue
			}
			// An allocated table is its index among the tables, marked.
			sec := s.h.TableBase + (e&0xffffffff)*seTableSize
			if e&^0xffffffff != seTableMark || sec > maxHostSector {
				return nil, corrupt(int64(off)*sectorSize+int64(i)*8, "grain directory entry %d is %#x", i, e)
			}
			dir[i] = uint32(sec)
		}
		return dir, nil
	}
	var err error
	if s.gd, err = readDir(s.h.GDOffset); err != nil {
		return err
	}
	if s.h.Kind == hosted && s.h.Flags&flagRGD != 0 && s.h.RGDOffset != 0 && s.h.Flags&flagCompressed == 0 {
		if s.rgd, err = readDir(s.h.RGDOffset); err != nil {
			return err
		}
	}
	present := int64(0)
	for _, sec := range s.gd {
		if sec != 0 {
			present++
		}
	}
	if present*int64(s.h.NumGTEs) > maxEntries {
		return unsupported("%d grain tables of %d entries are more than diskserve loads (%d entries)", present, s.h.NumGTEs, maxEntries)
	}
	s.gt = make([][]uint32, tables)
	gtLen := int64(s.h.NumGTEs) * entry
	buf := make([]byte, gtLen)
	grainLen := int64(s.h.GrainSize) * sectorSize
	for t, sec := range s.gd {
		if sec == 0 {
			continue
		}
		if int64(sec)*sectorSize+gtLen > fileSize {
			return corrupt(int64(s.h.GDOffset)*sectorSize+int64(t)*entry, "grain table %d at sector %d is past the end of the file", t, sec)
		}
		if err := diskserve.ReadFullAt(c, buf, int64(sec)*sectorSize); err != nil {
			return corrupt(int64(sec)*sectorSize, "read grain table %d: %v", t, err)
		}
		s.gt[t] = make([]uint32, s.h.NumGTEs)
		for k := range int64(s.h.NumGTEs) {
			g := int64(t)*int64(s.h.NumGTEs) + k
			if g >= grains {
				break
			}
			at := int64(sec)*sectorSize + k*entry
			var e uint32
			if entry == 4 {
				e = le.Uint32(buf[k*4:])
			} else if e, err = seEntry(le.Uint64(buf[k*8:]), s.h.GrainBase, at); err != nil {
				return err
			}
			end := int64(e)*sectorSize + grainLen
			if s.h.Flags&flagCompressed != 0 {
				end = int64(e)*sectorSize + 12
			}
			if e > grainZero && end > fileSize {
				return corrupt(at, "grain %d at sector %d is past the end of the file (%d bytes)", g, e, fileSize)
			}
			s.gt[t][k] = e
		}
	}
	return nil
}

// seEntry decodes an SESPARSE grain table entry, at file offset at, into
// the form load keeps: the kind in the top four bits; for an allocated
// grain, its index among the grains at base in the rest, in two parts.
func seEntry(e, base uint64, at int64) (uint32, error) {
	switch e & seKindMask {
	case 0:
		if e != 0 {
			break
		}
		return 0, nil
	case seUnmapped, seZero:
		return grainZero, nil
	case seAllocated:
		i := (e&0x0fff000000000000)>>48 | (e&0x0000ffffffffffff)<<12
		if i > (maxHostSector-base)/seGrainSize {
			return 0, unsupported("grain table entry %#x at %d: a grain past %d sectors into the file", e, at, uint64(maxHostSector))
		}
		return uint32(base + i*seGrainSize), nil
	}
	return 0, corrupt(at, "grain table entry %#x", e)
}

// grainTable is the grain tables as a [blockmap.Table].
type grainTable sparse

func (t *grainTable) Lookup(i int64) blockmap.Block {
	n := int64(t.h.NumGTEs)
	gt := t.gt[i/n]
	if gt == nil {
		return blockmap.Block{State: blockmap.Unallocated}
	}
	switch e := gt[i%n]; {
	case e == 0:
		return blockmap.Block{State: blockmap.Unallocated}
	case e == grainZero && t.h.Flags&flagZeroGrain != 0:
		return blockmap.Block{State: blockmap.Zero}
	case t.h.Flags&flagCompressed != 0:
		return blockmap.Block{State: blockmap.Special, Host: int64(e) * sectorSize}
	default:
		return blockmap.Block{State: blockmap.Data, Host: int64(e) * sectorSize}
	}
}

// Reserve puts a grain at the end of the file. Its grain table must
// exist: qemu-img and VMware allocate every table when they create a
// sparse extent.
func (t *grainTable) Reserve(i int64) (int64, error) {
	if t.gd[i/int64(t.h.NumGTEs)] == 0 {
		return 0, diskserve.Unsupported(Name, -1, "writing grain %d needs a grain table the extent does not have", i)
	}
	if t.free/sectorSize >= 1<<32-1 {
		return 0, fmt.Errorf("the extent has grown past what a grain table entry can address")
	}
	host := t.free
	t.free += int64(t.h.GrainSize) * sectorSize
	return host, nil
}

// Record writes the grain's entry into its grain table and the redundant
// one.
func (t *grainTable) Record(i int64, host int64) error {
	return t.writeEntry(i, uint32(host/sectorSize))
}

// writeEntry writes entry e of grain i into both grain tables.
func (t *grainTable) writeEntry(i int64, e uint32) error {
	var b [4]byte
	le.PutUint32(b[:], e)
	n := int64(t.h.NumGTEs)
	c := (*sparse)(t).File()
	for _, dir := range [][]uint32{t.gd, t.rgd} {
		if dir == nil || dir[i/n] == 0 {
			continue
		}
		if _, err := c.WriteAt(b[:], int64(dir[i/n])*sectorSize+i%n*4); err != nil {
			return err
		}
	}
	return nil
}

// RecordZero marks a grain as zeroes, where the extent has zero grains.
func (t *grainTable) RecordZero(i int64) error {
	if t.h.Flags&flagZeroGrain == 0 || t.gd[i/int64(t.h.NumGTEs)] == 0 {
		return errors.ErrUnsupported
	}
	return t.writeEntry(i, grainZero)
}

// Unallocated returns how many grains from i on lie in an absent grain
// table, so that walks skip a whole table at a time.
func (t *grainTable) Unallocated(i int64) int64 {
	n := int64(t.h.NumGTEs)
	if t.gt[i/n] != nil {
		return 0
	}
	return (i/n+1)*n - i
}

// Set records b in memory; the grain's table exists (Reserve and
// RecordZero refuse grains without one).
func (t *grainTable) Set(i int64, b blockmap.Block) {
	n := int64(t.h.NumGTEs)
	switch b.State {
	case blockmap.Zero:
		t.gt[i/n][i%n] = grainZero
	default:
		t.gt[i/n][i%n] = uint32(b.Host / sectorSize)
	}
}

// inflaters keeps zlib readers for reuse across grains.
var inflaters sync.Pool

// grainCacheLen is how many decompressed grains an extent keeps, so
// that small reads in a row inflate each grain once.
const grainCacheLen = 4

// A grainCache holds the grains an extent decompressed last.
type grainCache struct {
	mu     sync.Mutex
	grains [grainCacheLen]struct {
		i    int64
		data []byte
	}
	next int
}

// get copies from grain i at off into p, if it is held.
func (gc *grainCache) get(i int64, p []byte, off int64) bool {
	gc.mu.Lock()
	defer gc.mu.Unlock()
	for _, g := range gc.grains {
		if g.data != nil && g.i == i {
			copy(p, g.data[off:])
			return true
		}
	}
	return false
}

// put keeps grain i, in place of the oldest.
func (gc *grainCache) put(i int64, data []byte) {
	gc.mu.Lock()
	defer gc.mu.Unlock()
	gc.grains[gc.next].i, gc.grains[gc.next].data = i, data
	gc.next = (gc.next + 1) % grainCacheLen
}

// ReadSpecial reads a compressed grain: a marker (the grain's sector
// number and the compressed length), then the zlib stream.
func (t *grainTable) ReadSpecial(i int64, b blockmap.Block, p []byte, off int64, _ io.ReaderAt) error {
	if t.cache.get(i, p, off) {
		return nil
	}
	c := (*sparse)(t).File()
	grainLen := int64(t.h.GrainSize) * sectorSize
	var m [12]byte
	if err := diskserve.ReadFullAt(c, m[:], b.Host); err != nil {
		return corrupt(b.Host, "%s: read grain %d marker: %v", t.name, i, err)
	}
	n := int64(le.Uint32(m[8:]))
	if n == 0 || n > 2*grainLen+4096 {
		return corrupt(b.Host, "%s: grain %d claims %d compressed bytes", t.name, i, n)
	}
	zp := compressedBufs.Get().(*[]byte)
	defer compressedBufs.Put(zp)
	if int64(cap(*zp)) < n {
		*zp = make([]byte, n)
	}
	z := (*zp)[:n]
	if err := diskserve.ReadFullAt(c, z, b.Host+12); err != nil {
		return corrupt(b.Host, "%s: read grain %d: %v", t.name, i, err)
	}
	// A read of the whole grain inflates it in place, and leaves the
	// cache to the reads of parts of grains.
	whole := off == 0 && int64(len(p)) == grainLen
	grain := p
	if !whole {
		grain = make([]byte, grainLen)
	}
	var zr io.ReadCloser
	var err error
	if r, ok := inflaters.Get().(zlib.Resetter); ok {
		err = r.Reset(bytes.NewReader(z), nil)
		zr = r.(io.ReadCloser)
	} else {
		zr, err = zlib.NewReader(bytes.NewReader(z))
	}
	if err == nil {
		var k int
		k, err = io.ReadFull(zr, grain)
		if err == io.ErrUnexpectedEOF {
			clear(grain[k:]) // the last grain of an extent may be short
			err = nil
		}
		inflaters.Put(zr)
	}
	if err != nil {
		return corrupt(b.Host, "%s: inflate grain %d: %v", t.name, i, err)
	}
	if !whole {
		copy(p, grain[off:])
		t.cache.put(i, grain)
	}
	return nil
}

// compressedBufs keeps buffers for compressed grains across reads.
var compressedBufs = sync.Pool{New: func() any { return new([]byte) }}

// check reports grain table entries that point into the extent's
// metadata or share a grain with another, and directories that differ
// from their redundant copies.
func (s *sparse) check(r *diskserve.CheckReport) {
	problem := func(format string, args ...any) {
		r.Corruptions++
		r.Messages = append(r.Messages, fmt.Sprintf("ERROR: %s: ", s.name)+fmt.Sprintf(format, args...))
	}
	for t := range s.rgd {
		if (s.rgd[t] == 0) != (s.gd[t] == 0) {
			problem("grain directory entry %d is %d, its redundant copy %d", t, s.gd[t], s.rgd[t])
		}
	}
	owner := map[uint32]int64{}
	grains, _ := s.h.grains()
	n := int64(s.h.NumGTEs)
	for g := int64(0); g < grains; g++ {
		if s.gt[g/n] == nil {
			g = (g/n+1)*n - 1
			continue
		}
		b := s.Lookup(g)
		if b.State != blockmap.Data && b.State != blockmap.Special {
			continue
		}
		e := uint32(b.Host / sectorSize)
		if b.State == blockmap.Data && uint64(e) < s.h.Overhead {
			problem("grain %d at sector %d lies in the metadata (the first %d sectors)", g, e, s.h.Overhead)
		}
		if j, ok := owner[e]; ok {
			problem("grain %d shares sector %d with grain %d", g, e, j)
		}
		owner[e] = g
	}
}
