package vhd

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"unicode/utf16"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/internal/blockmap"
)

// Differencing disks.
//
// A differencing disk is a dynamic disk over a parent: its header names
// the parent (UUID, modification time, Unicode name) and holds up to
// eight parent locators, each a platform code and where in the file the
// locator's data is. A block the child stores has a sector bitmap whose
// bits, most significant first, say which of its sectors the child holds;
// the others read from the parent. Blocks the child does not store read
// from the parent whole.

const (
	offParentUUID = 40
	offParentTime = 56
	offParentName = 64
	parentNameLen = 512
	offLocators   = 576
	locatorLen    = 24
	maxLocator    = 64 << 10 // bytes of locator data diskserve reads
)

// parentNames returns the names the header gives the parent, the most
// useful first: the relative Windows path (W2ru), the absolute one
// (W2ku), a file URL (MacX), then the bare Unicode name.
func parentNames(c diskserve.DiskFile, hb []byte, at int64) ([]string, error) {
	var rel, abs, mac []string
	for k := range 8 {
		e := hb[offLocators+k*locatorLen:]
		code := string(e[:4])
		length := int64(be.Uint32(e[8:]))
		off := int64(be.Uint64(e[16:]))
		if code == "\x00\x00\x00\x00" || length == 0 {
			continue
		}
		if length > maxLocator || off < 0 || off > c.Size()-length {
			return nil, corrupt(at+offLocators+int64(k)*locatorLen, "parent locator %d (%d bytes at %d) is not inside the file", k, length, off)
		}
		b := make([]byte, length)
		if err := diskserve.ReadFullAt(c, b, off); err != nil {
			return nil, corrupt(off, "read parent locator %d: %v", k, err)
		}
		switch code {
		case "W2ru":
			rel = append(rel, windowsPath(utf16String(b, false)))
		case "W2ku":
			abs = append(abs, windowsPath(utf16String(b, false)))
		case "MacX":
			mac = append(mac, strings.TrimPrefix(strings.TrimRight(string(b), "\x00"), "file://"))
		}
	}
	names := append(append(rel, abs...), mac...)
	if n := utf16String(hb[offParentName:offParentName+parentNameLen], true); n != "" {
		names = append(names, n)
	}
	return names, nil
}

// utf16String decodes UTF-16 (big- or little-endian) up to a NUL.
func utf16String(b []byte, bigEndian bool) string {
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := uint16(b[i]) | uint16(b[i+1])<<8
		if bigEndian {
			c = uint16(b[i])<<8 | uint16(b[i+1])
		}
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

// windowsPath turns a Windows path into one for this system: backslashes
// become slashes, and a leading ".\" goes.
func windowsPath(p string) string {
	return strings.TrimPrefix(strings.ReplaceAll(p, `\`, "/"), "./")
}

// openParent opens the parent a differencing disk's header names, trying
// its names in turn, and checks that it is the disk the child was made
// from (its UUID).
func openParent(c diskserve.DiskFile, oc *diskserve.OpenContext, hb []byte, at int64) (diskserve.DiskFile, error) {
	names, err := parentNames(c, hb, at)
	if err != nil {
		return nil, err
	}
	if len(names) == 0 {
		return nil, corrupt(at+offLocators, "a differencing disk that names no parent")
	}
	var want [16]byte
	copy(want[:], hb[offParentUUID:])
	var missing []string
	for _, name := range names {
		if strings.HasPrefix(name, "C:") || strings.Contains(name, ":/") && !strings.HasPrefix(name, "/") {
			continue // a Windows drive path names nothing here
		}
		p, err := oc.OpenChild(name, Name, true)
		if errors.Is(err, fs.ErrNotExist) {
			missing = append(missing, name)
			continue
		}
		if err != nil {
			// Only a missing file sends the search on: trying every
			// name of every parent after any failure would make the
			// opens of a chain grow exponentially with its depth.
			return nil, fmt.Errorf("parent %s: %w", name, err)
		}
		if got := footerUUID(p); got != want {
			p.Close()
			return nil, corrupt(at+offParentUUID, "parent %s has UUID %x, the child was made from %x: the parent was replaced or changed", name, got, want)
		}
		return p, nil
	}
	return nil, fmt.Errorf("no parent found at %s", strings.Join(missing, " or "))
}

// footerUUID returns the UUID of an open VHD.
func footerUUID(d diskserve.DiskFile) [16]byte {
	switch v := d.(type) {
	case *Disk:
		return v.foot.UUID
	case *Fixed:
		return v.foot.UUID
	}
	return [16]byte{}
}

// ReadSpecial reads a block of a differencing disk that the child stores
// with a sector bitmap: its sectors from the block where their bits are
// set, from the parent elsewhere.
func (t *table) ReadSpecial(i int64, b blockmap.Block, p []byte, off int64, below io.ReaderAt) error {
	c := (*Disk)(t).File()
	first, last := off/sectorSize, (off+int64(len(p))-1)/sectorSize
	bm := make([]byte, last/8-first/8+1)
	if err := diskserve.ReadFullAt(c, bm, b.Host-t.bitmap+first/8); err != nil {
		return corrupt(b.Host-t.bitmap, "read the sector bitmap of block %d: %v", i, err)
	}
	present := func(s int64) bool { return bm[s/8-first/8]&(0x80>>(s%8)) != 0 }
	for pos := off; pos < off+int64(len(p)); {
		s := pos / sectorSize
		end := min(off+int64(len(p)), (s+1)*sectorSize)
		for end < off+int64(len(p)) && present(end/sectorSize) == present(s) {
			end = min(off+int64(len(p)), end+sectorSize)
		}
		part := p[pos-off : end-off]
		var err error
		if present(s) {
			err = diskserve.ReadFullAt(c, part, b.Host+pos)
		} else {
			_, err = below.ReadAt(part, pos)
		}
		if err != nil {
			return err
		}
		pos = end
	}
	return nil
}

// readParentFooter reads the footer of the VHD at path, for a new child.
func readParentFooter(path string) (footer, error) {
	f, err := os.Open(path)
	if err != nil {
		return footer{}, err
	}
	defer f.Close()
	b := make([]byte, footerLen)
	if _, err := f.ReadAt(b, 0); err != nil && err != io.EOF {
		return footer{}, err
	}
	if string(b[:8]) != cookie {
		st, err := f.Stat()
		if err != nil {
			return footer{}, err
		}
		if _, err := f.ReadAt(b, st.Size()-footerLen); err != nil {
			return footer{}, fmt.Errorf("%s: not a VHD: %w", path, err)
		}
	}
	foot, err := parseFooter(b, 0)
	if err != nil {
		return footer{}, fmt.Errorf("%s: %w", path, err)
	}
	return foot, nil
}

// A locator is one parent locator of a new child.
type locator struct {
	code string
	data []byte
}

// newLocators returns the parent locators of a new child at childPath
// whose parent the user named name (relative to the child, or absolute):
// W2ru with the relative path where there is one and W2ku with the
// absolute one, UTF-16LE with backslashes, as Hyper-V writes them.
func newLocators(childPath, name string) []locator {
	enc := func(s string) []byte {
		u := utf16.Encode([]rune(strings.ReplaceAll(s, "/", `\`)))
		b := make([]byte, 2*len(u))
		for i, c := range u {
			b[2*i], b[2*i+1] = byte(c), byte(c>>8)
		}
		return b
	}
	var ls []locator
	absPath := name
	if !filepath.IsAbs(name) {
		ls = append(ls, locator{"W2ru", enc(`.\` + name)})
		absPath = filepath.Join(filepath.Dir(childPath), name)
	}
	if a, err := filepath.Abs(absPath); err == nil {
		absPath = a
	}
	return append(ls, locator{"W2ku", enc(absPath)})
}
