package vhd

import (
	"encoding/binary"
	"fmt"
	"time"
)

var be = binary.BigEndian

// Disk types of the footer.
const (
	typeFixed        = 2
	typeDynamic      = 3
	typeDifferencing = 4
)

const (
	footerLen    = 512
	dynHeaderLen = 1024
	sectorSize   = 512
	cookie       = "conectix"
	dynCookie    = "cxsparse"
	noOffset     = ^uint64(0)

	// maxGeometry is the largest CHS geometry, 65535 cylinders of 16
	// heads of 255 sectors. An image with it has its size in the footer.
	maxGeometry = 65535 * 16 * 255
	// maxSectors is the largest disk qemu makes or opens: 2040 GiB.
	maxSectors = 2040 << 21

	// timeBase is the VHD epoch, 2000-01-01 00:00:00 UTC.
	timeBase = 946684800
)

// footer is the VHD footer (hard disk footer), big-endian, 512 bytes
// with the reserved tail.
type footer struct {
	Features    uint32
	Version     uint32
	DataOffset  uint64
	Timestamp   uint32
	CreatorApp  [4]byte
	CreatorVer  uint32
	CreatorOS   [4]byte
	OrigSize    uint64
	CurrentSize uint64
	Cylinders   uint16
	Heads       uint8
	Sectors     uint8
	Type        uint32
	Checksum    uint32
	UUID        [16]byte
	SavedState  uint8

	checksumOK bool // the checksum matched when parsed
}

// checksum is the one's complement of the byte sum of b with its checksum
// field (at off) taken as zero.
func checksum(b []byte, off int) uint32 {
	var sum uint32
	for i, c := range b {
		if i < off || i >= off+4 {
			sum += uint32(c)
		}
	}
	return ^sum
}

// parseFooter decodes a footer; at is where it was read, for messages.
func parseFooter(b []byte, at int64) (footer, error) {
	var f footer
	if len(b) < footerLen || string(b[:8]) != cookie {
		return f, corrupt(at, "no footer (the cookie %q is missing)", cookie)
	}
	f.Features = be.Uint32(b[8:])
	f.Version = be.Uint32(b[12:])
	f.DataOffset = be.Uint64(b[16:])
	f.Timestamp = be.Uint32(b[24:])
	copy(f.CreatorApp[:], b[28:32])
	f.CreatorVer = be.Uint32(b[32:])
	copy(f.CreatorOS[:], b[36:40])
	f.OrigSize = be.Uint64(b[40:])
	f.CurrentSize = be.Uint64(b[48:])
	f.Cylinders = be.Uint16(b[56:])
	f.Heads = b[58]
	f.Sectors = b[59]
	f.Type = be.Uint32(b[60:])
	f.Checksum = be.Uint32(b[64:])
	copy(f.UUID[:], b[68:84])
	f.SavedState = b[84]
	f.checksumOK = checksum(b[:footerLen], 64) == f.Checksum
	if f.Version>>16 != 1 {
		return f, unsupported("version %d.%d is not supported (only 1.x)", f.Version>>16, f.Version&0xffff)
	}
	return f, nil
}

// encode writes f into b (512 bytes) with its checksum.
func (f *footer) encode(b []byte) {
	clear(b[:footerLen])
	copy(b, cookie)
	be.PutUint32(b[8:], f.Features)
	be.PutUint32(b[12:], f.Version)
	be.PutUint64(b[16:], f.DataOffset)
	be.PutUint32(b[24:], f.Timestamp)
	copy(b[28:32], f.CreatorApp[:])
	be.PutUint32(b[32:], f.CreatorVer)
	copy(b[36:40], f.CreatorOS[:])
	be.PutUint64(b[40:], f.OrigSize)
	be.PutUint64(b[48:], f.CurrentSize)
	be.PutUint16(b[56:], f.Cylinders)
	b[58], b[59] = f.Heads, f.Sectors
	be.PutUint32(b[60:], f.Type)
	copy(b[68:84], f.UUID[:])
	b[84] = f.SavedState
	f.Checksum = checksum(b[:footerLen], 64)
	be.PutUint32(b[64:], f.Checksum)
}

// virtualSectors is the disk's size in sectors as qemu computes it. Virtual
// PC sizes a disk by its CHS geometry, Hyper-V and most other writers by
// the footer's current size; the creator application tells which, and a
// disk with the largest geometry is always sized by the footer.
func (f *footer) virtualSectors() int64 {
	chs := int64(f.Cylinders) * int64(f.Heads) * int64(f.Sectors)
	switch string(f.CreatorApp[:]) {
	case "win ", "qem2", "d2v ", "CTXS", "tap\x00":
		return int64(f.CurrentSize / sectorSize)
	}
	if chs == maxGeometry {
		return int64(f.CurrentSize / sectorSize)
	}
	return chs
}

// geometry returns the CHS geometry the VHD specification assigns to a
// disk of sectors sectors (rounded down to whole cylinders).
func geometry(sectors int64) (cyls uint16, heads, secs uint8) {
	sectors = min(sectors, maxGeometry)
	var cylTimesHeads int64
	if sectors >= 65535*16*63 {
		secs, heads = 255, 16
		cylTimesHeads = sectors / int64(secs)
	} else {
		secs = 17
		cylTimesHeads = sectors / int64(secs)
		h := max((cylTimesHeads+1023)/1024, 4)
		if cylTimesHeads >= h*1024 || h > 16 {
			secs, h = 31, 16
			cylTimesHeads = sectors / int64(secs)
		}
		if cylTimesHeads >= h*1024 {
			secs, h = 63, 16
			cylTimesHeads = sectors / int64(secs)
		}
		heads = uint8(h)
	}
	return uint16(cylTimesHeads / int64(heads)), heads, secs
}

// sizeFor returns the virtual size and geometry qemu-img gives a new disk
// asked to hold size bytes: without forceSize, the smallest geometry that
// holds it (so that Virtual PC sees the whole disk), and the size that
// geometry gives; with forceSize, the size in whole sectors and the
// largest geometry, which tells readers to take the footer's size. Sizes
// are first rounded up to whole sectors.
func sizeFor(size int64, forceSize bool) (int64, uint16, uint8, uint8, error) {
	size = (size + sectorSize - 1) / sectorSize * sectorSize // as qemu-img rounds every size
	sectors := size / sectorSize
	if forceSize {
		if sectors > maxSectors {
			return 0, 0, 0, 0, fmt.Errorf("%d bytes is more than vpc images hold (2040 GiB)", size)
		}
		return size, 65535, 16, 255, nil
	}
	var c uint16
	var h, s uint8
	sectors = min(sectors, maxGeometry)
	for i := int64(0); sectors > int64(c)*int64(h)*int64(s); i++ {
		c, h, s = geometry(sectors + i)
	}
	if int64(c)*int64(h)*int64(s) == maxGeometry {
		sectors = size / sectorSize
		if sectors > maxSectors {
			return 0, 0, 0, 0, fmt.Errorf("%d bytes is more than vpc images hold (2040 GiB)", size)
		}
		return sectors * sectorSize, c, h, s, nil
	}
	return int64(c) * int64(h) * int64(s) * sectorSize, c, h, s, nil
}

// newFooter returns the footer of a new image made by diskserve.
func newFooter(typ uint32, size int64, c uint16, h, s uint8, forceSize bool) footer {
	f := footer{
		Features:    2, // reserved, always set
		Version:     0x00010000,
		DataOffset:  noOffset,
		Timestamp:   uint32(time.Now().Unix() - timeBase),
		CreatorVer:  0x00050003,
		OrigSize:    uint64(size),
		CurrentSize: uint64(size),
		Cylinders:   c,
		Heads:       h,
		Sectors:     s,
		Type:        typ,
	}
	copy(f.CreatorOS[:], "Wi2k")
	// The creator says how readers size the disk: by geometry or by the
	// footer's size (see virtualSectors); qemu-img writes the same two.
	if forceSize {
		copy(f.CreatorApp[:], "qem2")
	} else {
		copy(f.CreatorApp[:], "qemu")
	}
	newUUID(f.UUID[:])
	return f
}
