// Package diskserve holds the contracts of the diskserve disk engine: the
// [DiskFile] interface every image format implements, the optional
// capability interfaces, the errors, and the format-agnostic opener.
//
// # The contract
//
// A [DiskFile] is an [io.ReaderAt] and [io.WriterAt] over a fixed-size
// virtual disk, safe for concurrent use. What only some formats can do is an
// optional one-method interface, each declared once in the capability list
// ([Capabilities]): [Flusher], [ZeroWriter], [HolePuncher], [ExtentMapper],
// [Resizer], [Describer], [Checker], [Snapshotter], [CompressedWriter] and
// [HostMapper]. Code that uses a disk calls the package function of each
// ([Flush], [WriteZeroes], [PunchHole], [Extents], ...), which uses the
// capability when the disk has it and falls back when it does not; nothing
// outside this package type-asserts a capability. A wrapper around a
// DiskFile must therefore implement every capability itself and forward
// it through these functions (embedding a DiskFile forwards only the
// methods of DiskFile): [Passthrough] does, and the tests hold every
// wrapper to the list.
//
// Shared rules have one helper each: [ClipRead] for the bounds of a read,
// [CheckWrite] and [CheckRange] for those of a write, [AppendExtent],
// [MergeExtents] and [WalkExtents] for extents, [Errno] for the errno an
// exporter reports.
//
// # Making images
//
// A [Format] that can be written declares a [Creator]: its -o options, and
// either New (an empty image, written in place) or Write (a whole image in
// one pass from a source). The CLI's create, convert and bench are driven
// by the format list through it, and know no format by name.
//
// # Opening images
//
// [Open] opens a file, reads its first [SniffSize] bytes, and gives the file
// to the first [Format] of [Options.Formats] whose magic matches, or to the
// format named by [Options.Format]. Formats that refer to other images
// (qcow2 backing files, composite components) open them through
// [OpenContext.OpenChild], which applies the nesting depth limit and the
// path policy. This package knows no format: package format lists the
// built-in ones, and each lives in its own package under format/, importing
// only this one.
//
// # Errors
//
// Errors wrap the sentinels [ErrReadOnly], [ErrOutOfRange],
// [ErrUnsupported], [ErrNestingDepth], [ErrCorrupt] and [ErrUnknownFormat].
// A malformed image gives a [*FormatError] naming the format, the byte
// offset and what is wrong; the opener wraps it in an [*fs.PathError]
// naming the file.
package diskserve
