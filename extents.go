package diskserve

// walkStep is the most of a disk one ExtentMapper call covers in
// [WalkExtents], which bounds the extents held at once.
const walkStep = 1 << 30

// AppendExtent appends e to dst, merged into the last extent when that one
// ends where e starts and has the same flags, and returns the extended
// slice. ExtentMappers build their answers with it, so that a caller gets
// no more extents than the allocation has runs.
func AppendExtent(dst []Extent, e Extent) []Extent {
	if k := len(dst); k > 0 && dst[k-1].Flags == e.Flags && dst[k-1].Off+dst[k-1].Len == e.Off {
		dst[k-1].Len += e.Len
		return dst
	}
	return append(dst, e)
}

// MergeExtents merges neighbouring extents of ext that have the same flags,
// in place, and returns the shortened slice.
func MergeExtents(ext []Extent) []Extent {
	out := ext[:0]
	for _, e := range ext {
		out = AppendExtent(out, e)
	}
	return out
}

// WalkExtents calls fn with the extents of [off, off+n) of d in order,
// neighbours with the same flags merged, asking d for at most 1 GiB at a
// time so that memory stays bounded on any disk. It stops early when fn
// returns false, and returns the error of the first [Extents] call that
// fails.
func WalkExtents(d DiskFile, off, n int64, fn func(Extent) bool) error {
	var (
		ext     []Extent
		pending Extent // held back in case the next call continues it
	)
	for pos, end := off, off+n; pos < end; pos += walkStep {
		var err error
		if ext, err = Extents(d, ext[:0], pos, min(walkStep, end-pos)); err != nil {
			return err
		}
		for _, e := range ext {
			if pending.Len > 0 && pending.Flags == e.Flags && pending.Off+pending.Len == e.Off {
				pending.Len += e.Len
				continue
			}
			if pending.Len > 0 && !fn(pending) {
				return nil
			}
			pending = e
		}
	}
	if pending.Len > 0 {
		fn(pending)
	}
	return nil
}
