// Package gpt reads and writes GUID partition tables (UEFI specification
// 2.10, section 5.3) and their protective MBR: the one place that knows
// the layout, for the composite format, which builds GPT disks, and the
// FUSE exporter, which shows the partitions of any disk. It parses bytes
// only; callers do the I/O.
package gpt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"unicode/utf16"
)

// SectorSize is the logical block size the tables are laid out in.
const SectorSize = 512

// Sizes of the structures.
const (
	HeaderSize   = 92  // bytes of a header that its CRC covers (revision 1.0)
	EntrySize    = 128 // bytes of an entry as this package writes them
	MaxNameUnits = 36  // UTF-16 code units of a partition name
)

// Limits on what a header read from a disk, which a guest controls, may
// claim.
const (
	MaxEntries      = 1024
	MaxEntrySize    = 4096
	maxHeaderLength = 512
)

var le = binary.LittleEndian

// A GUID in its on-disk (mixed-endian) form.
type GUID [16]byte

// A Header is a GPT header: the primary one at LBA 1, or its backup in the
// last sector.
type Header struct {
	Current, Backup         uint64 // LBAs of this header and its twin
	FirstUsable, LastUsable uint64 // LBAs partitions may use
	Disk                    GUID
	EntriesLBA              uint64 // where this header's entry array starts
	Entries, EntrySize      uint32 // entries in the array, bytes of each
	EntriesCRC              uint32 // CRC32 of the whole entry array
}

// Marshal writes h at the start of b (at least HeaderSize bytes), with its
// signature, revision and CRC.
func (h *Header) Marshal(b []byte) {
	clear(b[:HeaderSize])
	copy(b, "EFI PART")
	le.PutUint32(b[8:], 0x00010000) // revision 1.0
	le.PutUint32(b[12:], HeaderSize)
	le.PutUint64(b[24:], h.Current)
	le.PutUint64(b[32:], h.Backup)
	le.PutUint64(b[40:], h.FirstUsable)
	le.PutUint64(b[48:], h.LastUsable)
	copy(b[56:], h.Disk[:])
	le.PutUint64(b[72:], h.EntriesLBA)
	le.PutUint32(b[80:], h.Entries)
	le.PutUint32(b[84:], h.EntrySize)
	le.PutUint32(b[88:], h.EntriesCRC)
	le.PutUint32(b[16:], crc32.ChecksumIEEE(b[:HeaderSize]))
}

// ErrNoTable is the error of a sector that holds no GPT header.
var ErrNoTable = errors.New("no GPT header")

// ParseHeader decodes the header at the start of b, a sector: it checks
// the signature, the header's size and CRC, and the limits above.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize || string(b[:8]) != "EFI PART" {
		return Header{}, ErrNoTable
	}
	size := le.Uint32(b[12:])
	if size < HeaderSize || size > maxHeaderLength || int(size) > len(b) {
		return Header{}, fmt.Errorf("GPT header of %d bytes", size)
	}
	hdr := append([]byte(nil), b[:size]...)
	crc := le.Uint32(hdr[16:])
	le.PutUint32(hdr[16:], 0)
	if crc32.ChecksumIEEE(hdr) != crc {
		return Header{}, errors.New("GPT header CRC does not match")
	}
	h := Header{
		Current: le.Uint64(b[24:]), Backup: le.Uint64(b[32:]),
		FirstUsable: le.Uint64(b[40:]), LastUsable: le.Uint64(b[48:]),
		EntriesLBA: le.Uint64(b[72:]), Entries: le.Uint32(b[80:]), EntrySize: le.Uint32(b[84:]),
		EntriesCRC: le.Uint32(b[88:]),
	}
	copy(h.Disk[:], b[56:72])
	if h.Entries > MaxEntries || h.EntrySize < EntrySize || h.EntrySize > MaxEntrySize {
		return Header{}, fmt.Errorf("GPT header claims %d entries of %d bytes", h.Entries, h.EntrySize)
	}
	return h, nil
}

// EntriesLen is the byte length of h's entry array.
func (h *Header) EntriesLen() int64 { return int64(h.Entries) * int64(h.EntrySize) }

// A Partition is one entry of the table.
type Partition struct {
	Type, Unique GUID
	First, Last  uint64 // LBAs, inclusive
	Name         string
}

// MarshalEntry writes p as an entry at the start of b (EntrySize bytes).
// The name must have at most MaxNameUnits UTF-16 code units.
func MarshalEntry(b []byte, p Partition) {
	clear(b[:EntrySize])
	copy(b[0:], p.Type[:])
	copy(b[16:], p.Unique[:])
	le.PutUint64(b[32:], p.First)
	le.PutUint64(b[40:], p.Last)
	for k, u := range utf16.Encode([]rune(p.Name)) {
		le.PutUint16(b[56+2*k:], u)
	}
}

// ParseEntries decodes the entries of h from entries, the entry array it
// points to, after checking the array's CRC. Unused entries (of the zero
// type) are left out.
func ParseEntries(h Header, entries []byte) ([]Partition, error) {
	if int64(len(entries)) != h.EntriesLen() {
		return nil, fmt.Errorf("GPT entry array of %d bytes, want %d", len(entries), h.EntriesLen())
	}
	if crc32.ChecksumIEEE(entries) != h.EntriesCRC {
		return nil, errors.New("GPT entry array CRC does not match")
	}
	var ps []Partition
	for i := range int64(h.Entries) {
		e := entries[i*int64(h.EntrySize):]
		var p Partition
		copy(p.Type[:], e[0:16])
		if p.Type == (GUID{}) {
			continue
		}
		copy(p.Unique[:], e[16:32])
		p.First, p.Last = le.Uint64(e[32:]), le.Uint64(e[40:])
		units := make([]uint16, 0, MaxNameUnits)
		for k := 0; k < MaxNameUnits; k++ {
			u := le.Uint16(e[56+2*k:])
			if u == 0 {
				break
			}
			units = append(units, u)
		}
		p.Name = string(utf16.Decode(units))
		ps = append(ps, p)
	}
	return ps, nil
}

// ProtectiveMBR writes into b, the first sector, the MBR of a GPT disk
// whose last sector is lastLBA, as UEFI specifies it: one partition of
// type 0xEE from sector 1, its size capped at 0xFFFFFFFF sectors for disks
// of 2 TiB and more.
func ProtectiveMBR(b []byte, lastLBA int64) {
	p := b[446:]
	p[0] = 0x00                         // not bootable
	p[1], p[2], p[3] = 0x00, 0x02, 0x00 // start CHS 0/0/2: sector 1
	p[4] = MBRTypeProtective
	p[5], p[6], p[7] = 0xFF, 0xFF, 0xFF // end CHS: as far as CHS goes
	le.PutUint32(p[8:], 1)
	le.PutUint32(p[12:], uint32(min(lastLBA, 0xFFFFFFFF)))
	b[510], b[511] = 0x55, 0xAA
}

// MBRTypeProtective is the partition type of a protective MBR's entry.
const MBRTypeProtective = 0xEE
