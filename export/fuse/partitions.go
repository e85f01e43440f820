package fuse

import (
	"encoding/binary"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/gpt"
)

// A partition is a byte range of the disk.
type partition struct{ off, n int64 }

// readPartitions reads the partitions of d from its GPT, or else from its
// MBR. A disk with neither, or with a table that does not check out, has
// none. Partitions that do not fit in the disk are left out.
func readPartitions(d diskserve.DiskFile) []partition {
	size := d.Size()
	head := make([]byte, 2*gpt.SectorSize)
	if size < int64(len(head)) || diskserve.ReadFullAt(d, head, 0) != nil {
		return nil
	}
	if ps, ok := parseGPT(d, head[gpt.SectorSize:], size); ok {
		return ps
	}
	return parseMBR(head[:gpt.SectorSize], size)
}

// parseGPT reads the entries that the primary GPT header h points to.
func parseGPT(d diskserve.DiskFile, sector []byte, size int64) ([]partition, bool) {
	h, err := gpt.ParseHeader(sector)
	if err != nil || h.EntriesLBA > uint64(size/gpt.SectorSize) {
		return nil, false
	}
	entries := make([]byte, h.EntriesLen())
	if diskserve.ReadFullAt(d, entries, int64(h.EntriesLBA)*gpt.SectorSize) != nil {
		return nil, false
	}
	table, err := gpt.ParseEntries(h, entries)
	if err != nil {
		return nil, false
	}
	var ps []partition
	for _, e := range table {
		if p, ok := fit(e.First, e.Last, size); ok {
			ps = append(ps, p)
		}
	}
	return ps, true
}

// parseMBR reads the four primary partitions of a DOS partition table.
func parseMBR(b []byte, size int64) []partition {
	if b[510] != 0x55 || b[511] != 0xAA {
		return nil
	}
	le := binary.LittleEndian
	var ps []partition
	for i := range 4 {
		e := b[446+16*i:]
		typ, start, count := e[4], uint64(le.Uint32(e[8:])), uint64(le.Uint32(e[12:]))
		if typ == 0 || typ == gpt.MBRTypeProtective || count == 0 {
			continue // unused, or the protective entry of a GPT that did not check out
		}
		if p, ok := fit(start, start+count-1, size); ok {
			ps = append(ps, p)
		}
	}
	return ps
}

// fit returns the partition of sectors [first, last] if it lies inside a
// disk of size bytes.
func fit(first, last uint64, size int64) (partition, bool) {
	sectors := uint64(size / 512)
	if first == 0 || last < first || last >= sectors {
		return partition{}, false
	}
	return partition{off: int64(first) * gpt.SectorSize, n: int64(last-first+1) * gpt.SectorSize}, true
}
