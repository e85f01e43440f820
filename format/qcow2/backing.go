package qcow2

import (
	"fmt"

	"github.com/diskserve/diskserve"
)

// SetBacking records name as the image's backing file, and fmtName as
// its format (none when fmtName is ""), or no backing file when name is
// "": the header change of `qemu-img rebase -u`, which rebase also ends
// with. The data is not touched. The image goes on reading through the
// backing file it was opened with until it is opened again.
func (d *Disk) SetBacking(name, fmtName string) error {
	if !d.writable() {
		return fmt.Errorf("set the backing file: %w", diskserve.ErrReadOnly)
	}
	if len(name) > maxBackingNameLen {
		return fmt.Errorf("set the backing file: a name of %d bytes is longer than %d", len(name), maxBackingNameLen)
	}
	d.lockAll()
	defer d.unlockAll()
	var first []extension
	if name != "" && fmtName != "" {
		first = append(first, extension{extBackingFormat, []byte(fmtName)})
	}
	if err := d.rewriteHeader(nil, func(typ uint32) bool { return typ != extBackingFormat }, first, name); err != nil {
		return fmt.Errorf("set the backing file: %w", err)
	}
	return nil
}

// An extension is a header extension to write.
type extension struct {
	typ  uint32
	data []byte
}

// rewriteHeader writes the first cluster anew, in one write, as qemu
// does: the header's fixed fields (fixed, or the current ones when nil;
// their length is the new header length), then the extensions first,
// then the current extensions that keep keeps, then the end marker and
// the backing file name (name). The new header must parse; d.h becomes
// it.
//
// Preconditions: lockAll is held; the image is writable.
func (d *Disk) rewriteHeader(fixed []byte, keep func(typ uint32) bool, first []extension, name string) error {
	old := make([]byte, min(d.cs, d.c.Size()))
	if err := diskserve.ReadFullAt(d.c, old, 0); err != nil {
		return fmt.Errorf("read header: %w", err)
	}
	if fixed == nil {
		fixed = old[:d.h.HeaderLength]
	}
	out := make([]byte, d.cs)
	pos := int64(len(fixed))
	copy(out, fixed)
	put := func(typ uint32, data []byte) error {
		if pos+8+int64(len(data)) > d.cs {
			return fmt.Errorf("the header extensions do not fit in the first cluster")
		}
		be.PutUint32(out[pos:], typ)
		be.PutUint32(out[pos+4:], uint32(len(data)))
		copy(out[pos+8:], data)
		pos += 8 + (int64(len(data))+7)&^7
		return nil
	}
	for _, e := range first {
		if err := put(e.typ, e.data); err != nil {
			return err
		}
	}
	for at := int64(d.h.HeaderLength); ; {
		typ, n := be.Uint32(old[at:]), int64(be.Uint32(old[at+4:]))
		if typ == extEnd {
			break
		}
		if keep(typ) {
			if err := put(typ, old[at+8:at+8+n]); err != nil {
				return err
			}
		}
		at += 8 + (n+7)&^7
	}
	if err := put(extEnd, nil); err != nil {
		return err
	}
	be.PutUint64(out[8:], 0)
	be.PutUint32(out[16:], 0)
	if name != "" {
		if pos+int64(len(name)) > d.cs {
			return fmt.Errorf("the header extensions and the backing file name do not fit in the first cluster")
		}
		copy(out[pos:], name)
		be.PutUint64(out[8:], uint64(pos))
		be.PutUint32(out[16:], uint32(len(name)))
		pos += int64(len(name))
	}
	h, err := parseHeader(out, d.c.Size())
	if err != nil {
		return fmt.Errorf("the new header does not parse: %w", err)
	}
	if _, err := d.c.WriteAt(out[:max(pos, int64(len(old)))], 0); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	*d.h = *h
	return nil
}
