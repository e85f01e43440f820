// Package composite reads and writes crosvm's composite disks: a guest
// disk stitched from several images, described by the magic
// "composite_disk\x1d" and a protobuf CompositeDisk message
// (protos/src/cdisk_spec.proto in crosvm).
//
// # Supported
//
//   - Spec versions 1 and 2, decoded with protowire; unknown fields are
//     skipped. Components are sorted by offset and must tile the disk from
//     0 to its length; each must be at least as long as its range past its
//     file offset.
//
//   - Component paths relative to the composite file's directory; every
//     component opened through the opener, so it can be of any format, the
//     nesting depth applies, and a composite that lists itself fails.
//
//   - Reads and writes split across components; writes to a read-only
//     component fail with [diskserve.ErrReadOnly] before anything is
//     written; write zeroes, punch hole and extents forwarded per
//     component; Flush flushes only the components written since the last
//     one.
//
//   - Building GPT-partitioned composites ([CreateGPT]): a protective MBR
//     that follows UEFI for disks of 2 TiB and more, a backup header that
//     points at the backup entries, 4 KiB-aligned partitions with a zero
//     filler after unaligned read-only ones, duplicate labels refused.
//
// # Not supported
//
//   - Resize: the layout is fixed.
package composite

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"sync/atomic"

	"github.com/diskserve/diskserve"
)

// Name is the format's name.
const Name = "composite"

// Format is the composite format for the opener.
var Format = diskserve.Format{Name: Name, Magic: Magic, Open: open, Create: creator}

// A Disk is an open composite disk.
type Disk struct {
	c        diskserve.DiskFile // the spec file
	path     string
	spec     *Spec
	parts    []*part
	readOnly bool
}

type part struct {
	Component
	d     diskserve.DiskFile
	dirty atomic.Bool // written since the last flush
}

var (
	_ diskserve.DiskFile     = (*Disk)(nil)
	_ diskserve.Flusher      = (*Disk)(nil)
	_ diskserve.ZeroWriter   = (*Disk)(nil)
	_ diskserve.HolePuncher  = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.HostLocator  = (*Disk)(nil)
	_ diskserve.Describer    = (*Disk)(nil)
	_ diskserve.Checker      = (*Disk)(nil)
)

func open(c diskserve.DiskFile, oc *diskserve.OpenContext) (diskserve.DiskFile, error) {
	n := c.Size() - int64(len(Magic))
	if n > maxSpecLen {
		return nil, diskserve.Corrupt(Name, int64(len(Magic)), "spec of %d bytes, more than %d", n, maxSpecLen)
	}
	b := make([]byte, max(0, n))
	if err := diskserve.ReadFullAt(c, b, int64(len(Magic))); err != nil {
		return nil, diskserve.Corrupt(Name, int64(len(Magic)), "read spec: %v", err)
	}
	spec, err := ParseSpec(b)
	if err != nil {
		return nil, &diskserve.FormatError{Format: Name, Off: int64(len(Magic)), Msg: "bad spec", Err: err}
	}
	d := &Disk{c: c, path: oc.Path(), spec: spec, readOnly: true}
	for _, comp := range spec.Components {
		ro := oc.ReadOnly() || !comp.Writable
		cd, err := oc.OpenChild(comp.Path, "", ro)
		if err == nil && cd.Size() < comp.FileOffset+comp.Len {
			err = diskserve.Corrupt(Name, -1, "component %q is %d bytes, shorter than its range (%d bytes from file offset %d)", comp.Path, cd.Size(), comp.Len, comp.FileOffset)
			cd.Close()
		}
		if err != nil {
			d.closeParts()
			return nil, fmt.Errorf("component %q: %w", comp.Path, err)
		}
		comp.Writable = !ro
		d.readOnly = d.readOnly && ro
		d.parts = append(d.parts, &part{Component: comp, d: cd})
	}
	return d, nil
}

func (d *Disk) closeParts() error {
	var errs []error
	for _, p := range d.parts {
		errs = append(errs, p.d.Close())
	}
	return errors.Join(errs...)
}

// Size returns the composite's length.
func (d *Disk) Size() int64 { return d.spec.Length }

// ReadOnly reports whether no component can be written.
func (d *Disk) ReadOnly() bool { return d.readOnly }

// Close closes every component and the spec file.
func (d *Disk) Close() error { return errors.Join(d.closeParts(), d.c.Close()) }

// each calls fn for every piece of [off, off+n) with the component that
// holds it and the offset in that component's image.
func (d *Disk) each(off, n int64, fn func(p *part, at, n, done int64) error) error {
	i := sort.Search(len(d.parts), func(i int) bool { return d.parts[i].Offset+d.parts[i].Len > off })
	for done := int64(0); done < n; i++ {
		p := d.parts[i]
		in := off + done - p.Offset
		k := min(n-done, p.Len-in)
		if err := fn(p, p.FileOffset+in, k, done); err != nil {
			return err
		}
		done += k
	}
	return nil
}

// ReadAt reads across components.
func (d *Disk) ReadAt(b []byte, off int64) (int, error) {
	b, eof := diskserve.ClipRead(d.Size(), off, b)
	if len(b) == 0 {
		return 0, eof
	}
	read := 0
	err := d.each(off, int64(len(b)), func(p *part, at, n, done int64) error {
		got, err := p.d.ReadAt(b[done:done+n], at)
		read += got
		if int64(got) != n {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("component %q: %w", p.Path, err)
		}
		return nil
	})
	if err != nil {
		return read, err
	}
	return read, eof
}

// writable checks that every component under [off, off+n) can be written,
// so that a refused request changes nothing.
func (d *Disk) writable(op string, off, n int64) error {
	if err := diskserve.CheckWrite(d, off, n); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return d.each(off, n, func(p *part, _, _, _ int64) error {
		if !p.Writable {
			return fmt.Errorf("%s: component %q: %w", op, p.Path, diskserve.ErrReadOnly)
		}
		return nil
	})
}

// WriteAt writes across components, all of which must be writable.
func (d *Disk) WriteAt(b []byte, off int64) (int, error) {
	if err := d.writable("write", off, int64(len(b))); err != nil {
		return 0, err
	}
	written := 0
	err := d.each(off, int64(len(b)), func(p *part, at, n, done int64) error {
		p.dirty.Store(true)
		got, err := p.d.WriteAt(b[done:done+n], at)
		written += got
		if err != nil {
			return fmt.Errorf("component %q: %w", p.Path, err)
		}
		return nil
	})
	return written, err
}

// WriteZeroesAt forwards to each component. A fast zero that spans
// components is refused as unsupported: one component could refuse after
// another had zeroed its part, and a refused fast zero must change nothing.
func (d *Disk) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	if err := d.writable("write zeroes", off, n); err != nil {
		return err
	}
	if flags&diskserve.ZeroFast != 0 {
		if pieces := 0; d.each(off, n, func(*part, int64, int64, int64) error { pieces++; return nil }) == nil && pieces > 1 {
			return fmt.Errorf("fast zero across %d components: %w", pieces, diskserve.ErrUnsupported)
		}
	}
	return d.each(off, n, func(p *part, at, k, _ int64) error {
		p.dirty.Store(true)
		return diskserve.WriteZeroes(p.d, at, k, flags)
	})
}

// PunchHole forwards to each component.
func (d *Disk) PunchHole(off, n int64) error {
	if err := d.writable("punch hole", off, n); err != nil {
		return err
	}
	return d.each(off, n, func(p *part, at, k, _ int64) error {
		p.dirty.Store(true)
		return diskserve.PunchHole(p.d, at, k)
	})
}

// MapHost maps a range that lies in one component onto that component's
// host file, if the component can map it.
func (d *Disk) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	if diskserve.CheckRange(d.Size(), off, n) != nil {
		return diskserve.HostRange{}, false
	}
	i := sort.Search(len(d.parts), func(i int) bool { return d.parts[i].Offset+d.parts[i].Len > off })
	if i == len(d.parts) {
		return diskserve.HostRange{}, false
	}
	p := d.parts[i]
	in := off - p.Offset
	if n > p.Len-in || write && !p.Writable {
		return diskserve.HostRange{}, false
	}
	r, ok := diskserve.MapHost(p.d, p.FileOffset+in, n, write)
	if !ok {
		return diskserve.HostRange{}, false
	}
	if write {
		p.dirty.Store(true)
	}
	r.Whole = false
	return r, true
}

// LocateHost locates the run from off in the component that holds off.
func (d *Disk) LocateHost(off, n int64) (diskserve.HostLocation, error) {
	var loc diskserve.HostLocation
	err := d.each(off, 1, func(p *part, at, _, _ int64) error {
		var err error
		loc, err = diskserve.LocateHost(p.d, at, min(n, p.Offset+p.Len-off))
		return err
	})
	return loc, err
}

// AppendExtents takes each component's extents, moved to the composite's
// offsets.
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	var ext []diskserve.Extent
	err := d.each(off, n, func(p *part, at, k, done int64) error {
		var err error
		if ext, err = diskserve.Extents(p.d, ext[:0], at, k); err != nil {
			return fmt.Errorf("component %q: %w", p.Path, err)
		}
		for _, e := range ext {
			e.Off += off + done - at
			dst = diskserve.AppendExtent(dst, e)
		}
		return nil
	})
	return dst, err
}

// Flush flushes the components written since the last flush.
func (d *Disk) Flush() error {
	var errs []error
	for _, p := range d.parts {
		if !p.dirty.Swap(false) {
			continue
		}
		if err := diskserve.Flush(p.d); err != nil {
			p.dirty.Store(true)
			errs = append(errs, fmt.Errorf("component %q: %w", p.Path, err))
		}
	}
	return errors.Join(errs...)
}

// Describe reports the spec and describes each component.
func (d *Disk) Describe(info *diskserve.Info) {
	info.Format = Name
	info.Filename = d.path
	info.Specific = map[string]any{"version": d.spec.Version, "components": len(d.parts)}
	for _, p := range d.parts {
		ci := diskserve.Describe(p.d)
		ci.Specific = map[string]any{"offset": p.Offset, "length": p.Len, "file-offset": p.FileOffset, "writable": p.Writable}
		info.Children = append(info.Children, ci)
	}
}

// Check checks every component that has something to check; their
// findings are the composite's, prefixed with the component's name. That
// the components exist and are long enough was checked at open.
func (d *Disk) Check(repair diskserve.Repair) (diskserve.CheckReport, error) {
	var r diskserve.CheckReport
	for _, p := range d.parts {
		level := repair
		if !p.Writable {
			level = diskserve.RepairNone
		}
		cr, err := diskserve.Check(p.d, level)
		if errors.Is(err, diskserve.ErrUnsupported) {
			continue // a raw component: nothing to check
		}
		if err != nil {
			return r, fmt.Errorf("component %q: %w", p.Path, err)
		}
		r.Corruptions += cr.Corruptions
		r.Leaks += cr.Leaks
		r.CorruptionsFixed += cr.CorruptionsFixed
		r.LeaksFixed += cr.LeaksFixed
		for _, m := range cr.Messages {
			r.Messages = append(r.Messages, p.Path+": "+m)
		}
	}
	r.ImageEndOffset = d.c.Size()
	return r, nil
}
