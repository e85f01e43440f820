package diskserve

import "unsafe"

// A HostMapper stores guest data verbatim in host files, so that an I/O
// engine can move the bytes of a read or write itself (with io_uring) while
// the format keeps its metadata. Raw images map everything; a composite maps
// what lies in one raw component.
//
// MapHost reports where [off, off+n) lies, or ok == false when the range is
// not one contiguous run of one host file that a plain pread (or, with
// write, pwrite) of the file may serve: it crosses files, it is a hole or a
// compressed cluster, the disk is read-only, the format must see the
// write, or the disk's own WriteAt does it more cheaply (raw stores writes
// to cached pages with a memory copy). The range lies inside [0, Size). A
// mapping for writing also does what the format's WriteAt does before it
// writes (a composite marks the component dirty for its next Flush). A
// mapping is valid for one I/O, issued before the next Resize or Close,
// after which the caller calls [HostRange.Done].
//
// A request served through a mapping bypasses every wrapper above the
// mapped disk. Wrappers therefore do not forward MapHost unless they
// choose to ([Passthrough] does not): one that must see every request
// (metering, throttling, fault injection) simply leaves it out.
type HostMapper interface {
	MapHost(off, n int64, write bool) (r HostRange, ok bool)
}

// A HostRange is where a range of a virtual disk lies in a host file.
type HostRange struct {
	// FD is the host file's descriptor. The disk owns it: it stays open
	// until the disk is closed.
	FD int
	// Off is the range's offset in the host file.
	Off int64
	// Whole says that the disk is nothing but this file, byte for byte:
	// its Flush is fdatasync(FD), its PunchHole and WriteZeroesAt are
	// fallocate on FD at the same offsets, so an engine may issue those
	// itself too.
	Whole bool
	// MemAlign, when not 0, says that FD is open with O_DIRECT: the I/O's
	// buffer must start at a multiple of MemAlign in memory ([HostRange.Admits]).
	// Its offset and length are aligned, or MapHost would not map them.
	MemAlign int
	// Release, when not nil, holds back the disk's conflicting work until
	// it is called (a direct write excludes the read-modify-writes of its
	// blocks): whoever was given the mapping calls it through [HostRange.Done]
	// once the I/O is over, or given up.
	Release func()
}

// Done says that the I/O through r is over, or given up.
func (r HostRange) Done() {
	if r.Release != nil {
		r.Release()
	}
}

// Direct reports whether r's file is open with O_DIRECT: its data is not
// in the page cache.
func (r HostRange) Direct() bool { return r.MemAlign != 0 }

// Admits reports whether an I/O through r may use buf as it is.
func (r HostRange) Admits(buf []byte) bool {
	return r.MemAlign == 0 || uintptr(unsafe.Pointer(unsafe.SliceData(buf)))%uintptr(r.MemAlign) == 0
}

// MapHost returns d's [HostMapper] mapping of [off, off+n) for a read or,
// with write, a write; ok is false when d is not a HostMapper, the range is
// not inside the disk, or d cannot map it.
func MapHost(d DiskFile, off, n int64, write bool) (r HostRange, ok bool) {
	m, is := d.(HostMapper)
	if !is || CheckRange(d.Size(), off, n) != nil || write && d.ReadOnly() {
		return HostRange{}, false
	}
	return m.MapHost(off, n, write)
}
