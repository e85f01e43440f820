package qcow2

import (
	"errors"
	"fmt"
	"math/bits"
	"os"

	"github.com/diskserve/diskserve"
)

// CreateOptions describe a new image. The zero value of each field means
// qemu-img's default.
type CreateOptions struct {
	Size          int64  // virtual size in bytes
	ClusterSize   int64  // 0: 64 KiB
	Compat        string // "1.1" (version 3, the default) or "0.10" (version 2)
	RefcountBits  int    // 0: 16
	Compression   string // "zlib" (the default) or "zstd"
	LazyRefcounts bool
	ExtendedL2    bool
	BackingFile   string // recorded as given; "" for none
	BackingFormat string // required with BackingFile
}

// creator makes qcow2 images for `diskserve create` and `convert`, with
// qemu-img's option names and defaults.
var creator = &diskserve.Creator{
	Options: []diskserve.CreateOption{
		{Name: "cluster_size", Default: "64K", Help: "bytes per cluster, a power of two from 512 to 2M"},
		{Name: "compat", Default: "1.1", Help: "0.10 (version 2) or 1.1 (version 3)"},
		{Name: "refcount_bits", Default: "16", Help: "bits per refcount, a power of two up to 64"},
		{Name: "compression_type", Default: "zlib", Help: "zlib or zstd, for compressed clusters"},
		{Name: "lazy_refcounts", Default: "off", Help: "on or off"},
		{Name: "extended_l2", Default: "off", Help: "on or off: 32 subclusters per cluster"},
		{Name: "preallocation", Default: "off", Help: "off, metadata (every cluster mapped, its space a hole), falloc (allocated too) or full (zeroes written)"},
	},
	Backing:     true,
	Compressed:  true,
	Measure:     measure,
	Amend:       amend,
	Preallocate: preallocateRange,
	New: func(out *os.File, a diskserve.CreateArgs) error {
		o, err := parseOptions(a.Options)
		if err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		o.Size, o.BackingFile, o.BackingFormat = a.Size, a.BackingFile, a.BackingFormat
		prealloc := a.Options.String("preallocation", "off")
		switch prealloc {
		case "off", "metadata", "falloc", "full":
		default:
			return fmt.Errorf("create %s: preallocation must be off, metadata, falloc or full, not %q", a.Path, prealloc)
		}
		if err := write(out, o); err != nil {
			return fmt.Errorf("create %s: %w", a.Path, err)
		}
		if prealloc != "off" && a.BackingFile != "" {
			return fmt.Errorf("create %s: preallocation would hide the backing file: leave one out", a.Path)
		}
		if prealloc != "off" {
			if err := preallocate(a, prealloc); err != nil {
				return fmt.Errorf("create %s: %w", a.Path, err)
			}
		}
		return nil
	},
}

// parseOptions reads the -o options of creator.
func parseOptions(opts diskserve.CreateOptions) (CreateOptions, error) {
	var o CreateOptions
	var err error
	if o.ClusterSize, err = opts.Size("cluster_size", 0); err != nil {
		return o, err
	}
	if o.RefcountBits, err = opts.Int("refcount_bits", 0); err != nil {
		return o, err
	}
	if o.LazyRefcounts, err = opts.Bool("lazy_refcounts", false); err != nil {
		return o, err
	}
	if o.ExtendedL2, err = opts.Bool("extended_l2", false); err != nil {
		return o, err
	}
	o.Compat = opts.String("compat", "")
	o.Compression = opts.String("compression_type", "")
	return o, nil
}

// Create writes a new, empty qcow2 image at path, replacing any file there,
// laid out as qemu-img lays it out: the header cluster, the refcount table,
// the refcount blocks, then the L1 table.
func Create(path string, o CreateOptions) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := write(f, o); err != nil {
		f.Close()
		return fmt.Errorf("create %s: %w", path, err)
	}
	return f.Close()
}

// write writes a new, empty image into f, an empty file, and syncs it.
func write(f *os.File, o CreateOptions) error {
	h, err := o.header()
	if err != nil {
		return err
	}
	cs := h.clusterSize()
	l1Clusters := (int64(h.L1Size)*8 + cs - 1) / cs
	perBlock := cs * 8 / (1 << h.RefcountOrder)
	// The refcount blocks must count themselves and the table: grow both
	// until they cover every metadata cluster.
	rtClusters, rbClusters := int64(1), int64(1)
	for {
		total := 1 + rtClusters + rbClusters + l1Clusters
		rb := (total + perBlock - 1) / perBlock
		rt := max(1, (rb*8+cs-1)/cs)
		if rb == rbClusters && rt == rtClusters {
			break
		}
		rbClusters, rtClusters = rb, rt
	}
	if rtClusters*cs > maxRefTableBytes {
		return fmt.Errorf("the refcount table would exceed %d bytes", maxRefTableBytes)
	}
	rtOff := cs
	rbOff := rtOff + rtClusters*cs
	l1Off := rbOff + rbClusters*cs
	end := l1Off + l1Clusters*cs
	h.RefcountTableOffset, h.RefcountTableClusters = uint64(rtOff), uint32(rtClusters)
	h.L1TableOffset = uint64(l1Off)

	img := make([]byte, end)
	if err := h.encode(img[:cs]); err != nil {
		return err
	}
	for i := range rbClusters {
		be.PutUint64(img[rtOff+i*8:], uint64(rbOff+i*cs))
	}
	for c := range end / cs {
		putRefcount(img[rbOff:rbOff+rbClusters*cs], c, uint(1<<h.RefcountOrder), 1)
	}
	if _, err := f.WriteAt(img, 0); err != nil {
		return err
	}
	return f.Sync()
}

// header builds the header of a new image from the options.
func (o CreateOptions) header() (*header, error) {
	cs := o.ClusterSize
	if cs == 0 {
		cs = 64 << 10
	}
	if cs&(cs-1) != 0 || cs < 1<<minClusterBits || cs > 1<<maxClusterBits {
		return nil, fmt.Errorf("cluster size %d is not a power of two from 512 to 2 MiB", cs)
	}
	rb := o.RefcountBits
	if rb == 0 {
		rb = 16
	}
	if rb&(rb-1) != 0 || rb > 64 {
		return nil, fmt.Errorf("refcount_bits %d is not a power of two up to 64", rb)
	}
	h := &header{
		Version:       3,
		ClusterBits:   uint32(bits.TrailingZeros64(uint64(cs))),
		Size:          uint64(o.Size),
		RefcountOrder: uint32(bits.TrailingZeros(uint(rb))),
		HeaderLength:  112,
		BackingFile:   o.BackingFile,
		BackingFormat: o.BackingFormat,
	}
	switch o.Compat {
	case "", "1.1":
	case "0.10":
		if rb != 16 || o.LazyRefcounts || o.ExtendedL2 || o.Compression == "zstd" {
			return nil, errors.New("compat=0.10 allows only 16-bit refcounts, zlib compression and no lazy refcounts or extended L2")
		}
		h.Version, h.HeaderLength = 2, v2HeaderLen
	default:
		return nil, fmt.Errorf("compat must be 0.10 or 1.1, not %q", o.Compat)
	}
	switch o.Compression {
	case "", "zlib":
	case "zstd":
		h.CompressionType = compressionZstd
		h.IncompatibleFeatures |= incompatCompression
	default:
		return nil, fmt.Errorf("compression_type must be zlib or zstd, not %q", o.Compression)
	}
	if o.LazyRefcounts {
		h.CompatibleFeatures |= compatLazyRefcounts
	}
	if o.ExtendedL2 {
		if cs < 1<<minClusterBitsExtL2 {
			return nil, fmt.Errorf("extended L2 entries need clusters of at least %d bytes", 1<<minClusterBitsExtL2)
		}
		h.IncompatibleFeatures |= incompatExtendedL2
	}
	switch {
	case o.Size < 0 || o.Size > maxVirtualSize:
		return nil, fmt.Errorf("size %d outside 0..%d", o.Size, int64(maxVirtualSize))
	case o.BackingFile != "" && o.BackingFormat == "":
		return nil, errors.New("a backing file needs its format")
	case len(o.BackingFile) > maxBackingNameLen:
		return nil, fmt.Errorf("backing file name longer than %d bytes", maxBackingNameLen)
	}
	clusters := (o.Size + cs - 1) / cs
	l1 := (clusters + h.l2Entries() - 1) / h.l2Entries()
	if l1*8 > maxL1Bytes {
		return nil, fmt.Errorf("size %d needs an L1 table larger than %d bytes at %d-byte clusters", o.Size, maxL1Bytes, cs)
	}
	h.L1Size = uint32(l1)
	return h, nil
}

// encode writes the header, its extensions and the backing file name into
// cluster0.
func (h *header) encode(cluster0 []byte) error {
	b := cluster0
	copy(b, Magic)
	be.PutUint32(b[4:], h.Version)
	be.PutUint32(b[20:], h.ClusterBits)
	be.PutUint64(b[24:], h.Size)
	be.PutUint32(b[36:], h.L1Size)
	be.PutUint64(b[40:], h.L1TableOffset)
	be.PutUint64(b[48:], h.RefcountTableOffset)
	be.PutUint32(b[56:], h.RefcountTableClusters)
	off := int(h.HeaderLength)
	if h.Version >= 3 {
		be.PutUint64(b[72:], h.IncompatibleFeatures)
		be.PutUint64(b[80:], h.CompatibleFeatures)
		be.PutUint32(b[96:], h.RefcountOrder)
		be.PutUint32(b[100:], h.HeaderLength)
		b[104] = h.CompressionType
	}
	ext := func(typ uint32, data []byte) error {
		n := 8 + (len(data)+7)&^7
		if off+n+8 > len(b) {
			return errors.New("header extensions do not fit in the first cluster")
		}
		be.PutUint32(b[off:], typ)
		be.PutUint32(b[off+4:], uint32(len(data)))
		copy(b[off+8:], data)
		off += n
		return nil
	}
	if h.BackingFormat != "" {
		if err := ext(extBackingFormat, []byte(h.BackingFormat)); err != nil {
			return err
		}
	}
	if err := ext(extEnd, nil); err != nil { // the end marker; the name follows it
		return err
	}
	if h.BackingFile != "" {
		if off+len(h.BackingFile) > len(b) {
			return errors.New("the backing file name does not fit in the first cluster")
		}
		be.PutUint64(b[8:], uint64(off))
		be.PutUint32(b[16:], uint32(len(h.BackingFile)))
		copy(b[off:], h.BackingFile)
	}
	return nil
}
