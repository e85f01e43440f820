package vhdx

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"strings"
	"unicode/utf16"
)

var (
	le         = binary.LittleEndian
	castagnoli = crc32.MakeTable(crc32.Castagnoli)
)

const (
	kib = 1 << 10
	mib = 1 << 20

	fileIDMagic  = "vhdxfile"
	headerMagic  = "head"
	regionMagic  = "regi"
	metaMagic    = "metadata"
	header1Off   = 64 * kib
	header2Off   = 128 * kib
	region1Off   = 192 * kib
	region2Off   = 256 * kib
	headerLen    = 4 * kib
	regionLen    = 64 * kib
	maxEntries   = 2047 // region and metadata table entries, as the specification bounds them
	maxDiskSize  = 64 << 40
	minBlockSize = 1 * mib
	maxBlockSize = 256 * mib
)

// A guid is a GUID as VHDX stores it: the first three fields
// little-endian.
type guid [16]byte

// parseGUID reads "XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX" into the stored
// byte order. It is for the specification's constants.
func parseGUID(s string) guid {
	raw, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(raw) != 16 {
		panic("bad GUID constant " + s)
	}
	var g guid
	g[0], g[1], g[2], g[3] = raw[3], raw[2], raw[1], raw[0]
	g[4], g[5] = raw[5], raw[4]
	g[6], g[7] = raw[7], raw[6]
	copy(g[8:], raw[8:])
	return g
}

// Region and metadata item GUIDs of the specification.
var (
	regionBAT      = parseGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
	regionMetadata = parseGUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

	itemFileParams   = parseGUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
	itemVirtualSize  = parseGUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
	itemDiskID       = parseGUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
	itemLogicalSize  = parseGUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
	itemPhysicalSize = parseGUID("CDA348C7-445D-4471-9CC9-E9885251C556")
	itemParent       = parseGUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
)

// checksum returns the CRC-32C of b with its checksum field (4 bytes at
// off) taken as zero.
func checksum(b []byte, off int) uint32 {
	c := crc32.Update(0, castagnoli, b[:off])
	c = crc32.Update(c, castagnoli, []byte{0, 0, 0, 0})
	return crc32.Update(c, castagnoli, b[off+4:])
}

// header is one of the two VHDX headers.
type header struct {
	Seq           uint64
	FileWriteGUID guid
	DataWriteGUID guid
	LogGUID       guid
	LogVersion    uint16
	Version       uint16
	LogLength     uint32
	LogOffset     uint64
}

// parseHeader decodes a header, or fails if it is not a valid one.
func parseHeader(b []byte) (header, error) {
	var h header
	if len(b) < headerLen || string(b[:4]) != headerMagic {
		return h, fmt.Errorf("no header signature")
	}
	if checksum(b[:headerLen], 4) != le.Uint32(b[4:]) {
		return h, fmt.Errorf("header checksum mismatch")
	}
	h.Seq = le.Uint64(b[8:])
	copy(h.FileWriteGUID[:], b[16:])
	copy(h.DataWriteGUID[:], b[32:])
	copy(h.LogGUID[:], b[48:])
	h.LogVersion = le.Uint16(b[64:])
	h.Version = le.Uint16(b[66:])
	h.LogLength = le.Uint32(b[68:])
	h.LogOffset = le.Uint64(b[72:])
	return h, nil
}

// encode writes h into a 4 KiB header block with its checksum.
func (h *header) encode() []byte {
	b := make([]byte, headerLen)
	copy(b, headerMagic)
	le.PutUint64(b[8:], h.Seq)
	copy(b[16:], h.FileWriteGUID[:])
	copy(b[32:], h.DataWriteGUID[:])
	copy(b[48:], h.LogGUID[:])
	le.PutUint16(b[64:], h.LogVersion)
	le.PutUint16(b[66:], h.Version)
	le.PutUint32(b[68:], h.LogLength)
	le.PutUint64(b[72:], h.LogOffset)
	le.PutUint32(b[4:], checksum(b, 4))
	return b
}

// A region is an entry of the region table.
type region struct {
	GUID     guid
	Off      uint64
	Len      uint32
	Required bool
}

// parseRegions decodes a region table, or fails if it is not a valid one.
func parseRegions(b []byte) ([]region, error) {
	if len(b) < regionLen || string(b[:4]) != regionMagic {
		return nil, fmt.Errorf("no region table signature")
	}
	if checksum(b[:regionLen], 4) != le.Uint32(b[4:]) {
		return nil, fmt.Errorf("region table checksum mismatch")
	}
	n := le.Uint32(b[8:])
	if n > maxEntries {
		return nil, fmt.Errorf("%d region table entries (at most %d)", n, maxEntries)
	}
	rs := make([]region, n)
	for i := range rs {
		e := b[16+32*i:]
		copy(rs[i].GUID[:], e)
		rs[i].Off = le.Uint64(e[16:])
		rs[i].Len = le.Uint32(e[24:])
		rs[i].Required = le.Uint32(e[28:])&1 != 0
	}
	return rs, nil
}

// encodeRegions writes a region table with its checksum.
func encodeRegions(rs []region) []byte {
	b := make([]byte, regionLen)
	copy(b, regionMagic)
	le.PutUint32(b[8:], uint32(len(rs)))
	for i, r := range rs {
		e := b[16+32*i:]
		copy(e, r.GUID[:])
		le.PutUint64(e[16:], r.Off)
		le.PutUint32(e[24:], r.Len)
		if r.Required {
			le.PutUint32(e[28:], 1)
		}
	}
	le.PutUint32(b[4:], checksum(b, 4))
	return b
}

// A metaItem is an entry of the metadata table.
type metaItem struct {
	GUID     guid
	Off, Len uint32 // relative to the metadata region
	Flags    uint32 // bit 0 user, bit 1 virtual disk, bit 2 required
}

const metaRequired = 1 << 2

// parseMetaTable decodes the metadata table at the start of the metadata
// region.
func parseMetaTable(b []byte) ([]metaItem, error) {
	if len(b) < 32 || string(b[:8]) != metaMagic {
		return nil, fmt.Errorf("no metadata table signature")
	}
	n := int(le.Uint16(b[10:]))
	if n > maxEntries || 32+32*n > len(b) {
		return nil, fmt.Errorf("%d metadata table entries", n)
	}
	items := make([]metaItem, n)
	for i := range items {
		e := b[32+32*i:]
		copy(items[i].GUID[:], e)
		items[i].Off = le.Uint32(e[16:])
		items[i].Len = le.Uint32(e[20:])
		items[i].Flags = le.Uint32(e[24:])
	}
	return items, nil
}

// utf16le encodes s as UTF-16LE.
func utf16le(s string) []byte {
	u := utf16.Encode([]rune(s))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		le.PutUint16(b[2*i:], c)
	}
	return b
}
