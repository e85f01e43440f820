// Package vdi reads and writes VirtualBox disk images (VDI), version 1.1,
// as VirtualBox and qemu-img make them.
//
// # Layout
//
// A 512-byte header (a text line, the signature 0xBEDA107F, geometry,
// sizes, UUIDs), a block map of one little-endian uint32 per 1 MiB block
// of the virtual disk, then the data blocks. A map entry is the index of
// the block's place in the data area, or 0xFFFFFFFF (never written) or
// 0xFFFFFFFE (discarded): both read as zeroes. Dynamic images allocate
// blocks on first write, at the end of the data area; static images
// have every block in place from the start.
//
// # Supported
//
//   - Dynamic and static images, read and written; `create -o static=on`.
//   - Check: map entries out of range or used twice, and the header's
//     count of allocated blocks.
//
// # Not supported
//
//   - Differencing images (a parent UUID) and block sizes other than
//     1 MiB, as in qemu: refused with a message saying so.
//
// # Concurrency
//
// As [blockmap.Disk].
package vdi

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/internal/blockmap"
)

// Name is the format's name, as qemu-img calls it.
const Name = "vdi"

// Format is the VDI format for the opener. The signature comes after a
// 64-byte text line, so Magic skips it.
var Format = diskserve.Format{
	Name:   Name,
	Magic:  string(bytes.Repeat([]byte{'?'}, 64)) + "\x7f\x10\xda\xbe",
	Open:   open,
	Create: creator,
}

var le = binary.LittleEndian

const (
	headerLen   = 512
	signature   = 0xBEDA107F
	version11   = 0x00010001
	sectorSize  = 512
	blockSize   = 1 << 20
	unallocated = 0xFFFFFFFF
	discarded   = 0xFFFFFFFE

	typeDynamic = 1
	typeStatic  = 2

	// maxBlocks bounds the block map diskserve loads: 256 MiB of map for
	// a 64 TiB disk (VirtualBox's limit is lower still).
	maxBlocks = 64 << 20
)

// header is the part of the VDI header that diskserve reads and writes.
type header struct {
	Type            uint32
	OffsetBmap      uint32
	OffsetData      uint32
	DiskSize        uint64
	BlockSize       uint32
	BlockExtra      uint32
	BlocksInImage   uint32
	BlocksAllocated uint32
	UUIDLink        [16]byte
	UUIDParent      [16]byte
}

// Field offsets in the header.
const (
	offSignature   = 0x40
	offVersion     = 0x44
	offHeaderSize  = 0x48
	offType        = 0x4C
	offBmap        = 0x154
	offData        = 0x158
	offSectorSize  = 0x168
	offDiskSize    = 0x170
	offBlockSize   = 0x178
	offBlockExtra  = 0x17C
	offBlocks      = 0x180
	offAllocated   = 0x184
	offUUIDImage   = 0x188
	offUUIDLast    = 0x198
	offUUIDLink    = 0x1A8
	offUUIDParent  = 0x1B8
	headerSizeV11  = 0x180
	headerTextLine = "<<< diskserve Virtual Disk Image >>>\n"
)

func corrupt(off int64, msg string, args ...any) error {
	return diskserve.Corrupt(Name, off, msg, args...)
}

func unsupported(msg string, args ...any) error {
	return diskserve.Unsupported(Name, -1, msg, args...)
}

// parseHeader decodes and validates a header against the image file's
// size.
func parseHeader(b []byte, fileSize int64) (header, error) {
	var h header
	if len(b) < headerLen {
		return h, corrupt(0, "header cut short (%d bytes)", len(b))
	}
	if s := le.Uint32(b[offSignature:]); s != signature {
		return h, corrupt(offSignature, "bad signature %#x", s)
	}
	if v := le.Uint32(b[offVersion:]); v != version11 {
		return h, unsupported("version %d.%d is not supported (only 1.1)", v>>16, v&0xffff)
	}
	h.Type = le.Uint32(b[offType:])
	h.OffsetBmap = le.Uint32(b[offBmap:])
	h.OffsetData = le.Uint32(b[offData:])
	h.DiskSize = le.Uint64(b[offDiskSize:])
	h.BlockSize = le.Uint32(b[offBlockSize:])
	h.BlockExtra = le.Uint32(b[offBlockExtra:])
	h.BlocksInImage = le.Uint32(b[offBlocks:])
	h.BlocksAllocated = le.Uint32(b[offAllocated:])
	copy(h.UUIDLink[:], b[offUUIDLink:])
	copy(h.UUIDParent[:], b[offUUIDParent:])
	switch {
	case h.Type != typeDynamic && h.Type != typeStatic:
		return h, unsupported("image type %d is not supported (dynamic or static)", h.Type)
	case le.Uint32(b[offSectorSize:]) != sectorSize:
		return h, unsupported("sector size %d is not supported (only 512)", le.Uint32(b[offSectorSize:]))
	case h.BlockSize != blockSize:
		return h, unsupported("block size %d is not supported (only 1 MiB)", h.BlockSize)
	case h.BlockExtra != 0:
		return h, unsupported("%d extra bytes per block are not supported", h.BlockExtra)
	case h.UUIDLink != [16]byte{}:
		return h, unsupported("linked images (a link UUID) are not supported")
	case h.UUIDParent != [16]byte{}:
		return h, unsupported("differencing images (a parent UUID) are not supported")
	case h.OffsetBmap%sectorSize != 0 || h.OffsetBmap < headerLen:
		return h, corrupt(offBmap, "block map offset %d is not a sector after the header", h.OffsetBmap)
	case h.OffsetData%sectorSize != 0:
		return h, corrupt(offData, "data offset %d is not sector aligned", h.OffsetData)
	case h.BlocksInImage > maxBlocks:
		return h, unsupported("%d blocks are more than diskserve loads (%d: a %d TiB disk)", h.BlocksInImage, maxBlocks, maxBlocks>>20)
	case h.DiskSize > uint64(h.BlocksInImage)*blockSize:
		return h, corrupt(offDiskSize, "disk size %d does not fit in %d blocks", h.DiskSize, h.BlocksInImage)
	case int64(h.OffsetData) < int64(h.OffsetBmap)+int64(h.BlocksInImage)*4:
		return h, corrupt(offData, "data offset %d overlaps the block map (%d entries at %d)", h.OffsetData, h.BlocksInImage, h.OffsetBmap)
	case int64(h.OffsetData) > fileSize:
		return h, corrupt(offData, "data offset %d is past the end of the file (%d bytes)", h.OffsetData, fileSize)
	case h.BlocksAllocated > h.BlocksInImage:
		return h, corrupt(offAllocated, "%d blocks allocated of %d", h.BlocksAllocated, h.BlocksInImage)
	}
	return h, nil
}

// parseMap decodes the block map and validates its entries: each stored
// block inside the data area's capacity. dup is the first virtual block
// that shares its place with another (-1 if none), and next is one past
// the highest place used.
func parseMap(b []byte, h header) (bmap []uint32, dup int64, next uint32, err error) {
	bmap = make([]uint32, h.BlocksInImage)
	seen := make([]uint64, (int64(h.BlocksInImage)+63)/64)
	dup = -1
	for i := range bmap {
		e := le.Uint32(b[i*4:])
		bmap[i] = e
		if e >= discarded {
			continue
		}
		if e >= h.BlocksInImage {
			return nil, -1, 0, corrupt(int64(h.OffsetBmap)+int64(i)*4, "block %d is stored at place %d, past the image's %d blocks", i, e, h.BlocksInImage)
		}
		if seen[e/64]&(1<<(e%64)) != 0 && dup < 0 {
			dup = int64(i)
		}
		seen[e/64] |= 1 << (e % 64)
		next = max(next, e+1)
	}
	return bmap, dup, next, nil
}

// Disk is an open VDI image.
type Disk struct {
	*blockmap.Disk
	path string
	h    header

	bmap []uint32 // the block map; guarded by blockmap's table lock
	next uint32   // the next free place; guarded by blockmap's allocation lock
}

var (
	_ diskserve.DiskFile     = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.ZeroWriter   = (*Disk)(nil)
	_ diskserve.HolePuncher  = (*Disk)(nil)
	_ diskserve.Flusher      = (*Disk)(nil)
	_ diskserve.Describer    = (*Disk)(nil)
	_ diskserve.Checker      = (*Disk)(nil)
)

func open(c diskserve.DiskFile, oc *diskserve.OpenContext) (diskserve.DiskFile, error) {
	hb := make([]byte, headerLen)
	if err := diskserve.ReadFullAt(c, hb, 0); err != nil {
		return nil, corrupt(0, "read header: %v", err)
	}
	h, err := parseHeader(hb, c.Size())
	if err != nil {
		return nil, err
	}
	mb := make([]byte, int(h.BlocksInImage)*4)
	if err := diskserve.ReadFullAt(c, mb, int64(h.OffsetBmap)); err != nil {
		return nil, corrupt(int64(h.OffsetBmap), "read block map: %v", err)
	}
	bmap, dup, next, err := parseMap(mb, h)
	if err != nil {
		return nil, err
	}
	if dup >= 0 && !oc.ReadOnly() {
		return nil, corrupt(int64(h.OffsetBmap)+dup*4, "block %d shares its place with another block: writing would change both (open it read-only, or convert it)", dup)
	}
	d := &Disk{path: oc.Path(), h: h, bmap: bmap, next: max(next, h.BlocksAllocated)}
	d.Disk = blockmap.New(blockmap.Config{
		Format:    Name,
		Path:      oc.Path(),
		File:      c,
		Size:      int64(h.DiskSize),
		BlockSize: blockSize,
		Table:     (*table)(d),
		ReadOnly:  oc.ReadOnly(),
		OwnHoles:  true,
	})
	return d, nil
}

// table is the block map as a [blockmap.Table].
type table Disk

func (t *table) Lookup(i int64) blockmap.Block {
	e := t.bmap[i]
	if e >= discarded {
		return blockmap.Block{State: blockmap.Unallocated}
	}
	return blockmap.Block{State: blockmap.Data, Host: int64(t.h.OffsetData) + int64(e)*blockSize}
}

func (t *table) Reserve(i int64) (int64, error) {
	if t.next >= t.h.BlocksInImage {
		return 0, corrupt(offAllocated, "no place left for block %d: %d of %d places in use", i, t.next, t.h.BlocksInImage)
	}
	place := t.next
	t.next++
	t.h.BlocksAllocated = max(t.h.BlocksAllocated, t.next)
	return int64(t.h.OffsetData) + int64(place)*blockSize, nil
}

// Record writes the map entry, then the header's count. A crash between
// the two leaves the count low, which open corrects from the map.
func (t *table) Record(i int64, host int64) error {
	var b [4]byte
	le.PutUint32(b[:], uint32((host-int64(t.h.OffsetData))/blockSize))
	c := (*Disk)(t).File()
	if _, err := c.WriteAt(b[:], int64(t.h.OffsetBmap)+i*4); err != nil {
		return err
	}
	le.PutUint32(b[:], t.h.BlocksAllocated)
	_, err := c.WriteAt(b[:], offAllocated)
	return err
}

func (t *table) Set(i int64, b blockmap.Block) {
	t.bmap[i] = uint32((b.Host - int64(t.h.OffsetData)) / blockSize)
}

// Describe reports the block size, as qemu-img info's cluster_size.
func (d *Disk) Describe(info *diskserve.Info) {
	info.Format = Name
	info.Filename = d.path
	info.ClusterSize = blockSize
	kind := "dynamic"
	if d.h.Type == typeStatic {
		kind = "static"
	}
	info.Specific = map[string]any{"type": kind}
}

// Check reports map entries shared by two blocks, and a header count of
// allocated blocks below what the map uses (which a crash during an
// allocation can leave; repairing sets it).
func (d *Disk) Check(repair diskserve.Repair) (diskserve.CheckReport, error) {
	var r diskserve.CheckReport
	err := d.Exclusive(func() error {
		r = d.check(repair)
		return nil
	})
	return r, err
}

// check is Check with allocations excluded.
func (d *Disk) check(repair diskserve.Repair) (r diskserve.CheckReport) {
	owner := map[uint32]int64{}
	var used uint32
	for i := range int64(d.h.BlocksInImage) {
		b := d.Lookup(i)
		if b.State != blockmap.Data {
			continue
		}
		place := uint32((b.Host - int64(d.h.OffsetData)) / blockSize)
		used = max(used, place+1)
		if j, ok := owner[place]; ok {
			r.Corruptions++
			r.Messages = append(r.Messages, fmt.Sprintf("ERROR: block %d uses place %d, as block %d does", i, place, j))
			continue
		}
		owner[place] = i
	}
	if d.h.BlocksAllocated < used {
		r.Corruptions++
		r.Messages = append(r.Messages, fmt.Sprintf("ERROR: the header counts %d allocated blocks, the map uses %d", d.h.BlocksAllocated, used))
		if repair == diskserve.RepairAll && !d.ReadOnly() {
			var b [4]byte
			le.PutUint32(b[:], used)
			if _, err := d.File().WriteAt(b[:], offAllocated); err != nil {
				r.Messages = append(r.Messages, fmt.Sprintf("ERROR: repair failed: %v", err))
				return r
			}
			d.h.BlocksAllocated = used
			r.CorruptionsFixed++
		}
	}
	return r
}

// creator makes VDI images with qemu-img's options.
var creator = &diskserve.Creator{
	Options: []diskserve.CreateOption{
		{Name: "static", Default: "off", Help: "on: every block allocated from the start"},
	},
	New: func(out *os.File, a diskserve.CreateArgs) error {
		static, err := a.Options.Bool("static", false)
		if err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		if err := create(out, a.Size, static); err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		return nil
	},
}

// create writes an empty image of size bytes (rounded up to a sector, as
// qemu-img does) into f, laid out as qemu-img lays it out: the header, the
// block map from 512, the data from the next sector after it.
func create(f *os.File, size int64, static bool) error {
	size = (size + sectorSize - 1) / sectorSize * sectorSize
	blocks := (size + blockSize - 1) / blockSize
	if size < 0 || blocks > maxBlocks {
		return fmt.Errorf("vdi images hold at most %d TiB", maxBlocks>>20)
	}
	mapLen := (blocks*4 + sectorSize - 1) / sectorSize * sectorSize
	dataOff := headerLen + mapLen
	img := make([]byte, dataOff)
	copy(img, headerTextLine)
	le.PutUint32(img[offSignature:], signature)
	le.PutUint32(img[offVersion:], version11)
	le.PutUint32(img[offHeaderSize:], headerSizeV11)
	typ := uint32(typeDynamic)
	if static {
		typ = typeStatic
	}
	le.PutUint32(img[offType:], typ)
	le.PutUint32(img[offBmap:], headerLen)
	le.PutUint32(img[offData:], uint32(dataOff))
	le.PutUint32(img[offSectorSize:], sectorSize)
	le.PutUint64(img[offDiskSize:], uint64(size))
	le.PutUint32(img[offBlockSize:], blockSize)
	le.PutUint32(img[offBlocks:], uint32(blocks))
	if static {
		le.PutUint32(img[offAllocated:], uint32(blocks))
	}
	for _, off := range []int{offUUIDImage, offUUIDLast} {
		newUUID(img[off : off+16])
	}
	for i := range blocks {
		e := uint32(unallocated)
		if static {
			e = uint32(i)
		}
		le.PutUint32(img[headerLen+i*4:], e)
	}
	if _, err := f.WriteAt(img, 0); err != nil {
		return err
	}
	end := dataOff
	if static {
		end += blocks * blockSize
	}
	if err := f.Truncate(end); err != nil {
		return err
	}
	return f.Sync()
}

// newUUID fills b with a random (version 4) UUID.
func newUUID(b []byte) {
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
}
