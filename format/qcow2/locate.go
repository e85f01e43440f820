package qcow2

import "github.com/diskserve/diskserve"

var _ diskserve.HostLocator = (*Disk)(nil)

// LocateHost locates the run from off as qemu-img map does: clusters
// stored one after another in the image file (zero clusters that keep
// their space included), and where this layer holds nothing, what the
// backing file says of the range. Past the backing file's end such a
// range reads as zeroes, in the space of its cluster if that has some (a
// subcluster of an extended L2 entry), as qemu reports it. Compressed
// clusters and zero clusters without space are in no file.
func (d *Disk) LocateHost(off, n int64) (diskserve.HostLocation, error) {
	if span := d.l2n << d.bits; d.l2Unallocated(off) {
		return d.locateBelow(off, min(n, (off/span+1)*span-off))
	}
	m, err := d.lockedMapAt(off)
	if err != nil {
		return diskserve.HostLocation{}, err
	}
	m.n = min(m.n, n)
	switch {
	case m.kind == kindBacking && d.backing != nil && off < d.backing.Size():
		return d.locateBelow(off, m.n)
	case m.host == 0: // compressed, or zeroes without space
		return diskserve.HostLocation{Len: m.n}, nil
	case m.kind == kindBacking:
		return diskserve.LocateHost(d.c, m.host, m.n)
	}
	run := m.n
	for run < n {
		next, err := d.lockedMapAt(off + run)
		if err != nil || next.kind == kindBacking || next.host != m.host+run {
			break
		}
		run += min(next.n, n-run)
	}
	return diskserve.LocateHost(d.c, m.host, run)
}

// locateBelow locates [off, off+n), which this layer leaves to the layers
// below, in the backing file; past its end, or without one, the range
// reads as zeroes from no file.
func (d *Disk) locateBelow(off, n int64) (diskserve.HostLocation, error) {
	if d.backing == nil || off >= d.backing.Size() {
		return diskserve.HostLocation{Len: n}, nil
	}
	return diskserve.LocateHost(d.backing, off, min(n, d.backing.Size()-off))
}
