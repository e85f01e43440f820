package diskserve

import (
	"errors"
	"fmt"
	"strings"
)

// Capabilities are a set of the optional interfaces of a [DiskFile]: what a
// disk can do beyond reading and writing.
type Capabilities uint32

// The capabilities, one per optional interface. capabilityList below is
// their one declaration: [CapabilitiesOf], [Capabilities.String], the
// forwarding of [Passthrough] and the tests that hold every wrapper to it
// all follow from it.
const (
	CanFlush           Capabilities = 1 << iota // Flusher
	CanWriteZeroes                              // ZeroWriter
	CanPunchHole                                // HolePuncher
	CanMapExtents                               // ExtentMapper
	CanMapDepths                                // DepthMapper
	CanResize                                   // Resizer
	CanDescribe                                 // Describer
	CanCheck                                    // Checker
	CanSnapshot                                 // Snapshotter
	CanWriteCompressed                          // CompressedWriter
	CanKeepBitmaps                              // BitmapKeeper
	CanMapHost                                  // HostMapper
	CanEmpty                                    // Emptier
	CanChangeBacking                            // BackingChanger
	CanLocateHost                               // HostLocator
)

// A capability is one entry of the capability set.
type capability struct {
	c     Capabilities
	iface string                // the optional interface, as the docs name it
	has   func(d DiskFile) bool // whether d implements the interface
	// forwarded says that every wrapper must implement the interface
	// and pass it on. HostMapper is the one that is not: a mapping lets
	// an engine move data past every wrapper above the mapped disk, so a
	// wrapper maps only where it has chosen to (see [HostMapper]).
	forwarded bool
}

// capabilityList declares the capability set, in the order of the
// constants.
var capabilityList = []capability{
	{CanFlush, "Flusher", is[Flusher], true},
	{CanWriteZeroes, "ZeroWriter", is[ZeroWriter], true},
	{CanPunchHole, "HolePuncher", is[HolePuncher], true},
	{CanMapExtents, "ExtentMapper", is[ExtentMapper], true},
	{CanMapDepths, "DepthMapper", is[DepthMapper], true},
	{CanResize, "Resizer", is[Resizer], true},
	{CanDescribe, "Describer", is[Describer], true},
	{CanCheck, "Checker", is[Checker], true},
	{CanSnapshot, "Snapshotter", is[Snapshotter], true},
	{CanWriteCompressed, "CompressedWriter", is[CompressedWriter], true},
	{CanKeepBitmaps, "BitmapKeeper", is[BitmapKeeper], true},
	{CanMapHost, "HostMapper", is[HostMapper], false},
	{CanEmpty, "Emptier", is[Emptier], true},
	{CanChangeBacking, "BackingChanger", is[BackingChanger], true},
	{CanLocateHost, "HostLocator", is[HostLocator], true},
}

func is[T any](d DiskFile) bool {
	_, ok := d.(T)
	return ok
}

// Forwarded is the set of capabilities that every [Wrapper] implements and
// passes to the disk beneath: all but [CanMapHost].
var Forwarded = func() Capabilities {
	var c Capabilities
	for _, e := range capabilityList {
		if e.forwarded {
			c |= e.c
		}
	}
	return c
}()

// CapabilitiesOf reports which optional interfaces d implements natively,
// for exporters that advertise what is cheap (NBD's SEND_TRIM and
// SEND_FAST_ZERO) and leave out what would only be emulated. For a
// [Wrapper], whose forwarding methods exist whatever the disk beneath has,
// the forwarded capabilities are those of the disk it wraps, and
// [CanMapHost] is the wrapper's own. Using a capability still goes through
// the package functions.
func CapabilitiesOf(d DiskFile) Capabilities {
	own := Implemented(d)
	if w, ok := d.(Wrapper); ok {
		return CapabilitiesOf(w.Unwrap())&Forwarded | own&^Forwarded
	}
	return own
}

// Implemented reports which optional interfaces d's type has, without
// looking through wrappers: for a wrapper that forwards everything it is
// at least [Forwarded]. Tests hold wrappers to that.
func Implemented(d DiskFile) Capabilities {
	var c Capabilities
	for _, e := range capabilityList {
		if e.has(d) {
			c |= e.c
		}
	}
	return c
}

// String lists the interfaces of the set: "Flusher|ZeroWriter".
func (c Capabilities) String() string {
	var names []string
	for _, e := range capabilityList {
		if c&e.c != 0 {
			names = append(names, e.iface)
			c &^= e.c
		}
	}
	if c != 0 || len(names) == 0 {
		names = append(names, fmt.Sprintf("%#x", uint32(c)))
	}
	return strings.Join(names, "|")
}

// A CompressedWriter can store data compressed, as qcow2's compressed
// clusters do (`convert -c`).
//
// WriteCompressed writes p at off compressed. off must be aligned to the
// disk's compression unit ([Info.ClusterSize] from [Describe]) and p must
// be one whole unit, or the rest of the disk for its last partial unit;
// other requests fail with [ErrOutOfRange]. Data that does not compress is
// stored as it is. Compression runs outside the disk's locks, so callers
// may compress on many goroutines. If a disk does not implement
// CompressedWriter, [WriteCompressed] fails with an error wrapping
// [errors.ErrUnsupported].
type CompressedWriter interface {
	WriteCompressed(p []byte, off int64) error
}

// WriteCompressed stores p at off of d compressed, with d's
// [CompressedWriter].
func WriteCompressed(d DiskFile, p []byte, off int64) error {
	if err := CheckWrite(d, off, int64(len(p))); err != nil {
		return fmt.Errorf("write compressed: %w", err)
	}
	if c, ok := d.(CompressedWriter); ok {
		return c.WriteCompressed(p, off)
	}
	return fmt.Errorf("write compressed: the disk cannot store compressed data: %w", errors.ErrUnsupported)
}
