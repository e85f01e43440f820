package composite

import (
	"errors"
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
	New: func(path string, a diskserve.CreateArgs) error {
		if len(a.Components) > 0 {
			if len(a.Options) > 0 {
				return fmt.Errorf("create %s: a composite built from partitions takes no options", path)
			}
			return createFromPartitions(path, a)
		}
		n, err := a.Options.Int("components", 1)
		if err != nil {
			return fmt.Errorf("create %s: %w", path, err)
		}
		return createRaw(path, a.Size, n)
	},
}

// createFromPartitions builds a GPT composite from --partition arguments,
// opening each image to learn its size.
func createFromPartitions(path string, a diskserve.CreateArgs) error {
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
	if err := CreateGPT(path, parts); err != nil {
		return fmt.Errorf("create %s: %w", path, err)
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

// createRaw makes a writable composite of size bytes held by n sparse raw
// files, path.0 to path.N-1 beside the spec, each a multiple of 4 KiB but
// the last.
func createRaw(path string, size int64, n int) error {
	if n < 1 || n > maxComponents {
		return fmt.Errorf("create %s: components must be 1 to %d, not %d", path, maxComponents, n)
	}
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
		name := fmt.Sprintf("%s.%d", filepath.Base(path), i)
		if err := truncated(filepath.Join(filepath.Dir(path), name), end-off); err != nil {
			return fmt.Errorf("create %s: %w", path, err)
		}
		spec.Components = append(spec.Components, Component{Path: name, Offset: off, Writable: true})
		off = end
	}
	return os.WriteFile(path, spec.Marshal(), 0o644)
}

// truncated makes an empty sparse file of size bytes at path.
func truncated(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	return errors.Join(f.Truncate(size), f.Close())
}
