package vhdx

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/diskserve/diskserve"
)

// creator makes VHDX disks with qemu-img's options and defaults.
var creator = &diskserve.Creator{
	Options: []diskserve.CreateOption{
		{Name: "subformat", Default: "dynamic", Help: "dynamic (allocated as written) or fixed (every block in place)"},
		{Name: "block_size", Default: "0", Help: "bytes per block, a power of two from 1M to 256M; 0 chooses by size (8M up to 1G, 16M up to 100G, 32M up to 32T, else 64M)"},
		{Name: "log_size", Default: "1M", Help: "bytes of log, a whole number of MiB"},
		{Name: "block_state_zero", Default: "on", Help: "on: blocks of a new dynamic disk are marked zero rather than not present"},
	},
	Backing: true,
	New: func(out *os.File, a diskserve.CreateArgs) error {
		o, err := parseOptions(a.Options, a.Size)
		if err == nil && a.BackingFile != "" {
			err = childOptions(&o, a)
		}
		if err == nil {
			err = create(out, o)
		}
		if err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		return nil
	},
}

// newOptions are what a new disk is made with.
type newOptions struct {
	size, blockSize, logSize int64
	fixed, zeroBlocks        bool
	logical, physical        uint32 // sector sizes
	locator                  []byte // a differencing disk's parent locator
}

// parseOptions reads and checks the -o options for a disk of size bytes
// (rounded up to a sector, as qemu-img does).
func parseOptions(co diskserve.CreateOptions, size int64) (newOptions, error) {
	o := newOptions{size: (size + 511) / 512 * 512, logical: 512, physical: 512}
	var err error
	if o.blockSize, err = co.Size("block_size", 0); err != nil {
		return o, err
	}
	if o.logSize, err = co.Size("log_size", mib); err != nil {
		return o, err
	}
	if o.zeroBlocks, err = co.Bool("block_state_zero", true); err != nil {
		return o, err
	}
	switch sub := co.String("subformat", "dynamic"); sub {
	case "dynamic":
	case "fixed":
		o.fixed = true
	default:
		return o, fmt.Errorf("subformat %q is not dynamic or fixed", sub)
	}
	if o.blockSize == 0 {
		switch {
		case o.size > 32<<40:
			o.blockSize = 64 * mib
		case o.size > 100<<30:
			o.blockSize = 32 * mib
		case o.size > 1<<30:
			o.blockSize = 16 * mib
		default:
			o.blockSize = 8 * mib
		}
	}
	switch {
	case o.size > maxDiskSize:
		return o, fmt.Errorf("%d bytes is more than a vhdx disk holds (64 TiB)", size)
	case o.blockSize < minBlockSize || o.blockSize > maxBlockSize || o.blockSize&(o.blockSize-1) != 0:
		return o, fmt.Errorf("block_size %d is not a power of two from 1M to 256M", o.blockSize)
	case o.logSize < mib || o.logSize%mib != 0 || o.logSize > maxLogLength:
		return o, fmt.Errorf("log_size %d is not a whole number of MiB from 1M to 64M", o.logSize)
	}
	return o, nil
}

// childBlockSize is the default block size of a differencing disk.
const childBlockSize = 2 * mib

// childOptions makes o a differencing disk's over the VHDX a.BackingFile
// (relative to the new disk, or absolute): dynamic, its blocks not
// present, with the parent's size and sector sizes, 2 MiB blocks unless
// -o block_size says otherwise (Hyper-V's default for differencing disks:
// a first write into a block copies the rest of it from the parent), and
// a locator naming
// the parent's data write GUID and its path relative to the child.
func childOptions(o *newOptions, a diskserve.CreateArgs) error {
	if a.BackingFormat != "" && a.BackingFormat != Name {
		return fmt.Errorf("the parent of a vhdx differencing disk is a vhdx disk, not %s", a.BackingFormat)
	}
	if o.fixed {
		return fmt.Errorf("a differencing disk is dynamic, not fixed")
	}
	if zero, err := a.Options.Bool("block_state_zero", false); err != nil || zero {
		return fmt.Errorf("a differencing disk's blocks read from its parent: block_state_zero=on does not apply")
	}
	o.zeroBlocks = false
	parentPath := a.BackingFile
	if !filepath.IsAbs(parentPath) {
		parentPath = filepath.Join(filepath.Dir(a.Path), parentPath)
	}
	p, err := readParent(parentPath)
	if err != nil {
		return fmt.Errorf("parent %s: %w", a.BackingFile, err)
	}
	if a.Size != 0 && a.Size != p.size {
		return fmt.Errorf("a differencing disk has its parent's size (%d bytes), not %d", p.size, a.Size)
	}
	o.size, o.logical, o.physical = p.size, p.logical, p.physical
	if bs, _ := a.Options.Size("block_size", 0); bs == 0 {
		o.blockSize = childBlockSize
	}
	o.locator, err = childLocator(a.Path, a.BackingFile, p.hdr.DataWriteGUID)
	return err
}

// readParent reads the headers and metadata of the VHDX disk at path.
func readParent(path string) (*Disk, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	d := &Disk{path: path, overlap: -1}
	file := sizedFile{f, st.Size()}
	if err := d.readHeaders(file); err != nil {
		return nil, err
	}
	return d, d.readRegions(file)
}

// sizedFile is an open file of known size.
type sizedFile struct {
	*os.File
	size int64
}

func (f sizedFile) Size() int64 { return f.size }

// A metaValue is a metadata item of a new disk; a nil value is a new GUID.
type metaValue struct {
	g     guid
	flags uint32
	value []byte
}

// create writes an empty disk into f, laid out as qemu-img lays one out:
// the header section (file identifier, headers, region tables) in the
// first MiB, the log after it, then the BAT and the metadata, each in
// whole MiB, then the payload blocks.
func create(f *os.File, o newOptions) error {
	blocks := (o.size + o.blockSize - 1) / o.blockSize
	chunkRatio := (1 << 23) * int64(o.logical) / o.blockSize
	chunks := (blocks + chunkRatio - 1) / chunkRatio
	entries := blocks + max(0, chunks-1)
	var flags uint32
	if o.locator != nil {
		entries = chunks * (chunkRatio + 1) // every chunk's sector bitmap entry
		flags = flagHasParent
	}
	logOff := int64(mib)
	batOff := logOff + o.logSize
	batLen := max(mib, (entries*8+mib-1)/mib*mib)
	metaOff := batOff + batLen
	dataOff := metaOff + mib

	fileID := make([]byte, 64*kib)
	copy(fileID, fileIDMagic)
	copy(fileID[8:], utf16le("diskserve"))
	h := header{Seq: 1, Version: 1, LogLength: uint32(o.logSize), LogOffset: uint64(logOff)}
	newGUID(h.FileWriteGUID[:])
	newGUID(h.DataWriteGUID[:])
	regions := encodeRegions([]region{
		{GUID: regionBAT, Off: uint64(batOff), Len: uint32(batLen), Required: true},
		{GUID: regionMetadata, Off: uint64(metaOff), Len: mib, Required: true},
	})

	meta := make([]byte, mib)
	copy(meta, metaMagic)
	items := []metaValue{
		{itemFileParams, metaRequired, le.AppendUint32(le.AppendUint32(nil, uint32(o.blockSize)), flags)},
		{itemVirtualSize, metaRequired | 2, le.AppendUint64(nil, uint64(o.size))},
		{itemDiskID, metaRequired | 2, nil},
		{itemLogicalSize, metaRequired | 2, le.AppendUint32(nil, o.logical)},
		{itemPhysicalSize, metaRequired | 2, le.AppendUint32(nil, o.physical)},
	}
	if o.locator != nil {
		items = append(items, metaValue{itemParent, metaRequired, o.locator})
	}
	le.PutUint16(meta[10:], uint16(len(items)))
	at := 64 * kib
	for k, it := range items {
		if it.value == nil {
			it.value = make([]byte, 16)
			newGUID(it.value)
		}
		e := meta[32+32*k:]
		copy(e, it.g[:])
		le.PutUint32(e[16:], uint32(at))
		le.PutUint32(e[20:], uint32(len(it.value)))
		le.PutUint32(e[24:], it.flags)
		copy(meta[at:], it.value)
		at += len(it.value)
	}

	bat := make([]byte, entries*8)
	for i := range blocks {
		e := uint64(stateNotPresent)
		switch {
		case o.fixed:
			e = uint64((dataOff+i*o.blockSize)/mib)<<batOffsetShift | stateFullPresent
		case o.zeroBlocks:
			e = stateZero
		}
		le.PutUint64(bat[(i+i/chunkRatio)*8:], e)
	}

	end := dataOff
	if o.fixed {
		end += blocks * o.blockSize
	}
	if err := f.Truncate(end); err != nil {
		return err
	}
	second := h
	second.Seq = 2
	for _, w := range []struct {
		b   []byte
		off int64
	}{
		{fileID, 0}, {h.encode(), header1Off}, {second.encode(), header2Off},
		{regions, region1Off}, {regions, region2Off}, {bat, batOff}, {meta, metaOff},
	} {
		if _, err := f.WriteAt(w.b, w.off); err != nil {
			return err
		}
	}
	return f.Sync()
}
