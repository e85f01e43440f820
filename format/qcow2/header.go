package qcow2

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/diskserve/diskserve"
)

var be = binary.BigEndian

// Magic is the first four bytes of every qcow2 image.
const Magic = "QFI\xfb"

// Limits on values read from an image, checked before anything is
// allocated from them. Where qemu has a limit, it is the same one, so every
// image qemu makes opens and nothing it refuses does.
const (
	minClusterBits      = 9        // 512 B
	maxClusterBits      = 21       // 2 MiB
	minClusterBitsExtL2 = 14       // 16 KiB: 32 subclusters of 512 B
	maxL1Bytes          = 32 << 20 // QCOW_MAX_L1_SIZE
	maxRefTableBytes    = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	maxBackingNameLen   = 1023
	maxSnapshots        = 65536 // QCOW_MAX_SNAPSHOTS
	maxSnapshotExtra    = 1024  // QCOW_MAX_SNAPSHOT_EXTRA_DATA
	maxRefcountOrder    = 6     // 64-bit refcounts
	maxHostOffset       = 1<<56 - 1
	maxVirtualSize      = 1 << 61 // keeps every offset computation inside int64
	v2HeaderLen         = 72
	v3HeaderLen         = 104
)

// Incompatible feature bits.
const (
	incompatDirty        = 1 << 0
	incompatCorrupt      = 1 << 1
	incompatExternalData = 1 << 2
	incompatCompression  = 1 << 3
	incompatExtendedL2   = 1 << 4
	incompatKnown        = incompatDirty | incompatCorrupt | incompatExternalData | incompatCompression | incompatExtendedL2

	compatLazyRefcounts = 1 << 0
)

// Header extension types.
const (
	extEnd            = 0
	extBackingFormat  = 0xE2792ACA
	extFeatureNames   = 0x6803F857
	extExternalData   = 0x44415441
	extBitmaps        = 0x23852875
	extEncryptionHead = 0x0537BE77
)

// Compression types.
const (
	compressionZlib = 0
	compressionZstd = 1
)

// header is a parsed qcow2 header with its extensions. Field names follow
// docs/interop/qcow2.txt.
type header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64
	IncompatibleFeatures  uint64
	CompatibleFeatures    uint64
	AutoclearFeatures     uint64
	RefcountOrder         uint32
	HeaderLength          uint32
	CompressionType       uint8

	BackingFile   string
	BackingFormat string
	Bitmaps       *bitmapsExt         // the bitmaps extension; nil if there is none
	FeatureNames  map[[2]uint8]string // (type, bit) -> name, from the feature name table
}

func (h *header) clusterSize() int64 { return 1 << h.ClusterBits }

func (h *header) extendedL2() bool { return h.IncompatibleFeatures&incompatExtendedL2 != 0 }

// l2Entries is the number of entries in one L2 table.
func (h *header) l2Entries() int64 {
	if h.extendedL2() {
		return h.clusterSize() / 16
	}
	return h.clusterSize() / 8
}

func corrupt(off int64, msg string, args ...any) error {
	return diskserve.Corrupt("qcow2", off, msg, args...)
}

func unsupported(off int64, msg string, args ...any) error {
	return diskserve.Unsupported("qcow2", off, msg, args...)
}

// parseHeader parses the header and extensions in cluster0, the first
// cluster of an image whose file is fileSize bytes long (or the whole file,
// if it is shorter). It is a pure function, so that it can be fuzzed and
// table-tested without files.
func parseHeader(cluster0 []byte, fileSize int64) (*header, error) {
	if len(cluster0) < v2HeaderLen {
		return nil, corrupt(0, "header truncated: %d bytes, need at least %d", len(cluster0), v2HeaderLen)
	}
	if string(cluster0[:4]) != Magic {
		return nil, corrupt(0, "bad magic %q", cluster0[:4])
	}
	b := cluster0
	h := &header{
		Version:               be.Uint32(b[4:]),
		BackingFileOffset:     be.Uint64(b[8:]),
		BackingFileSize:       be.Uint32(b[16:]),
		ClusterBits:           be.Uint32(b[20:]),
		Size:                  be.Uint64(b[24:]),
		CryptMethod:           be.Uint32(b[32:]),
		L1Size:                be.Uint32(b[36:]),
		L1TableOffset:         be.Uint64(b[40:]),
		RefcountTableOffset:   be.Uint64(b[48:]),
		RefcountTableClusters: be.Uint32(b[56:]),
		NbSnapshots:           be.Uint32(b[60:]),
		SnapshotsOffset:       be.Uint64(b[64:]),
		RefcountOrder:         4,
		HeaderLength:          v2HeaderLen,
	}
	switch h.Version {
	case 2:
	case 3:
		if len(b) < v3HeaderLen {
			return nil, corrupt(0, "version 3 header truncated: %d bytes, need %d", len(b), v3HeaderLen)
		}
		h.IncompatibleFeatures = be.Uint64(b[72:])
		h.CompatibleFeatures = be.Uint64(b[80:])
		h.AutoclearFeatures = be.Uint64(b[88:])
		h.RefcountOrder = be.Uint32(b[96:])
		h.HeaderLength = be.Uint32(b[100:])
	default:
		return nil, unsupported(4, "version %d is not supported (only 2 and 3)", h.Version)
	}
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return nil, corrupt(20, "cluster_bits %d outside %d..%d", h.ClusterBits, minClusterBits, maxClusterBits)
	}
	cs := h.clusterSize()
	if h.Version == 3 && (h.HeaderLength < v3HeaderLen || h.HeaderLength%8 != 0 || int64(h.HeaderLength) > cs) {
		return nil, corrupt(100, "header_length %d is not a multiple of 8 between %d and the cluster size", h.HeaderLength, v3HeaderLen)
	}
	if int(h.HeaderLength) > len(b) {
		return nil, corrupt(100, "header_length %d runs past the end of the file", h.HeaderLength)
	}
	if h.HeaderLength > v3HeaderLen {
		h.CompressionType = b[104]
	}
	if err := h.parseExtensions(b); err != nil {
		return nil, err
	}
	if err := h.checkFeatures(); err != nil {
		return nil, err
	}
	if err := h.checkLayout(fileSize); err != nil {
		return nil, err
	}
	if h.BackingFileOffset != 0 {
		end := h.BackingFileOffset + uint64(h.BackingFileSize)
		switch {
		case h.BackingFileSize == 0 || h.BackingFileSize > maxBackingNameLen:
			return nil, corrupt(16, "backing file name length %d outside 1..%d", h.BackingFileSize, maxBackingNameLen)
		case h.BackingFileOffset < uint64(h.HeaderLength) || end > uint64(cs) || end > uint64(len(b)):
			return nil, corrupt(8, "backing file name at %#x+%d lies outside the first cluster", h.BackingFileOffset, h.BackingFileSize)
		}
		h.BackingFile = string(b[h.BackingFileOffset:end])
		if strings.IndexByte(h.BackingFile, 0) >= 0 {
			return nil, corrupt(int64(h.BackingFileOffset), "backing file name contains a NUL byte")
		}
	}
	return h, nil
}

// parseExtensions reads the header extensions that follow the header (in
// version 2 too), up to the backing file name or the end of the first
// cluster.
func (h *header) parseExtensions(b []byte) error {
	limit := min(int64(len(b)), h.clusterSize())
	if h.BackingFileOffset != 0 && int64(h.BackingFileOffset) < limit {
		limit = int64(h.BackingFileOffset)
	}
	seen := map[uint32]bool{}
	for off := int64(h.HeaderLength); ; {
		if off+8 > limit {
			return corrupt(off, "header extensions run past the first cluster without an end marker")
		}
		typ, n := be.Uint32(b[off:]), int64(be.Uint32(b[off+4:]))
		if typ == extEnd {
			return nil
		}
		data := off + 8
		if n > limit-data {
			return corrupt(off, "header extension %#x of %d bytes runs past the first cluster", typ, n)
		}
		if seen[typ] {
			return corrupt(off, "header extension %#x appears twice", typ)
		}
		seen[typ] = true
		d := b[data : data+n]
		switch typ {
		case extBackingFormat:
			h.BackingFormat = string(d)
		case extBitmaps:
			if len(d) < 24 {
				return corrupt(off, "bitmaps extension of %d bytes, need 24", len(d))
			}
			h.Bitmaps = &bitmapsExt{Count: be.Uint32(d), Reserved: be.Uint32(d[4:]), DirSize: be.Uint64(d[8:]), DirOffset: be.Uint64(d[16:]), At: data}
		case extFeatureNames:
			h.FeatureNames = map[[2]uint8]string{}
			for i := 0; i+48 <= len(d); i += 48 {
				h.FeatureNames[[2]uint8{d[i], d[i+1]}] = strings.TrimRight(string(d[i+2:i+48]), "\x00")
			}
		}
		off = data + (n+7)&^7
	}
}

// checkFeatures refuses what this reader cannot read correctly.
func (h *header) checkFeatures() error {
	if h.CryptMethod != 0 {
		return unsupported(32, "encrypted images (crypt_method %d) are not supported", h.CryptMethod)
	}
	if unknown := h.IncompatibleFeatures &^ incompatKnown; unknown != 0 {
		return unsupported(72, "unknown incompatible features %s", h.featureNames(0, unknown))
	}
	if h.IncompatibleFeatures&incompatExternalData != 0 {
		return unsupported(72, "images with an external data file are not supported")
	}
	compressionBit := h.IncompatibleFeatures&incompatCompression != 0
	switch {
	case h.CompressionType > compressionZstd:
		return unsupported(104, "compression type %d is not supported", h.CompressionType)
	case compressionBit != (h.CompressionType != compressionZlib):
		return corrupt(104, "compression type %d does not match the compression type feature bit", h.CompressionType)
	}
	if h.RefcountOrder > maxRefcountOrder {
		return corrupt(96, "refcount_order %d is more than %d", h.RefcountOrder, maxRefcountOrder)
	}
	if h.extendedL2() && h.ClusterBits < minClusterBitsExtL2 {
		return corrupt(20, "extended L2 entries need clusters of at least %d bytes", 1<<minClusterBitsExtL2)
	}
	return nil
}

// featureNames names the set bits of mask of the given feature type, from
// the image's own feature name table where it has one.
func (h *header) featureNames(typ uint8, mask uint64) string {
	var names []string
	for bit := range 64 {
		if mask&(1<<bit) == 0 {
			continue
		}
		if n, ok := h.FeatureNames[[2]uint8{typ, uint8(bit)}]; ok && n != "" {
			names = append(names, fmt.Sprintf("%q (bit %d)", n, bit))
		} else {
			names = append(names, fmt.Sprintf("bit %d", bit))
		}
	}
	return strings.Join(names, ", ")
}

// checkLayout checks the sizes and offsets of the tables against the
// limits and the file.
func (h *header) checkLayout(fileSize int64) error {
	cs := h.clusterSize()
	if h.Size > maxVirtualSize {
		return corrupt(24, "virtual size %d is more than %d", h.Size, uint64(maxVirtualSize))
	}
	clusters := (int64(h.Size) + cs - 1) / cs
	needL1 := (clusters + h.l2Entries() - 1) / h.l2Entries()
	switch {
	case int64(h.L1Size)*8 > maxL1Bytes:
		return corrupt(36, "L1 table of %d entries is larger than %d bytes", h.L1Size, maxL1Bytes)
	case int64(h.L1Size) < needL1:
		return corrupt(36, "L1 table of %d entries is too small for a virtual size of %d bytes (need %d)", h.L1Size, h.Size, needL1)
	}
	if err := checkTable("L1 table", 40, h.L1TableOffset, int64(h.L1Size)*8, cs, fileSize); err != nil {
		return err
	}
	if int64(h.RefcountTableClusters)*cs > maxRefTableBytes {
		return corrupt(56, "refcount table of %d clusters is larger than %d bytes", h.RefcountTableClusters, maxRefTableBytes)
	}
	if h.RefcountTableClusters == 0 {
		return corrupt(56, "no refcount table")
	}
	if err := checkTable("refcount table", 48, h.RefcountTableOffset, int64(h.RefcountTableClusters)*cs, cs, fileSize); err != nil {
		return err
	}
	if h.NbSnapshots > maxSnapshots {
		return corrupt(60, "%d snapshots, more than %d", h.NbSnapshots, maxSnapshots)
	}
	if h.NbSnapshots > 0 {
		if err := checkTable("snapshot table", 64, h.SnapshotsOffset, 1, cs, fileSize); err != nil {
			return err
		}
	}
	return nil
}

// checkTable checks that a table of n bytes at off is cluster aligned, not
// in the header cluster, and inside the file.
func checkTable(what string, field int64, off uint64, n, cs, fileSize int64) error {
	switch {
	case off == 0 || off%uint64(cs) != 0:
		return corrupt(field, "%s offset %#x is not a non-zero multiple of the cluster size", what, off)
	case off > uint64(fileSize) || n > fileSize-int64(off):
		return corrupt(field, "%s at %#x (%d bytes) runs past the end of the file (%d bytes)", what, off, n, fileSize)
	}
	return nil
}
