package diskserve

// A HostLocator knows where in host files the bytes of its disk are
// stored, as qemu-img map's "offset" and "File" report them: for tools
// that read images beside diskserve (map), not for I/O, which goes
// through [HostMapper].
//
// LocateHost describes the run of the disk from off, at most n bytes,
// that one host file stores as it reads, byte for byte in a row: its
// length, the file and the offset there. A run that reads as zeroes may
// be located at space the format keeps for it, whatever that space holds
// (qcow2's zero clusters that keep their cluster, as qemu reports them).
// File is "" for a run no file stores so: a range no layer of a chain
// allocates, a compressed cluster, a zero cluster with no space of its
// own, data a format assembles. A layer of a backing chain describes what
// it leaves to the layer below with that layer's LocateHost. The range
// lies inside [0, Size) and n > 0; the run returned is at least one byte
// long. If a disk does not implement HostLocator, [LocateHost] reports no
// file for the range.
type HostLocator interface {
	LocateHost(off, n int64) (HostLocation, error)
}

// A HostLocation is where a run of a disk is stored: Len bytes at Off in
// the host file File, or in no one file when File is "".
type HostLocation struct {
	Len  int64
	File string
	Off  int64
}

// LocateHost describes the run of d from off, at most n bytes, with d's
// [HostLocator]. A run an implementation reports longer than n, or empty,
// is cut to n.
func LocateHost(d DiskFile, off, n int64) (HostLocation, error) {
	if err := CheckRange(d.Size(), off, n); err != nil {
		return HostLocation{}, err
	}
	if n == 0 {
		return HostLocation{}, nil
	}
	l, ok := d.(HostLocator)
	if !ok {
		return HostLocation{Len: n}, nil
	}
	loc, err := l.LocateHost(off, n)
	if err != nil {
		return HostLocation{}, err
	}
	if loc.Len <= 0 || loc.Len > n {
		loc.Len = n
	}
	return loc, nil
}
