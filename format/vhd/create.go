package vhd

import (
	"fmt"
	"os"

	"github.com/diskserve/diskserve"
)

// defaultBlockSize is the block size of new dynamic disks, as Virtual PC,
// Hyper-V and qemu-img make them.
const defaultBlockSize = 2 << 20

// creator makes VHD images with qemu-img's options.
var creator = &diskserve.Creator{
	Options: []diskserve.CreateOption{
		{Name: "subformat", Default: "dynamic", Help: "dynamic (allocated as written) or fixed (the raw disk and a footer)"},
		{Name: "force_size", Default: "off", Help: "on: keep the size asked for (whole sectors) instead of rounding it up to a CHS geometry; Azure wants it"},
	},
	New: func(out *os.File, a diskserve.CreateArgs) error {
		force, err := a.Options.Bool("force_size", false)
		if err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		var fixed bool
		switch sub := a.Options.String("subformat", "dynamic"); sub {
		case "dynamic":
		case "fixed":
			fixed = true
		default:
			return fmt.Errorf("create %s: subformat %q is not dynamic or fixed", a.Path, sub)
		}
		if err := create(out, a.Size, fixed, force); err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		return nil
	},
}

// create writes an empty disk into f as qemu-img lays it out: a fixed disk
// as the zeroes of the disk (a hole) and the footer; a dynamic disk as the
// footer copy, the dynamic header at 512, the BAT at 1536, and the footer.
func create(f *os.File, size int64, fixed, force bool) error {
	size, c, h, s, err := sizeFor(size, force)
	if err != nil {
		return err
	}
	fb := make([]byte, footerLen)
	if fixed {
		foot := newFooter(typeFixed, size, c, h, s, force)
		foot.encode(fb)
		if _, err := f.WriteAt(fb, size); err != nil {
			return err
		}
		return f.Sync()
	}
	foot := newFooter(typeDynamic, size, c, h, s, force)
	foot.DataOffset = footerLen
	foot.encode(fb)
	entries := (size + defaultBlockSize - 1) / defaultBlockSize
	const tableOff = footerLen + dynHeaderLen
	tableLen := (entries*4 + sectorSize - 1) / sectorSize * sectorSize
	img := make([]byte, tableOff+tableLen+footerLen)
	copy(img, fb)
	dh := img[footerLen:tableOff]
	copy(dh, dynCookie)
	be.PutUint64(dh[8:], noOffset)
	be.PutUint64(dh[16:], tableOff)
	be.PutUint32(dh[24:], 0x00010000)
	be.PutUint32(dh[28:], uint32(entries))
	be.PutUint32(dh[32:], defaultBlockSize)
	be.PutUint32(dh[36:], checksum(dh, 36))
	for i := range entries {
		be.PutUint32(img[tableOff+i*4:], 0xFFFFFFFF)
	}
	copy(img[tableOff+tableLen:], fb)
	if _, err := f.WriteAt(img, 0); err != nil {
		return err
	}
	return f.Sync()
}
