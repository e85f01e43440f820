package main

import (
	"encoding/json"
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
backing chain, merging neighbours with the same state. The JSON output is
an array of {"start", "length", "depth", "present", "zero", "data"}
records in the shape of "qemu-img map --output=json": depth is the layer
of the chain that holds the range (0 for IMAGE, 1 for its backing file,
...; the bottom layer where none does), present says that a layer does.
qemu-img's host "offset" is left out.`,
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

// mapRecord is one record of `qemu-img map --output=json`, without the
// host offset.
type mapRecord struct {
	Start   int64 `json:"start"`
	Length  int64 `json:"length"`
	Depth   int   `json:"depth"`
	Present bool  `json:"present"`
	Zero    bool  `json:"zero"`
	Data    bool  `json:"data"`
}

// mapWindow is how much of the disk walkMap asks about at once.
const mapWindow = 1 << 30

// walkMap calls fn with d's map records in order, neighbours with the
// same state merged, until fn returns false.
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
			if p := pending; p.Length > 0 && p.Start+p.Length == r.Start && p.Depth == r.Depth && p.Present == r.Present && p.Data == r.Data && p.Zero == r.Zero {
				pending.Length += r.Length
			} else {
				if p.Length > 0 && !fn(p) {
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
// line (as qemu-img does), or a table.
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
		b, _ := json.Marshal(r) // a struct of numbers and bools always encodes
		sep := ",\n"
		if m.count == 0 {
			sep = "["
		}
		_, m.err = fmt.Fprintf(m.w, "%s%s", sep, b)
	default:
		if m.count == 0 {
			fmt.Fprintf(m.w, "%-20s%-20s%s\n", "Offset", "Length", "State")
		}
		state := "data"
		if !r.Data {
			state = "hole"
		}
		if r.Zero {
			state += ", zero"
		}
		_, m.err = fmt.Fprintf(m.w, "%-20s%-20s%s\n", fmt.Sprintf("%#x", r.Start), fmt.Sprintf("%#x", r.Length), state)
	}
	m.count++
	return m.err == nil
}

func (m *mapWriter) close() error {
	if m.err != nil || !m.json {
		return m.err
	}
	if m.count == 0 {
		_, err := fmt.Fprintln(m.w, "[]")
		return err
	}
	_, err := fmt.Fprintln(m.w, "]")
	return err
}
