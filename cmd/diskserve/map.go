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
		Long: `map opens IMAGE read-only and lists its allocation extents, merging
neighbours with the same state. The JSON output is an array of
{"start", "length", "data", "zero"} records in the shape of
"qemu-img map --output=json".`,
		Args: oneImage,
		RunE: func(cmd *cobra.Command, args []string) error {
			return flags.withImage(args, true, func(d diskserve.DiskFile) error {
				w := newMapWriter(cmd.OutOrStdout(), flags.output == "json")
				if err := diskserve.WalkExtents(d, 0, d.Size(), w.add); err != nil {
					return fmt.Errorf("map %s: %w", args[0], err)
				}
				return w.close()
			})
		},
	}
	flags.register(cmd.Flags())
	return cmd
}

// mapRecord is one record of `qemu-img map --output=json`, reduced to the
// fields every format can fill in truthfully.
type mapRecord struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Data   bool  `json:"data"`
	Zero   bool  `json:"zero"`
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
func (m *mapWriter) add(e diskserve.Extent) bool {
	r := mapRecord{Start: e.Off, Length: e.Len, Data: e.Flags&diskserve.ExtentHole == 0, Zero: e.Flags&diskserve.ExtentZero != 0}
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
