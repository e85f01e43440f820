// Package vmdk reads and writes VMware virtual disks (VMDK), as VMware's
// Virtual Disk Format 5.0 specification describes them and qemu-img makes
// them.
//
// # Layout
//
// A disk is a descriptor (text: the create type, content IDs, the
// extents, the disk database) and one or more extents, each a range of
// the disk kept in a file: FLAT extents hold the bytes as they are, from
// a given sector of their file; SPARSE extents start with a header
// ("KDMV") and map grains (64 KiB by default) through a grain directory
// and grain tables of 512 entries; ZERO extents read as zeroes. A
// monolithicSparse disk is one sparse file with the descriptor inside it;
// monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat and vmfs disks
// are a descriptor file beside their extent files. A streamOptimized disk
// is one sparse file whose grains are deflate-compressed, each after a
// marker; its grain directory may be in a footer.
//
// ESX keeps snapshots (redo logs) in sparse extents of its own: vmfsSparse
// disks have VMFSSPARSE extents, with a "COWD" header and grain tables of
// 4096 entries; seSparse disks (VMFS 6) have SESPARSE extents, with 64-bit
// entries, 4 KiB grains and a journal.
//
// A delta disk names its parent in the descriptor (parentFileNameHint);
// grains it does not hold read from the parent.
//
// # Supported
//
//   - Reading every create type above, and delta disks. A lone COWD
//     extent, without its descriptor, opens as a disk of its own (qemu
//     probes it as VMDK, then fails to open it).
//   - Writing monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
//     twoGbMaxExtentFlat and vmfs disks in place; streamOptimized disks
//     are read-only (they are written whole by convert).
//   - Creating and converting to each of those (-o subformat=...), with
//     qemu-img's adapter_type, hwversion, compat6, toolsversion and
//     zeroed_grain options; delta disks of monolithicSparse and
//     twoGbMaxExtentSparse (-b).
//   - Extents open through the opener's nesting context, so --confine
//     applies to them: a descriptor cannot make diskserve read files
//     outside the confinement directory.
//
// # Not supported
//
//   - Writing a grain whose grain table is not allocated (neither
//     qemu-img nor VMware makes such extents).
//   - Writing COWD extents (qemu writes them without keeping the free
//     sector ESX allocates from) and SESPARSE extents (as in qemu).
//   - SESPARSE extents whose journal needs replaying (refused at open).
//
// # Concurrency
//
// Every method may be called concurrently, as the extents allow: sparse
// extents as [blockmap.Disk].
package vmdk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"strings"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/window"
)

// Name is the format's name, as qemu-img calls it.
const Name = "vmdk"

// Format is the VMDK format for the opener: a hosted or ESX (COWD) sparse
// extent by its magic, a descriptor file by its first line, as qemu
// probes them.
var Format = diskserve.Format{
	Name: Name,
	Match: func(head []byte) bool {
		return len(head) >= 4 && (string(head[:4]) == sparseMagic || string(head[:4]) == cowdMagic) || isDescriptor(head)
	},
	Open:   open,
	Create: creator,
}

func corrupt(off int64, msg string, args ...any) error {
	return diskserve.Corrupt(Name, off, msg, args...)
}

func unsupported(msg string, args ...any) error {
	return diskserve.Unsupported(Name, -1, msg, args...)
}

// An extent is one range of the disk.
type extent struct {
	start, n int64              // virtual bytes
	d        diskserve.DiskFile // the extent's content, n bytes
	line     extentLine
	sparse   *sparse // for sparse extents
}

// Disk is an open VMDK disk.
type Disk struct {
	path     string
	desc     *descriptor
	extents  []extent
	size     int64
	parent   diskserve.DiskFile // nil without one
	stale    error              // the parent's CID is not the recorded one: reads from it fail so
	readOnly bool
	cids     *cidKeeper         // nil read-only
	descFile diskserve.DiskFile // a descriptor file kept open for cids, or nil
}

var (
	_ diskserve.DiskFile     = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.DepthMapper  = (*Disk)(nil)
	_ diskserve.HostLocator  = (*Disk)(nil)
	_ diskserve.HostMapper   = (*Disk)(nil)
	_ diskserve.ZeroWriter   = (*Disk)(nil)
	_ diskserve.HolePuncher  = (*Disk)(nil)
	_ diskserve.Flusher      = (*Disk)(nil)
	_ diskserve.Describer    = (*Disk)(nil)
	_ diskserve.Checker      = (*Disk)(nil)
)

func open(c diskserve.DiskFile, oc *diskserve.OpenContext) (diskserve.DiskFile, error) {
	head := make([]byte, min(c.Size(), headerLen))
	if err := diskserve.ReadFullAt(c, head, 0); err != nil {
		return nil, corrupt(0, "read header: %v", err)
	}
	d := &Disk{path: oc.Path(), readOnly: oc.ReadOnly()}
	var err error
	switch {
	case len(head) >= 4 && string(head[:4]) == sparseMagic:
		err = d.openMonolithic(c, oc)
	case len(head) >= 4 && string(head[:4]) == cowdMagic:
		// A lone ESX sparse extent, without its descriptor.
		d.desc = &descriptor{CreateType: "vmfsSparse", ParentCID: 0xffffffff, DDB: map[string]string{}}
		err = d.openLoneExtent(c, oc)
	default:
		err = d.openDescribed(c, oc)
	}
	if err != nil {
		d.closeParts()
		return nil, err
	}
	return d, nil
}

// openMonolithic opens a disk that is one sparse file: c itself, with the
// descriptor inside it (a monolithicSparse or streamOptimized disk).
func (d *Disk) openMonolithic(c diskserve.DiskFile, oc *diskserve.OpenContext) error {
	hb := make([]byte, headerLen)
	if err := diskserve.ReadFullAt(c, hb, 0); err != nil {
		return corrupt(0, "read header: %v", err)
	}
	h, err := parseSparseHeader(hb)
	if err != nil {
		return err
	}
	d.desc = &descriptor{CreateType: "monolithicSparse", ParentCID: 0xffffffff, DDB: map[string]string{}}
	text, err := embeddedText(c, h)
	if err != nil {
		return err
	}
	if text != nil {
		if d.desc, err = parseDescriptor(string(text)); err != nil {
			return corrupt(int64(h.DescOffset)*sectorSize, "embedded %v", err)
		}
		if !oc.ReadOnly() {
			d.cids = &cidKeeper{f: c, at: int64(h.DescOffset) * sectorSize, room: int64(h.DescSize) * sectorSize, text: string(text)}
		}
	}
	if err := d.openParent(oc); err != nil {
		return err
	}
	return d.openLoneExtent(c, oc)
}

// embeddedText reads the descriptor that a sparse extent with header h
// embeds in r, up to its first NUL, or returns nil if it embeds none.
func embeddedText(r io.ReaderAt, h sparseHeader) ([]byte, error) {
	if h.DescOffset == 0 || h.DescSize == 0 {
		return nil, nil
	}
	if h.DescSize*sectorSize > maxDescriptor || h.DescOffset > 1<<40 {
		return nil, corrupt(28, "embedded descriptor of %d sectors at sector %d", h.DescSize, h.DescOffset)
	}
	text := make([]byte, h.DescSize*sectorSize)
	if err := diskserve.ReadFullAt(r, text, int64(h.DescOffset)*sectorSize); err != nil {
		return nil, corrupt(int64(h.DescOffset)*sectorSize, "read embedded descriptor: %v", err)
	}
	text, _, _ = bytes.Cut(text, []byte{0})
	return text, nil
}

// openLoneExtent opens c as the disk's one sparse extent, over the
// parent if d has one.
func (d *Disk) openLoneExtent(c diskserve.DiskFile, oc *diskserve.OpenContext) error {
	h, err := readSparseHeader(c, false)
	if err != nil {
		return err
	}
	s, err := openSparse(c, oc.Path(), oc.ReadOnly(), d.below(0, int64(h.Capacity)*sectorSize), false)
	if err != nil {
		return err
	}
	// No descriptor line gives the extent a type: info shows none, as
	// qemu-img's does.
	line := extentLine{Access: "RW", Sectors: int64(s.h.Capacity), File: filepath.Base(oc.Path())}
	d.extents = []extent{{start: 0, n: s.Size(), d: s, line: line, sparse: s}}
	d.size = s.Size()
	return nil
}

// openDescribed opens a disk whose descriptor is the file c: each extent
// file through the opener, relative to the descriptor.
func (d *Disk) openDescribed(c diskserve.DiskFile, oc *diskserve.OpenContext) error {
	if c.Size() > maxDescriptor {
		return corrupt(0, "a descriptor file of %d bytes (at most %d)", c.Size(), maxDescriptor)
	}
	text := make([]byte, c.Size())
	if err := diskserve.ReadFullAt(c, text, 0); err != nil {
		return corrupt(0, "read descriptor: %v", err)
	}
	var err error
	if d.desc, err = parseDescriptor(string(text)); err != nil {
		return corrupt(0, "%v", err)
	}
	if err := d.openParent(oc); err != nil {
		return err
	}
	for _, line := range d.desc.Extents {
		n := line.Sectors * sectorSize
		if d.size+n > 1<<50 {
			return unsupported("the extents add up to more than diskserve supports")
		}
		e, err := d.openExtent(line, d.size, n, oc)
		if err != nil {
			return err
		}
		d.extents = append(d.extents, e)
		d.size += n
	}
	if oc.ReadOnly() {
		// The descriptor file is not an extent: the disk no longer needs it.
		c.Close()
		return nil
	}
	d.descFile = c
	d.cids = &cidKeeper{f: c, text: string(text)}
	return nil
}

// openExtent opens one extent of a descriptor at virtual offset start.
func (d *Disk) openExtent(line extentLine, start, n int64, oc *diskserve.OpenContext) (extent, error) {
	e := extent{start: start, n: n, line: line}
	readOnly := oc.ReadOnly() || line.Access != "RW"
	switch line.Type {
	case "ZERO":
		e.d = zeroDisk(n)
		return e, nil
	case "FLAT", "VMFS", "VMFSRAW", "VMFSRDM":
	case "SPARSE", "VMFSSPARSE", "SESPARSE":
	default:
		return e, unsupported("%s extents are not supported", line.Type)
	}
	if line.Access == "NOACCESS" {
		return e, unsupported("NOACCESS extents are not supported")
	}
	f, err := oc.OpenChild(line.File, "raw", readOnly)
	if err != nil {
		return e, fmt.Errorf("extent %q: %w", line.File, err)
	}
	if line.Type == "SPARSE" || line.Type == "VMFSSPARSE" || line.Type == "SESPARSE" {
		s, err := openSparse(f, line.File, readOnly, d.below(start, n), line.Type == "SESPARSE")
		if err != nil {
			f.Close()
			return e, err
		}
		if s.Size() < n {
			s.Close()
			return e, corrupt(-1, "extent %q holds %d bytes, the descriptor says %d", line.File, s.Size(), n)
		}
		e.d, e.sparse = s, s
		return e, nil
	}
	if f.Size() < line.Offset*sectorSize+n {
		f.Close()
		return e, corrupt(-1, "flat extent %q holds %d bytes, the descriptor needs %d from sector %d", line.File, f.Size(), n, line.Offset)
	}
	e.d = window.New(f, line.Offset*sectorSize, n, true).Allocated()
	return e, nil
}

// openParent opens the parent of a delta disk.
func (d *Disk) openParent(oc *diskserve.OpenContext) error {
	if d.desc.ParentCID == 0xffffffff || d.desc.ParentHint == "" {
		return nil
	}
	p, err := oc.OpenChild(d.desc.ParentHint, Name, true)
	if err != nil {
		return fmt.Errorf("parent: %w", err)
	}
	d.parent = p
	if cid, ok := diskserve.Describe(p).Specific["cid"].(uint32); ok && cid != d.desc.ParentCID {
		d.stale = fmt.Errorf("vmdk: the parent %s has changed since %s was made on it (its CID is %08x, the delta disk's parentCID %08x): its data is not read", d.desc.ParentHint, d.path, cid, d.desc.ParentCID)
	}
	return nil
}

// below returns the part of the parent under [start, start+n), or nil.
func (d *Disk) below(start, n int64) diskserve.DiskFile {
	if d.parent == nil || start >= d.parent.Size() {
		return nil
	}
	w := window.New(d.parent, start, min(n, d.parent.Size()-start), false)
	if d.stale != nil {
		return staleParent{w, d.stale}
	}
	return w
}

// closeParts closes what an open that failed had opened.
func (d *Disk) closeParts() {
	for _, e := range d.extents {
		e.d.Close()
	}
	if d.parent != nil {
		d.parent.Close()
	}
	if d.descFile != nil {
		d.descFile.Close()
	}
}

// Size returns the virtual size: the extents' sum.
func (d *Disk) Size() int64 { return d.size }

// ReadOnly reports whether writes are refused.
func (d *Disk) ReadOnly() bool { return d.readOnly }

// at returns the index of the extent that holds offset off.
func (d *Disk) at(off int64) int {
	return sort.Search(len(d.extents), func(i int) bool { return d.extents[i].start+d.extents[i].n > off })
}

// each calls fn for the pieces of [off, off+n) in each extent, in order.
func (d *Disk) each(off, n int64, fn func(e *extent, in, m, done int64) error) error {
	done := int64(0)
	for i := d.at(off); done < n && i < len(d.extents); i++ {
		e := &d.extents[i]
		in := off + done - e.start
		m := min(n-done, e.n-in)
		if err := fn(e, in, m, done); err != nil {
			return err
		}
		done += m
	}
	return nil
}

// ReadAt reads across the extents.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(d.size, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	err := d.each(off, int64(len(p)), func(e *extent, in, m, done int64) error {
		return diskserve.ReadFullAt(e.d, p[done:done+m], in)
	})
	if err != nil {
		return 0, err
	}
	return len(p), eof
}

// WriteAt writes across the extents.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := diskserve.CheckWrite(d, off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := d.cids.renew(d.desc); err != nil {
		return 0, err
	}
	written := 0
	err := d.each(off, int64(len(p)), func(e *extent, in, m, done int64) error {
		k, err := e.d.WriteAt(p[done:done+m], in)
		written += k
		return err
	})
	return written, err
}

// WriteZeroesAt zeroes across the extents.
func (d *Disk) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	if err := diskserve.CheckWrite(d, off, n); err != nil {
		return err
	}
	if err := d.cids.renew(d.desc); err != nil {
		return err
	}
	return d.each(off, n, func(e *extent, in, m, _ int64) error {
		return diskserve.WriteZeroes(e.d, in, m, flags)
	})
}

// PunchHole punches across the extents.
func (d *Disk) PunchHole(off, n int64) error {
	if err := diskserve.CheckWrite(d, off, n); err != nil {
		return err
	}
	if err := d.cids.renew(d.desc); err != nil {
		return err
	}
	return d.each(off, n, func(e *extent, in, m, _ int64) error {
		return diskserve.PunchHole(e.d, in, m)
	})
}

// AppendExtents reports each extent's allocation.
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	return d.perExtent(dst, off, n, diskserve.Extents)
}

// AppendDepths reports each extent's allocation depths: a sparse extent
// of a delta disk leaves its unallocated grains to the parent.
func (d *Disk) AppendDepths(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	return d.perExtent(dst, off, n, diskserve.AllocationDepths)
}

// perExtent appends what get reports of each extent's part of [off,
// off+n), moved to the disk's offsets.
func (d *Disk) perExtent(dst []diskserve.Extent, off, n int64, get func(diskserve.DiskFile, []diskserve.Extent, int64, int64) ([]diskserve.Extent, error)) ([]diskserve.Extent, error) {
	err := d.each(off, n, func(e *extent, in, m, _ int64) error {
		ext, err := get(e.d, nil, in, m)
		for _, x := range ext {
			x.Off += e.start
			dst = diskserve.AppendExtent(dst, x)
		}
		return err
	})
	return dst, err
}

// LocateHost locates the run from off in the extent that holds off.
func (d *Disk) LocateHost(off, n int64) (diskserve.HostLocation, error) {
	e := &d.extents[d.at(off)]
	in := off - e.start
	return diskserve.LocateHost(e.d, in, min(n, e.n-in))
}

// MapHost maps a read that lies inside one extent onto that extent's
// mapping: a flat extent's file, or a sparse extent's stored grains.
// Writes are not mapped: the first write of a session renews the CID.
func (d *Disk) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	if write {
		return diskserve.HostRange{}, false
	}
	e := &d.extents[d.at(off)]
	in := off - e.start
	if in+n > e.n {
		return diskserve.HostRange{}, false
	}
	r, ok := diskserve.MapHost(e.d, in, n, false)
	r.Whole = false // the descriptor and other extents are the disk too
	return r, ok
}

// Flush flushes every extent.
func (d *Disk) Flush() error {
	if d.readOnly {
		return nil
	}
	var err error
	for _, e := range d.extents {
		err = errors.Join(err, diskserve.Flush(e.d))
	}
	return err
}

// Close closes the extents, the parent and a descriptor file kept open.
func (d *Disk) Close() error {
	var err error
	for _, e := range d.extents {
		err = errors.Join(err, e.d.Close())
	}
	if d.parent != nil {
		err = errors.Join(err, d.parent.Close())
	}
	if d.descFile != nil {
		err = errors.Join(err, d.descFile.Close())
	}
	return err
}

// Describe reports what qemu-img info reports of a VMDK: the create type,
// content IDs and extents, and the first sparse extent's grain size as
// the cluster size.
func (d *Disk) Describe(info *diskserve.Info) {
	info.Format = Name
	info.Filename = d.path
	if d.parent != nil {
		info.BackingFile = d.desc.ParentHint
		pi := diskserve.Describe(d.parent)
		info.Backing = &pi
	}
	var exts []map[string]any
	for _, e := range d.extents {
		x := map[string]any{"virtual-size": e.n, "format": strings.ToUpper(e.line.Type)}
		if e.line.File != "" {
			// As qemu names it: beside the descriptor, as opened.
			name := e.line.File
			if !filepath.IsAbs(name) {
				name = filepath.Join(filepath.Dir(d.path), name)
			}
			x["filename"] = name
			info.Files = append(info.Files, name)
		}
		if e.sparse != nil {
			gs := int64(e.sparse.h.GrainSize) * sectorSize
			x["cluster-size"] = gs
			if e.sparse.h.Flags&flagCompressed != 0 {
				x["compressed"] = true // qemu-img shows the key only then
			}
			if info.ClusterSize == 0 {
				info.ClusterSize = gs
			}
		}
		exts = append(exts, x)
	}
	info.Specific = map[string]any{
		"create-type": d.desc.CreateType,
		"cid":         d.cids.cid(d.desc),
		"parent-cid":  d.desc.ParentCID,
		"extents":     exts,
	}
	if a, ok := d.desc.DDB["adapterType"]; ok {
		info.Specific["adapter-type"] = a
	}
}

// Check checks each sparse extent's grain tables.
func (d *Disk) Check(diskserve.Repair) (diskserve.CheckReport, error) {
	var r diskserve.CheckReport
	for _, e := range d.extents {
		if e.sparse != nil {
			err := e.sparse.Exclusive(func() error {
				e.sparse.check(&r)
				return nil
			})
			if err != nil {
				return r, err
			}
		}
	}
	return r, nil
}

// zeroDisk is a ZERO extent: n bytes that read as zeroes and take no
// writes.
type zeroDisk int64

func (z zeroDisk) Size() int64    { return int64(z) }
func (z zeroDisk) ReadOnly() bool { return true }
func (z zeroDisk) Close() error   { return nil }

func (z zeroDisk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(int64(z), off, p)
	clear(p)
	if len(p) == 0 {
		return 0, eof
	}
	return len(p), eof
}

func (z zeroDisk) WriteAt([]byte, int64) (int, error) {
	return 0, fmt.Errorf("a ZERO extent: %w", diskserve.ErrReadOnly)
}

func (z zeroDisk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	return diskserve.AppendExtent(dst, diskserve.Extent{Off: off, Len: n, Flags: diskserve.ExtentHole | diskserve.ExtentZero}), nil
}

var _ diskserve.ExtentMapper = zeroDisk(0)
