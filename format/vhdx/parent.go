package vhdx

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"strings"
	"unicode/utf16"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/internal/blockmap"
)

// Differencing disks.
//
// A differencing disk has the HasParent file parameter and a parent
// locator metadata item: a locator type (VHDX's) and key-value pairs in
// UTF-16LE. parent_linkage (and parent_linkage2, if present) name the
// parent's DataWriteGuid in braces; relative_path, volume_path and
// absolute_win32_path say where the parent is, tried in that order.
//
// Its payload blocks are not present (read from the parent), fully
// present, zero, or partially present: then the sector bitmap block of
// the block's chunk (the BAT entry after the chunk's payload entries)
// has a bit per logical sector, least significant first, set where the
// sector is in this file; clear sectors read from the parent.

var locatorVHDX = parseGUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

const (
	locatorHeaderLen = 20
	locatorEntryLen  = 12
	flagHasParent    = 2 // in the file parameters' flags
	sbStatePresent   = 6 // a sector bitmap block's BAT state when stored
	sbBlockSize      = mib
)

// parseLocator decodes a parent locator item into its key-value pairs.
func parseLocator(b []byte) (map[string]string, error) {
	if len(b) < locatorHeaderLen {
		return nil, fmt.Errorf("the parent locator is %d bytes, shorter than its header", len(b))
	}
	if guid(b[:16]) != locatorVHDX {
		return nil, fmt.Errorf("the parent locator's type %x is not VHDX's", b[:16])
	}
	n := int(le.Uint16(b[18:]))
	if locatorHeaderLen+n*locatorEntryLen > len(b) {
		return nil, fmt.Errorf("the parent locator's %d entries do not fit in its %d bytes", n, len(b))
	}
	str := func(off uint32, n uint16) (string, bool) {
		if off < locatorHeaderLen || n == 0 || n%2 != 0 || int64(off)+int64(n) > int64(len(b)) {
			return "", false
		}
		u := make([]uint16, n/2)
		for i := range u {
			u[i] = le.Uint16(b[int(off)+2*i:])
		}
		return string(utf16.Decode(u)), true
	}
	kv := make(map[string]string, n)
	for k := range n {
		e := b[locatorHeaderLen+k*locatorEntryLen:]
		key, ok1 := str(le.Uint32(e), le.Uint16(e[8:]))
		value, ok2 := str(le.Uint32(e[4:]), le.Uint16(e[10:]))
		if !ok1 || !ok2 {
			return nil, fmt.Errorf("parent locator entry %d lies outside the locator", k)
		}
		if _, dup := kv[key]; dup {
			return nil, fmt.Errorf("parent locator key %q appears twice", key)
		}
		kv[key] = value
	}
	if kv["parent_linkage"] == "" {
		return nil, fmt.Errorf("the parent locator has no parent_linkage")
	}
	return kv, nil
}

// encodeLocator encodes key-value pairs as a VHDX parent locator item.
func encodeLocator(keys, values []string) []byte {
	b := make([]byte, locatorHeaderLen+len(keys)*locatorEntryLen)
	copy(b, locatorVHDX[:])
	le.PutUint16(b[18:], uint16(len(keys)))
	for k := range keys {
		kb, vb := utf16le(keys[k]), utf16le(values[k])
		at := locatorHeaderLen + k*locatorEntryLen
		le.PutUint32(b[at:], uint32(len(b)))
		le.PutUint32(b[at+4:], uint32(len(b)+len(kb)))
		le.PutUint16(b[at+8:], uint16(len(kb)))
		le.PutUint16(b[at+10:], uint16(len(vb)))
		b = append(append(b, kb...), vb...)
	}
	return b
}

// String returns the GUID as the parent locator writes it: lowercase, in
// braces.
func (g guid) String() string {
	return fmt.Sprintf("{%02x%02x%02x%02x-%02x%02x-%02x%02x-%x-%x}",
		g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8:10], g[10:])
}

// parentPaths returns the paths the locator gives the parent, in the
// order the specification tries them, as paths of this system: relative
// ones with slashes, and an absolute path only where it is one here (a
// Windows drive, share or volume path names nothing on this system).
func parentPaths(kv map[string]string) []string {
	var paths []string
	if p := kv["relative_path"]; p != "" {
		paths = append(paths, strings.TrimPrefix(strings.ReplaceAll(p, `\`, "/"), "./"))
	}
	if p := strings.TrimPrefix(kv["absolute_win32_path"], `\\?\`); strings.HasPrefix(p, `\`) && !strings.HasPrefix(p, `\\`) {
		paths = append(paths, strings.ReplaceAll(p, `\`, "/"))
	}
	return paths
}

// openParent opens the parent the locator names, trying its paths in
// turn, and checks that it is the disk the child was made over: its
// DataWriteGuid is a linkage of the locator, and its sector sizes are
// the child's.
func (d *Disk) openParent(oc *diskserve.OpenContext) error {
	paths := parentPaths(d.locator)
	if len(paths) == 0 {
		return corrupt(-1, "the parent locator gives no path this system can open (%q)", d.locator)
	}
	var missing []string
	for _, name := range paths {
		p, err := oc.OpenChild(name, Name, true)
		if errors.Is(err, fs.ErrNotExist) {
			missing = append(missing, name)
			continue
		}
		if err != nil {
			// Only a missing file sends the search on: trying every
			// path of every parent after any failure would make the
			// opens of a chain grow exponentially with its depth.
			return fmt.Errorf("parent %s: %w", name, err)
		}
		pd, ok := p.(*Disk)
		switch {
		case !ok:
			err = fmt.Errorf("parent %s is not a VHDX disk", name)
		case pd.hdr.DataWriteGUID.String() != strings.ToLower(d.locator["parent_linkage"]) &&
			pd.hdr.DataWriteGUID.String() != strings.ToLower(d.locator["parent_linkage2"]):
			err = corrupt(-1, "parent %s has data write GUID %v, the child was made over %s: the parent was changed or replaced", name, pd.hdr.DataWriteGUID, d.locator["parent_linkage"])
		case pd.logical != d.logical:
			err = corrupt(-1, "parent %s has %d-byte logical sectors, the child %d", name, pd.logical, d.logical)
		}
		if err != nil {
			p.Close()
			return err
		}
		d.parent, d.parentName = p, name
		return nil
	}
	return fmt.Errorf("no parent found at %s", strings.Join(missing, " or "))
}

// sbIndex returns the BAT index of the sector bitmap block of the chunk
// holding payload block i.
func (d *Disk) sbIndex(i int64) int64 { return (i/d.chunkRatio)*(d.chunkRatio+1) + d.chunkRatio }

// ReadSpecial reads a partially present block: its sectors from the block
// where their bits are set, from the parent elsewhere.
func (t *table) ReadSpecial(i int64, b blockmap.Block, p []byte, off int64, below io.ReaderAt) error {
	d := (*Disk)(t)
	ss := int64(d.logical)
	sb := int64(d.bat[d.sbIndex(i)]>>batOffsetShift) * mib
	base := (i % d.chunkRatio) * (d.blockSize / ss) // the block's first bit in its chunk's bitmap
	first, last := off/ss, (off+int64(len(p))-1)/ss
	bm := make([]byte, (base+last)/8-(base+first)/8+1)
	bmOff := sb + (base+first)/8
	if err := diskserve.ReadFullAt(d.File(), bm, bmOff); err != nil {
		return corrupt(bmOff, "read the sector bitmap of block %d: %v", i, err)
	}
	present := func(s int64) bool {
		bit := base + s - (base+first)/8*8
		return bm[bit/8]&(1<<(bit%8)) != 0
	}
	end := off + int64(len(p))
	for pos := off; pos < end; {
		s := pos / ss
		next := min(end, (s+1)*ss)
		for next < end && present(next/ss) == present(s) {
			next = min(end, next+ss)
		}
		part := p[pos-off : next-off]
		var err error
		if present(s) {
			err = diskserve.ReadFullAt(d.File(), part, b.Host+pos)
		} else {
			_, err = below.ReadAt(part, pos)
		}
		if err != nil {
			return err
		}
		pos = next
	}
	return nil
}

// markPresent sets every sector bitmap bit of block i, storing its
// chunk's sector bitmap block first if the chunk has none. The
// specification has readers ignore the bitmap of a fully present block,
// but libvhdi reads every block of a differencing disk through it: with
// the bits set, both read the block from this file. The caller holds
// blockmap's allocation lock, which guards d.free.
func (d *Disk) markPresent(i int64) error {
	c := d.File()
	k := d.sbIndex(i)
	if d.bat[k]&stateMask != sbStatePresent {
		host := d.free
		if err := diskserve.Resize(c, host+sbBlockSize); err != nil {
			return err
		}
		d.free += sbBlockSize
		e := uint64(host/mib)<<batOffsetShift | sbStatePresent
		var b [8]byte
		le.PutUint64(b[:], e)
		if _, err := c.WriteAt(b[:], d.batOff+k*8); err != nil {
			return err
		}
		d.bat[k] = e
	}
	n := d.blockSize / int64(d.logical) / 8
	bits := make([]byte, n)
	for j := range bits {
		bits[j] = 0xff
	}
	_, err := c.WriteAt(bits, int64(d.bat[k]>>batOffsetShift)*mib+(i%d.chunkRatio)*n)
	return err
}

// childLocator returns the parent locator of a new child at childPath
// over the parent the user named name (relative to the child, or
// absolute), whose data write GUID is linkage: the linkage, the parent's
// path relative to the child, and its absolute path as a path from the
// root of a Windows drive (Hyper-V writes this key without the "\\?\"
// prefix the specification asks for, and libvhdi finds parents by it).
func childLocator(childPath, name string, linkage guid) ([]byte, error) {
	parent := name
	if !filepath.IsAbs(parent) {
		parent = filepath.Join(filepath.Dir(childPath), parent)
	}
	absChild, err := filepath.Abs(filepath.Dir(childPath))
	if err != nil {
		return nil, err
	}
	absParent, err := filepath.Abs(parent)
	if err != nil {
		return nil, err
	}
	rel, err := filepath.Rel(absChild, absParent)
	if err != nil {
		return nil, err
	}
	return encodeLocator(
		[]string{"parent_linkage", "relative_path", "absolute_win32_path"},
		[]string{linkage.String(), strings.ReplaceAll(rel, "/", `\`), strings.ReplaceAll(absParent, "/", `\`)}), nil
}
