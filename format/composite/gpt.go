package composite

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf16"

	"github.com/diskserve/diskserve/internal/gpt"
)

// GPT layout of a composite disk built by CreateGPT, as crosvm lays it out:
// a header component (protective MBR, GPT header, 128 entries, padding to
// 40 sectors), the partitions at 4 KiB boundaries, and a footer component
// (padding, the backup entries, the backup header in the last sector).
const (
	sectorSize     = gpt.SectorSize
	gptEntries     = 128
	headerLen      = 40 * sectorSize // the header component
	entriesLen     = gptEntries * gpt.EntrySize
	partitionAlign = 4096
	footerPadding  = 0xE00 // rounds the 33-sector footer up to 4 KiB
	footerLen      = footerPadding + entriesLen + sectorSize
	firstUsableLBA = headerLen / sectorSize
)

// Partition type GUIDs.
var (
	TypeLinux = mustGUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
	TypeEFI   = mustGUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
)

// A GUID in its on-disk (mixed-endian) form.
type GUID = gpt.GUID

// ParseGUID parses the text form of a GUID.
func ParseGUID(s string) (GUID, error) {
	var g GUID
	b, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(b) != 16 || len(s) != 36 {
		return g, fmt.Errorf("%q is not a GUID", s)
	}
	// The first three fields are little-endian on disk.
	g[0], g[1], g[2], g[3] = b[3], b[2], b[1], b[0]
	g[4], g[5] = b[5], b[4]
	g[6], g[7] = b[7], b[6]
	copy(g[8:], b[8:])
	return g, nil
}

func mustGUID(s string) GUID {
	g, err := ParseGUID(s)
	if err != nil {
		panic(err)
	}
	return g
}

func randomGUID() GUID {
	var g GUID
	rand.Read(g[:])
	g[7] = g[7]&0x0f | 0x40 // version 4, in the little-endian third field
	g[8] = g[8]&0x3f | 0x80 // RFC 4122 variant
	return g
}

// A Partition is one partition of a GPT composite disk.
type Partition struct {
	Label    string // the GPT name, at most 36 UTF-16 code units
	Path     string // the image that holds it, of any format
	Size     int64  // the image's virtual size
	Writable bool
	Type     GUID // TypeLinux if zero
}

// CreateGPT makes a GPT-partitioned composite disk at path: it writes
// path+".header", path+".footer", path+".filler" (when a read-only
// partition's size is not a multiple of 4 KiB) and the composite spec
// itself, whose component paths are relative to path's directory.
func CreateGPT(path string, parts []Partition) error {
	return buildGPT(path, parts, func(name string, b []byte) error {
		return os.WriteFile(filepath.Join(filepath.Dir(path), name), b, 0o644)
	})
}

// buildGPT lays out the GPT composite that will be at path and gives each
// of its files to write, by name in path's directory.
func buildGPT(path string, parts []Partition, write func(name string, b []byte) error) error {
	labels := map[string]bool{}
	for _, p := range parts {
		switch {
		case p.Label == "" || len(utf16.Encode([]rune(p.Label))) > gpt.MaxNameUnits:
			return fmt.Errorf("partition label %q must have 1 to %d UTF-16 code units", p.Label, gpt.MaxNameUnits)
		case labels[p.Label]:
			return fmt.Errorf("two partitions are labelled %q", p.Label)
		case p.Writable && p.Size%partitionAlign != 0:
			return fmt.Errorf("partition %q: a writable partition must be a multiple of %d bytes, not %d", p.Label, partitionAlign, p.Size)
		case p.Size <= 0:
			return fmt.Errorf("partition %q is empty", p.Label)
		}
		labels[p.Label] = true
	}
	if len(parts) > gptEntries {
		return fmt.Errorf("%d partitions, more than %d", len(parts), gptEntries)
	}
	dir := filepath.Dir(path)
	rel := func(p string) string {
		abs, err := filepath.Abs(p)
		if err != nil {
			return p
		}
		absDir, _ := filepath.Abs(dir)
		if r, err := filepath.Rel(absDir, abs); err == nil {
			return r
		}
		return abs
	}
	base := filepath.Base(path)
	spec := &Spec{Version: Version, Components: []Component{{Path: base + ".header"}}}
	entries := make([]byte, entriesLen)
	off := int64(headerLen)
	needFiller := false
	for i, p := range parts {
		aligned := (p.Size + partitionAlign - 1) / partitionAlign * partitionAlign
		spec.Components = append(spec.Components, Component{Path: rel(p.Path), Offset: off, Writable: p.Writable})
		if aligned != p.Size {
			spec.Components = append(spec.Components, Component{Path: base + ".filler", Offset: off + p.Size})
			needFiller = true
		}
		typ := p.Type
		if typ == (GUID{}) {
			typ = TypeLinux
		}
		gpt.MarshalEntry(entries[i*gpt.EntrySize:], gpt.Partition{
			Type: typ, Unique: randomGUID(), Name: p.Label,
			First: uint64(off / sectorSize), Last: uint64((off+aligned)/sectorSize - 1),
		})
		off += aligned
	}
	backupEntries := off + footerPadding
	size := off + footerLen
	lastLBA := size/sectorSize - 1
	spec.Components = append(spec.Components, Component{Path: base + ".footer", Offset: off})
	spec.Length = size

	disk := randomGUID()
	entriesCRC := crc32.ChecksumIEEE(entries)
	header := make([]byte, headerLen)
	primary := gpt.Header{
		Current: 1, Backup: uint64(lastLBA),
		FirstUsable: firstUsableLBA, LastUsable: uint64(backupEntries/sectorSize - 1),
		Disk: disk, EntriesLBA: 2, Entries: gptEntries, EntrySize: gpt.EntrySize, EntriesCRC: entriesCRC,
	}
	backup := primary
	backup.Current, backup.Backup, backup.EntriesLBA = uint64(lastLBA), 1, uint64(backupEntries/sectorSize)
	gpt.ProtectiveMBR(header[:sectorSize], lastLBA)
	primary.Marshal(header[sectorSize:])
	copy(header[2*sectorSize:], entries)
	footer := make([]byte, footerLen)
	copy(footer[footerPadding:], entries)
	backup.Marshal(footer[footerPadding+entriesLen:])

	files := map[string][]byte{base + ".header": header, base + ".footer": footer, base: spec.Marshal()}
	if needFiller {
		files[base+".filler"] = make([]byte, partitionAlign)
	}
	for name, b := range files {
		if err := write(name, b); err != nil {
			return err
		}
	}
	return nil
}
