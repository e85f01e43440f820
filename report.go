package diskserve

import "time"

// The reports of optional capabilities: what `diskserve info` shows
// ([Describer]), internal snapshots ([Snapshotter]) and checks ([Checker]).

// Info is what `diskserve info` reports about an image. Field names follow
// the keys of `qemu-img info --output=json`, so the CLI can encode it in
// that shape.
type Info struct {
	Filename      string   // the path the image was opened from
	Files         []string // other host files that hold the image's own data (VMDK extents), counted in its size on disk
	Format        string   // format name, as in Format.Name
	VirtualSize   int64
	ReadOnly      bool
	ClusterSize   int64  // 0 if the format has no clusters
	BackingFile   string // as recorded in the image; "" if none
	BackingFormat string // as recorded in the image; "" if none or unrecorded
	Dirty         bool   // the image was not closed cleanly

	// Specific holds format-specific facts, with keys as in the
	// "format-specific" data of qemu-img info where one exists.
	Specific map[string]any

	// Snapshots are the image's internal snapshots, oldest first.
	Snapshots []Snapshot

	// Backing describes the backing image, if there is one.
	Backing *Info
	// Children describe the images a container is made of (composite
	// components), in guest order.
	Children []Info
}

// A Snapshot is an internal snapshot of an image (qcow2 has them).
type Snapshot struct {
	ID, Name    string
	Date        time.Time     // when it was taken
	VMClock     time.Duration // the guest's clock then
	VMStateSize uint64        // bytes of saved VM state, 0 for a disk-only snapshot
	DiskSize    uint64        // virtual size of the disk then, 0 if unrecorded
	ICount      *uint64       // instructions the guest had run then (record and replay), nil if unrecorded
}

// Repair says what [Checker.Check] may fix.
type Repair int

const (
	RepairNone  Repair = iota // report only
	RepairLeaks               // free clusters that nothing refers to
	RepairAll                 // also raise refcounts that are too low
)

// A CheckReport is the result of a check, in qemu-img check's terms.
type CheckReport struct {
	Corruptions      int64    // problems that can lose data
	Leaks            int64    // allocated clusters nothing refers to: lost space only
	CorruptionsFixed int64    // of Corruptions, repaired
	LeaksFixed       int64    // of Leaks, repaired
	Messages         []string // one line per problem
	TotalClusters    int64    // clusters of the virtual disk
	Allocated        int64    // of those, allocated in this image
	Fragmented       int64    // of those, not right after the one before them in the image file (compressed ones all are)
	Compressed       int64    // of those, compressed
	ImageEndOffset   int64    // bytes of the image file in use
}
