package qcow2

import (
	"fmt"

	"github.com/diskserve/diskserve"
)

// measure computes the file size of a new image as qemu-img measure
// does: every metadata structure a fully allocated image of the virtual
// size needs (header, L1 and L2 tables, refcount table and blocks, found
// as a fixed point), plus the clusters of src that hold data (all of them
// with a backing file, whose content nobody can know, or with
// preallocation=falloc or full).
func measure(opts diskserve.CreateOptions, size int64, src diskserve.DiskFile) (diskserve.Measurement, error) {
	var m diskserve.Measurement
	o, err := parseOptions(withoutMeasureOnly(opts))
	if err != nil {
		return m, err
	}
	o.Size = size
	if src != nil {
		o.Size = src.Size()
	}
	h, err := o.header()
	if err != nil {
		return m, err
	}
	prealloc := opts.String("preallocation", "off")
	switch prealloc {
	case "off", "metadata", "falloc", "full":
	default:
		return m, fmt.Errorf("preallocation must be off, metadata, falloc or full, not %q", prealloc)
	}
	cs := h.clusterSize()
	virtual := (o.Size + cs - 1) / cs * cs
	var required int64
	switch {
	case prealloc == "falloc" || prealloc == "full" || src != nil && opts.String("backing_file", "") != "":
		required = virtual
	case src != nil:
		last := int64(-1) // the last cluster counted
		err := diskserve.WalkExtents(src, 0, src.Size(), func(e diskserve.Extent) bool {
			if e.Flags&diskserve.ExtentZero == 0 {
				first := max(e.Off/cs, last+1)
				end := (e.Off + e.Len - 1) / cs
				if end >= first {
					required += (end - first + 1) * cs
					last = end
				}
			}
			return true
		})
		if err != nil {
			return m, fmt.Errorf("measure: %w", err)
		}
	}
	m.FullyAllocated = preallocSize(virtual, cs, int(h.RefcountOrder), h.extendedL2())
	m.Required = m.FullyAllocated - virtual + required
	if h.Version >= 3 && src != nil && diskserve.CapabilitiesOf(src)&diskserve.CanKeepBitmaps != 0 {
		b := bitmapsSize(diskserve.ListBitmaps(src), o.Size, cs)
		m.Bitmaps = &b
	}
	return m, nil
}

// withoutMeasureOnly returns opts without the option only measure takes.
func withoutMeasureOnly(opts diskserve.CreateOptions) diskserve.CreateOptions {
	o := diskserve.CreateOptions{}
	for k, v := range opts {
		if k != "backing_file" {
			o[k] = v
		}
	}
	return o
}

// preallocSize is the file size of an image of virtual bytes (a whole
// number of clusters) with every cluster allocated.
func preallocSize(virtual, cs int64, refcountOrder int, extL2 bool) int64 {
	entry := int64(8)
	if extL2 {
		entry = 16
	}
	meta := cs // the header
	l2e := virtual / cs
	l2e = (l2e + cs/entry - 1) / (cs / entry) * (cs / entry)
	meta += l2e * entry
	l1e := l2e * entry / cs
	l1e = (l1e + cs/8 - 1) / (cs / 8) * (cs / 8)
	meta += l1e * 8
	meta += refcountSize((meta+virtual)/cs, cs, refcountOrder)
	return meta + virtual
}

// refcountSize is the size of the refcount table and blocks that count
// clusters clusters and themselves: the fixed point qemu finds.
func refcountSize(clusters, cs int64, order int) int64 {
	perTable := cs / 8
	perBlock := cs * 8 / (1 << order)
	var table, blocks, n int64
	for {
		last := n
		blocks = (clusters + table + blocks + perBlock - 1) / perBlock
		table = (blocks + perTable - 1) / perTable
		n = clusters + blocks + table
		if n == last {
			return (blocks + table) * cs
		}
	}
}

// bitmapsSize is the space the bitmaps take in an image of size bytes
// with clusters of cs bytes, each taken as wholly set: its data clusters,
// its bitmap table, and its directory entry.
func bitmapsSize(bms []diskserve.BitmapInfo, size, cs int64) int64 {
	var total, dir int64
	for _, b := range bms {
		bytes := ((size+b.Granularity-1)/b.Granularity + 7) / 8
		clusters := (bytes + cs - 1) / cs
		total += clusters * cs
		total += (clusters*8 + cs - 1) / cs * cs
		dir += (24 + int64(len(b.Name)) + 7) &^ 7
	}
	return total + (dir+cs-1)/cs*cs
}
