package vhd

import (
	"fmt"
	"os"
	"path/filepath"
	"unicode/utf16"

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
	Backing: true,
	New: func(out *os.File, a diskserve.CreateArgs) error {
		if a.BackingFile != "" {
			if err := createChild(out, a); err != nil {
				return fmt.Errorf("create %s: %w", a.Path, err)
			}
			return nil
		}
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

// createChild writes a differencing disk over the VHD a.BackingFile (a
// path relative to the new disk, or absolute): a dynamic disk with the
// parent's size, geometry and creator (so that every reader sizes both
// alike), the parent's UUID and modification time, and its locators,
// placed between the dynamic header and the BAT.
func createChild(f *os.File, a diskserve.CreateArgs) error {
	if a.BackingFormat != "" && a.BackingFormat != Name {
		return fmt.Errorf("the parent of a vpc differencing disk is a vpc disk, not %s", a.BackingFormat)
	}
	if len(a.Options) > 0 {
		return fmt.Errorf("a differencing disk takes no -o options (it has its parent's size and kind)")
	}
	parentPath := a.BackingFile
	if !filepath.IsAbs(parentPath) {
		parentPath = filepath.Join(filepath.Dir(a.Path), parentPath)
	}
	pf, err := readParentFooter(parentPath)
	if err != nil {
		return fmt.Errorf("parent: %w", err)
	}
	size := pf.virtualSectors() * sectorSize
	if a.Size != 0 && a.Size != size {
		return fmt.Errorf("a differencing disk has its parent's size (%d bytes), not %d", size, a.Size)
	}
	foot := newFooter(typeDifferencing, size, pf.Cylinders, pf.Heads, pf.Sectors, false)
	foot.CreatorApp, foot.OrigSize, foot.CurrentSize = pf.CreatorApp, pf.CurrentSize, pf.CurrentSize
	foot.DataOffset = footerLen

	locs := newLocators(a.Path, a.BackingFile)
	locOff := int64(footerLen + dynHeaderLen)
	offs := make([]int64, len(locs))
	pos := locOff
	for k, l := range locs {
		offs[k] = pos
		pos += (int64(len(l.data)) + sectorSize - 1) / sectorSize * sectorSize
	}
	img, dh := newDynamic(&foot, size, pos)
	copy(dh[offParentUUID:], pf.UUID[:])
	be.PutUint32(dh[offParentTime:], pf.Timestamp)
	name := utf16.Encode([]rune(filepath.Base(a.BackingFile)))
	for i, c := range name[:min(len(name), parentNameLen/2)] {
		be.PutUint16(dh[offParentName+2*i:], c)
	}
	for k, l := range locs {
		e := dh[offLocators+k*locatorLen:]
		copy(e, l.code)
		be.PutUint32(e[4:], uint32((len(l.data)+sectorSize-1)/sectorSize)) // the data space, in sectors as the specification says
		be.PutUint32(e[8:], uint32(len(l.data)))
		be.PutUint64(e[16:], uint64(offs[k]))
		copy(img[offs[k]:], l.data)
	}
	return writeDynamic(f, img, dh)
}

// newDynamic lays out a dynamic disk of size bytes whose BAT starts at
// tableOff: the footer copy, the dynamic header (its fields but the
// checksum, for the caller to add to), a BAT of unused entries and the
// footer. It returns the image and its dynamic header.
func newDynamic(foot *footer, size, tableOff int64) (img, dh []byte) {
	entries := (size + defaultBlockSize - 1) / defaultBlockSize
	tableLen := (entries*4 + sectorSize - 1) / sectorSize * sectorSize
	img = make([]byte, tableOff+tableLen+footerLen)
	foot.encode(img[:footerLen])
	copy(img[tableOff+tableLen:], img[:footerLen])
	dh = img[footerLen : footerLen+dynHeaderLen]
	copy(dh, dynCookie)
	be.PutUint64(dh[8:], noOffset)
	be.PutUint64(dh[16:], uint64(tableOff))
	be.PutUint32(dh[24:], 0x00010000)
	be.PutUint32(dh[28:], uint32(entries))
	be.PutUint32(dh[32:], defaultBlockSize)
	for i := range entries {
		be.PutUint32(img[tableOff+i*4:], 0xFFFFFFFF)
	}
	return img, dh
}

// writeDynamic checksums the dynamic header dh of img and writes img into
// f, durably.
func writeDynamic(f *os.File, img, dh []byte) error {
	be.PutUint32(dh[36:], checksum(dh, 36))
	if _, err := f.WriteAt(img, 0); err != nil {
		return err
	}
	return f.Sync()
}

// create writes an empty disk into f as qemu-img lays it out: a fixed disk
// as the zeroes of the disk (a hole) and the footer; a dynamic disk as the
// footer copy, the dynamic header at 512, the BAT at 1536, and the footer.
func create(f *os.File, size int64, fixed, force bool) error {
	size, c, h, s, err := sizeFor(size, force)
	if err != nil {
		return err
	}
	if fixed {
		fb := make([]byte, footerLen)
		foot := newFooter(typeFixed, size, c, h, s, force)
		foot.encode(fb)
		if _, err := f.WriteAt(fb, size); err != nil {
			return err
		}
		return f.Sync()
	}
	foot := newFooter(typeDynamic, size, c, h, s, force)
	foot.DataOffset = footerLen
	img, dh := newDynamic(&foot, size, footerLen+dynHeaderLen)
	return writeDynamic(f, img, dh)
}
