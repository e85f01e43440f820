package diskserve

import (
	"io"
)

// A DiskFile is a virtual disk: Size() bytes addressable by byte offset.
//
// ReadAt follows the [io.ReaderAt] contract: a read that returns fewer than
// len(p) bytes returns a non-nil error saying why; a read that starts at or
// past Size returns 0, [io.EOF]; a read that crosses Size returns the bytes
// up to Size and [io.EOF]; a read that ends exactly at Size may return
// either nil or io.EOF. Formats never return a short read for any other
// reason than an I/O error: a read that spans clusters, chunks, frames or
// components is split internally.
//
// WriteAt follows the [io.WriterAt] contract, except that a DiskFile never
// grows by being written: a write that does not fit inside [0, Size) writes
// nothing and returns an error wrapping [ErrOutOfRange]. On a read-only
// DiskFile, WriteAt and every mutating capability return an error wrapping
// [ErrReadOnly].
//
// A DiskFile is safe for concurrent use: any number of ReadAt calls may run
// in parallel, and so may WriteAt calls on non-overlapping ranges, with each
// other and with reads of other ranges. The capability methods below may
// run concurrently with ReadAt and WriteAt on ranges they do not touch.
// Requests that do overlap a concurrent write may still arrive (an NBD
// client may send them, and the protocol leaves their outcome to the
// client): the bytes they share are then undefined, but the disk must stay
// memory-safe and its metadata consistent, and no other byte may change.
// Implementations must not retain p after returning. Close must not be
// called concurrently with any other method; after Close, the DiskFile and
// every image it opened (backing files, components) are released.
//
// Features that not every format has are optional interfaces, declared
// once in the capability list ([Capabilities]). Callers never type-assert
// them: each has a package-level function that does, and that holds the
// fallback for disks that lack it:
//
//   - [Flusher], used by [Flush]: without it there is nothing to flush.
//   - [ZeroWriter], used by [WriteZeroes]: without it zeroes are written.
//   - [HolePuncher], used by [PunchHole]: without it the range is zeroed.
//   - [ExtentMapper], used by [Extents]: without it all is data.
//   - [DepthMapper], used by [AllocationDepths]: without it all is the
//     disk's own.
//   - [Resizer], used by [Resize]: without it the size is fixed.
//   - [Emptier], used by [MakeEmpty]: without it an overlay keeps its
//     data after a commit.
//   - [BackingChanger], used by [SetBacking]: without it the backing
//     file recorded cannot change.
//   - [Describer], used by [Describe]: without it only size and mode.
//   - [Checker], used by [Check]: without it nothing can be checked.
//   - [Snapshotter], used by [CreateSnapshot], [ApplySnapshot] and
//     [DeleteSnapshot]: without it there are no internal snapshots.
//   - [CompressedWriter], used by [WriteCompressed]: without it data is
//     not stored compressed.
//   - [BitmapKeeper], used by [FindDirtyBitmap]: without it there are no
//     dirty bitmaps.
//   - [HostMapper], used by [MapHost]: without it engines and exporters
//     move every byte through ReadAt and WriteAt.
//   - [HostLocator], used by [LocateHost]: without it map reports no host
//     offsets.
//
// [CapabilitiesOf] tells exporters what is native, to advertise. A
// [Wrapper] implements every capability but HostMapper and forwards it
// ([Passthrough] does, for wrappers that embed it).
type DiskFile interface {
	io.ReaderAt
	io.WriterAt
	io.Closer

	// Size returns the virtual size in bytes, as a guest sees it. It
	// changes only through [Resize].
	Size() int64

	// ReadOnly reports whether the disk refuses writes. Exporters read it
	// once, when a client attaches (NBD_FLAG_READ_ONLY, the FUSE file mode).
	ReadOnly() bool
}

// A Flusher has writes or metadata that are not yet on stable storage.
//
// Flush returns once every write that completed before the call is durable:
// data, and the metadata needed to find it after a crash. Every writable
// format implements Flusher; the conformance suite checks that. If a disk
// does not implement it, [Flush] does nothing, which is right only for disks
// that have nothing to make durable.
type Flusher interface {
	Flush() error
}

// ZeroFlags modify a [ZeroWriter.WriteZeroesAt] request. The zero value asks
// for zeroes that stay allocated.
type ZeroFlags uint32

const (
	// ZeroMayUnmap lets the disk deallocate the range instead of writing
	// zeroes into it, as long as it reads back as zeroes (NBD: a
	// WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE).
	ZeroMayUnmap ZeroFlags = 1 << iota

	// ZeroFast asks the disk to fail with an error wrapping
	// [errors.ErrUnsupported] rather than zero the range by writing data
	// (NBD_CMD_FLAG_FAST_ZERO). [WriteZeroes] then does not fall back.
	ZeroFast
)

// A ZeroWriter can make a range read as zeroes without transferring a buffer
// of zeroes: FALLOC_FL_ZERO_RANGE, the qcow2 zero flag, a sparse hole.
//
// WriteZeroesAt makes [off, off+n) read as zeroes. The range must lie inside
// [0, Size), or the call fails with [ErrOutOfRange]. A disk that cannot do
// this cheaply for a given request (a file system without ZERO_RANGE, say)
// returns an error wrapping [errors.ErrUnsupported], and [WriteZeroes]
// falls back to writing zeroes unless [ZeroFast] was asked for. If a disk
// does not implement ZeroWriter, [WriteZeroes] always falls back.
type ZeroWriter interface {
	WriteZeroesAt(off, n int64, flags ZeroFlags) error
}

// A HolePuncher can deallocate a range of the disk.
//
// PunchHole deallocates [off, off+n) where it can; afterwards the whole range
// reads as zeroes, also where nothing could be deallocated (an unaligned
// head or tail, a qcow2 overlay whose backing file holds data there). The
// range must lie inside [0, Size). A disk that cannot punch holes returns an
// error wrapping [errors.ErrUnsupported], and [PunchHole] falls back to
// [WriteZeroes] with [ZeroMayUnmap]; so it does if the disk does not
// implement HolePuncher.
//
// PunchHole takes no flags: the only NBD flag that applies to TRIM is FUA,
// and exporters implement FUA for every command as a [Flush] after it.
type HolePuncher interface {
	PunchHole(off, n int64) error
}

// ExtentFlags describe the allocation state of an [Extent]. The bits are
// those of the NBD base:allocation metadata context, so exporters pass them
// through unchanged. The zero value means "allocated data", the safe answer
// for a disk that does not know better.
type ExtentFlags uint32

const (
	// ExtentHole marks a range that is not allocated in this image
	// (NBD_STATE_HOLE). It may still read as data from a backing file.
	ExtentHole ExtentFlags = 1 << 0

	// ExtentZero marks a range that reads as zeroes (NBD_STATE_ZERO).
	ExtentZero ExtentFlags = 1 << 1

	// ExtentDirty marks, in the extents of a [DirtyBitmap], a range
	// written while the bitmap was enabled (the flag of NBD's
	// qemu:dirty-bitmap contexts).
	ExtentDirty ExtentFlags = 1 << 0
)

// An Extent is a range of the virtual disk with one allocation state.
type Extent struct {
	Off, Len int64
	Flags    ExtentFlags
}

// An ExtentMapper knows which parts of the disk hold data.
//
// AppendExtents appends to dst extents that cover exactly [off, off+n), in
// order and without gaps or overlaps, and returns the extended slice. The
// range lies inside [0, Size). Adjacent extents may share flags; callers that
// care merge them. An extent may claim data where there are zeroes, never the
// reverse: ExtentZero is a promise about what a read returns. If a disk does
// not implement ExtentMapper, [Extents] reports the whole range as data.
type ExtentMapper interface {
	AppendExtents(dst []Extent, off, n int64) ([]Extent, error)
}

// A DepthMapper knows which layer of a backing chain holds each part of
// the disk (NBD's qemu:allocation-depth context).
//
// AppendDepths appends to dst extents that cover exactly [off, off+n), as
// AppendExtents does, whose Flags field holds not flags but a depth: 1
// where this image holds the range (data or zeroes it records), 2 where
// its backing file does, and so on down the chain, 0 where no layer does
// (it reads as zeroes). If a disk does not implement DepthMapper,
// [AllocationDepths] reports the whole range at depth 1: a disk without
// layers holds all of itself.
type DepthMapper interface {
	AppendDepths(dst []Extent, off, n int64) ([]Extent, error)
}

// A Resizer can change the virtual size of the disk.
//
// Resize sets the size to size bytes. Growing adds a range that reads as
// zeroes; shrinking discards the tail. A disk that can only grow returns an
// error wrapping [errors.ErrUnsupported] for a smaller size. If a disk does
// not implement Resizer, [Resize] fails with errors.ErrUnsupported.
type Resizer interface {
	Resize(size int64) error
}

// An Emptier can drop everything the top layer of a backing chain holds,
// so that the layers below show through again, at the same size: what
// commit does to an overlay once its data is in the layer below (qemu's
// make-empty). If a disk does not implement Emptier, [MakeEmpty] fails
// with errors.ErrUnsupported.
type Emptier interface {
	MakeEmpty() error
}

// A BackingChanger can record another backing file in its image, or none:
// `qemu-img rebase -u`'s change, which rebase and amend end with.
// SetBacking records name (as given: relative names are relative to the
// image) and its format fmtName ("" records none), or no backing file when
// name is "". The data is not touched, and the open disk goes on reading
// through the backing file it was opened with. If a disk does not
// implement BackingChanger, [SetBacking] fails with
// errors.ErrUnsupported.
type BackingChanger interface {
	SetBacking(name, fmtName string) error
}

// A Describer reports facts about its image for `diskserve info`.
//
// Describe fills in the format's own fields of info; [Describe] has already
// set the virtual size. Formats that open other images describe them too
// (Info.Backing, Info.Children).
type Describer interface {
	Describe(info *Info)
}

// A Snapshotter keeps internal snapshots: earlier states of the disk
// stored inside its own image, as qcow2 does. A snapshot is named by its ID
// or its name, the ID first, as qemu-img snapshot names them.
//
// CreateSnapshot records the disk's current content under name, with the
// next free ID, and returns the new snapshot. ApplySnapshot reverts the disk
// to a snapshot's content and size, discarding what was written since (the
// snapshot itself is kept). DeleteSnapshot drops a snapshot and frees what
// only it held. Each call is durable when it returns, and an interrupted one
// leaves the image as before or as after it, with at most leaked space.
//
// Unlike the other capabilities, these calls must not run concurrently with
// any other method of the disk: an exporter quiesces its clients first. On
// a read-only disk they fail with an error wrapping [ErrReadOnly]. If a disk
// does not implement Snapshotter, [CreateSnapshot], [ApplySnapshot] and
// [DeleteSnapshot] fail with an error wrapping [errors.ErrUnsupported]; the
// list of snapshots is [Info.Snapshots], from [Describe].
type Snapshotter interface {
	CreateSnapshot(name string) (Snapshot, error)
	ApplySnapshot(name string) error
	DeleteSnapshot(name string) error
}

// A BitmapKeeper keeps persistent dirty bitmaps: named records of the
// parts of the disk written while each was enabled, which backup tools
// read to copy only what changed (qcow2 keeps them).
//
// DirtyBitmap returns the bitmap called name, for reading. It fails if
// the disk has no such bitmap or cannot vouch for it (one that a writer
// left marked in use, by crashing, is inconsistent). If the bitmap is
// enabled and the disk open for writing, what it reports includes the
// writes made through the disk after the call. If a disk does not
// implement BitmapKeeper, [FindDirtyBitmap] fails with an error wrapping
// [errors.ErrUnsupported].
//
// Bitmaps lists the disk's bitmaps, usable or not.
type BitmapKeeper interface {
	DirtyBitmap(name string) (DirtyBitmap, error)
	Bitmaps() []BitmapInfo
}

// A BitmapInfo describes one bitmap of a [BitmapKeeper].
type BitmapInfo struct {
	Name        string
	Granularity int64
	Enabled     bool // it records writes
	InUse       bool // a writer has the image open, or did not close it (then it is inconsistent)
}

// A DirtyBitmap is one bitmap of a [BitmapKeeper].
type DirtyBitmap interface {
	// Granularity is the number of bytes one bit of the bitmap covers.
	Granularity() int64
	// DirtyExtents appends to dst the extents of [off, off+n) of the
	// disk, in order and covering it, those with a bit set flagged
	// [ExtentDirty]. The range lies inside the disk.
	DirtyExtents(dst []Extent, off, n int64) []Extent
}

// A Wrapper is a disk that serves requests by passing them to another disk
// (an I/O engine, a fault injector, a meter). It implements every
// capability of [Forwarded] and forwards each, usually by embedding
// [Passthrough]; it implements [HostMapper] only if requests may bypass
// it. Unwrap returns the disk beneath, so that [CapabilitiesOf] reports
// what that disk has natively.
type Wrapper interface {
	Unwrap() DiskFile
}

// A Checker can verify an image's metadata, as qemu-img check does.
//
// Check reports every problem it finds; with a repair level above
// [RepairNone] it also fixes what that level covers, on a disk opened
// read-write. The error is for a check that could not be completed (an
// I/O error, an image too damaged to walk), not for problems found. If a
// disk does not implement Checker, [Check] returns an error wrapping
// [errors.ErrUnsupported].
type Checker interface {
	Check(repair Repair) (CheckReport, error)
}
