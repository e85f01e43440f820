package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
)

func newMapCommand() *cobra.Command {
	var flags imageFlags
	cmd := &cobra.Command{
		Use:   "map [-f FORMAT] [--output=human|json] IMAGE",
		Short: "Show which ranges of an image hold data and which read as zeroes",
		Long: `map opens IMAGE read-only and lists its allocation extents over its whole
backing chain, as qemu-img map does. The JSON output is an array of
{"start", "length", "depth", "present", "zero", "data", "offset"}
records: depth is the layer of the chain that holds the range (0 for
IMAGE, 1 for its backing file, ...; the bottom layer where none does),
present says that a layer does, and offset is where the range's bytes lie
in that layer's file, for ranges stored there as they read (not
compressed clusters, nor zero clusters without space). Neighbours merge
where their state is the same and their bytes follow each other in one
file.

The human output lists the ranges that hold data, with the file and
offset that store them. Where qemu-img map stops with an error at data
that no file stores as it reads (compressed clusters, seekable zstd),
diskserve prints the range with "-" as its offset and goes on.

Two formats are mapped in more detail than qemu-img maps them. In
dynamic VHD (vpc) images, ranges of stored blocks that the image file
keeps as holes are reported as zeroes ("zero": true, with their offset);
qemu-img reports the whole block as data. VHDX images are mapped from
their block table; qemu-img reports every byte as data, without offsets.`,
		Args: oneImage,
		RunE: func(cmd *cobra.Command, args []string) error {
			return flags.withImage(args, true, func(d diskserve.DiskFile) error {
				w := newMapWriter(cmd.OutOrStdout(), flags.output == "json")
				if err := walkMap(d, w.add); err != nil {
					return fmt.Errorf("map %s: %w", args[0], err)
				}
				return w.close()
			})
		},
	}
	flags.register(cmd.Flags())
	return cmd
}

// mapRecord is one record of `qemu-img map --output=json`, and the file
// its offset is in, which only the human output shows.
type mapRecord struct {
	Start, Length       int64
	Depth               int
	Present, Zero, Data bool
	Offset              *int64 // nil where no file stores the range as it reads
	File                string
}

// joins reports whether r continues p: the same state, right after it,
// its bytes (if a file stores them) right after p's in the same file.
func (p mapRecord) joins(r mapRecord) bool {
	if p.Length == 0 || p.Start+p.Length != r.Start || p.Depth != r.Depth || p.Present != r.Present ||
		p.Data != r.Data || p.Zero != r.Zero || p.File != r.File || (p.Offset == nil) != (r.Offset == nil) {
		return false
	}
	return p.Offset == nil || *p.Offset+p.Length == *r.Offset
}

// mapWindow is how much of the disk walkMap asks about at once.
const mapWindow = 1 << 30

// walkMap calls fn with d's map records in order, neighbours merged as
// qemu-img merges them, until fn returns false.
func walkMap(d diskserve.DiskFile, fn func(mapRecord) bool) error {
	var sizes []int64 // of the layers, top first
	for i := diskserve.Describe(d); ; i = *i.Backing {
		sizes = append(sizes, i.VirtualSize)
		if i.Backing == nil {
			break
		}
	}
	// deepest returns the deepest layer that reaches off, through layers
	// that all reach it: past a shorter backing file, qemu-img map counts
	// nothing below as present.
	deepest := func(off int64) int {
		k := 0
		for k+1 < len(sizes) && off < sizes[k+1] {
			k++
		}
		return k
	}
	var ext, depths []diskserve.Extent
	var pending mapRecord
	for pos, size := int64(0), d.Size(); pos < size; pos += mapWindow {
		n := min(mapWindow, size-pos)
		var err error
		if ext, err = diskserve.Extents(d, ext[:0], pos, n); err != nil {
			return err
		}
		if depths, err = diskserve.AllocationDepths(d, depths[:0], pos, n); err != nil {
			return err
		}
		for i, j := 0, 0; i < len(ext) && j < len(depths); {
			e, dp := ext[i], depths[j]
			lo, hi := max(e.Off, dp.Off), min(e.Off+e.Len, dp.Off+dp.Len)
			r := mapRecord{Start: lo, Length: hi - lo, Depth: int(dp.Flags) - 1, Present: dp.Flags != 0,
				Data: e.Flags&diskserve.ExtentHole == 0, Zero: e.Flags&diskserve.ExtentZero != 0}
			if k := deepest(lo); !r.Present || r.Depth > k {
				r.Present, r.Depth = r.Present && r.Depth <= k, k
			}
			for pos := lo; pos < hi; pos += r.Length {
				loc, err := diskserve.LocateHost(d, pos, hi-pos)
				if err != nil {
					return err
				}
				r.Start, r.Length, r.Offset, r.File = pos, loc.Len, nil, loc.File
				if loc.File != "" {
					r.Offset = &loc.Off
				}
				if pending.joins(r) {
					pending.Length += r.Length
					continue
				}
				if pending.Length > 0 && !fn(pending) {
					return nil
				}
				pending = r
			}
			if hi == e.Off+e.Len {
				i++
			}
			if hi == dp.Off+dp.Len {
				j++
			}
		}
	}
	if pending.Length > 0 {
		fn(pending)
	}
	return nil
}

// mapWriter prints extents as they come: a JSON array with one record per
// line, or the table of the ranges holding data, each byte for byte as
// qemu-img prints it.
type mapWriter struct {
	w     io.Writer
	json  bool
	count int
	err   error
}

func newMapWriter(w io.Writer, asJSON bool) *mapWriter {
	return &mapWriter{w: w, json: asJSON}
}

// add prints e, and reports whether printing may go on.
func (m *mapWriter) add(r mapRecord) bool {
	switch {
	case m.json:
		sep := ",\n"
		if m.count == 0 {
			sep = "["
		}
		offset := ""
		if r.Offset != nil {
			offset = fmt.Sprintf(`, "offset": %d`, *r.Offset)
		}
		_, m.err = fmt.Fprintf(m.w, `%s{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t%s}`,
			sep, r.Start, r.Length, r.Depth, r.Present, r.Zero, r.Data, offset)
	default:
		if m.count == 0 {
			_, m.err = fmt.Fprintf(m.w, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
		}
		if r.Data && !r.Zero && m.err == nil {
			line := fmt.Sprintf("%-16s%-16s-", cHex(r.Start), cHex(r.Length))
			if r.Offset != nil {
				line = fmt.Sprintf("%-16s%-16s%-16s%s", cHex(r.Start), cHex(r.Length), cHex(*r.Offset), r.File)
			}
			_, m.err = fmt.Fprintln(m.w, line)
		}
	}
	m.count++
	return m.err == nil
}

// cHex prints v as C's "%#x" does: 0 without a prefix.
func cHex(v int64) string {
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}

func (m *mapWriter) close() error {
	if m.count == 0 && m.err == nil {
		// An empty disk: qemu-img prints one empty record (in the table,
		// the header alone).
		m.add(mapRecord{})
	}
	if m.err != nil || !m.json {
		return m.err
	}
	_, err := fmt.Fprintln(m.w, "]")
	return err
}
