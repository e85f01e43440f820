package composite

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/diskserve/diskserve"
)

// creator makes composite disks for `diskserve create` and `convert`:
// from --partition images, a GPT disk (CreateGPT); from a size alone, a
// disk of raw component files beside the spec.
var creator = &diskserve.Creator{
	Options: []diskserve.CreateOption{
		{Name: "components", Default: "1", Help: "without --partition: how many raw files, of equal size, hold the disk"},
	},
	Components: true,
	New: func(out *os.File, a diskserve.CreateArgs) error {
		if len(a.Components) > 0 {
			if len(a.Options) > 0 {
				return fmt.Errorf("create %s: a composite built from partitions takes no options", a.Path)
			}
			return createFromPartitions(out, a)
		}
		n, err := a.Options.Int("components", 1)
		if err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		return createRaw(out, a, n)
	},
}

// createFromPartitions builds a GPT composite from --partition arguments,
// opening each image to learn its size: the spec into out, the partition
// tables beside it.
func createFromPartitions(out *os.File, a diskserve.CreateArgs) error {
	var parts []Partition
	for _, arg := range a.Components {
		p, err := ParsePartition(arg)
		if err != nil {
			return err
		}
		d, err := a.Open(p.Path)
		if err != nil {
			return fmt.Errorf("partition %q: %w", p.Label, err)
		}
		p.Size = d.Size()
		d.Close()
		parts = append(parts, p)
	}
	spec := filepath.Base(a.Path)
	err := buildGPT(a.Path, parts, func(name string, b []byte) error {
		if name == spec {
			_, err := out.Write(b)
			return err
		}
		f, err := a.Sidecar(name)
		if err != nil {
			return err
		}
		_, err = f.Write(b)
		return err
	})
	if err != nil {
		return fmt.Errorf("create %s: %w", a.Path, err)
	}
	return nil
}

// ParsePartition parses a --partition argument,
// LABEL=PATH[:rw][:type=linux|efi|GUID]. The partition's Size is left
// for the caller to fill in.
func ParsePartition(arg string) (Partition, error) {
	label, rest, ok := strings.Cut(arg, "=")
	if !ok {
		return Partition{}, fmt.Errorf("--partition %q is not LABEL=PATH[:rw][:type=T]", arg)
	}
	fields := strings.Split(rest, ":")
	p := Partition{Label: label, Path: fields[0]}
	for _, f := range fields[1:] {
		switch t, ok := strings.CutPrefix(f, "type="); {
		case f == "rw":
			p.Writable = true
		case ok && t == "linux":
			p.Type = TypeLinux
		case ok && t == "efi":
			p.Type = TypeEFI
		case ok:
			g, err := ParseGUID(t)
			if err != nil {
				return Partition{}, fmt.Errorf("--partition %q: %w", arg, err)
			}
			p.Type = g
		default:
			return Partition{}, fmt.Errorf("--partition %q: unknown option %q (rw, type=)", arg, f)
		}
	}
	return p, nil
}

// createRaw makes a writable composite of a.Size bytes held by n sparse
// raw files beside it, PATH.0 to PATH.N-1, each a multiple of 4 KiB but
// the last; the spec goes into out.
func createRaw(out *os.File, a diskserve.CreateArgs, n int) error {
	if n < 1 || n > maxComponents {
		return fmt.Errorf("create %s: components must be 1 to %d, not %d", a.Path, maxComponents, n)
	}
	size := a.Size
	if size == 0 {
		n = 0
	}
	step := max(size/int64(max(n, 1))&^(partitionAlign-1), partitionAlign)
	spec := &Spec{Version: Version, Length: size}
	for i, off := 0, int64(0); off < size; i++ {
		end := min(off+step, size)
		if i == n-1 {
			end = size
		}
		name := fmt.Sprintf("%s.%d", filepath.Base(a.Path), i)
		f, err := a.Sidecar(name)
		if err == nil {
			err = f.Truncate(end - off)
		}
		if err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		spec.Components = append(spec.Components, Component{Path: name, Offset: off, Writable: true})
		off = end
	}
	_, err := out.Write(spec.Marshal())
	return err
}
