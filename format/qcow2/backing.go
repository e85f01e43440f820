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
//
// The first cluster is rewritten in one write, as qemu does: the header,
// its extensions with the backing format extension replaced, added or
// removed, then the name.
func (d *Disk) SetBacking(name, fmtName string) error {
	if !d.writable() {
		return fmt.Errorf("set the backing file: %w", diskserve.ErrReadOnly)
	}
	if len(name) > maxBackingNameLen {
		return fmt.Errorf("set the backing file: a name of %d bytes is longer than %d", len(name), maxBackingNameLen)
	}
	d.lockAll()
	defer d.unlockAll()
	old := make([]byte, min(d.cs, d.c.Size()))
	if err := diskserve.ReadFullAt(d.c, old, 0); err != nil {
		return fmt.Errorf("read header: %w", err)
	}
	out := make([]byte, d.cs)
	pos := int64(d.h.HeaderLength)
	copy(out, old[:pos])
	put := func(typ uint32, data []byte) error {
		if pos+8+int64(len(data)) > d.cs {
			return fmt.Errorf("set the backing file: the header extensions do not fit in the first cluster")
		}
		be.PutUint32(out[pos:], typ)
		be.PutUint32(out[pos+4:], uint32(len(data)))
		copy(out[pos+8:], data)
		pos += 8 + (int64(len(data))+7)&^7
		return nil
	}
	if name != "" && fmtName != "" {
		if err := put(extBackingFormat, []byte(fmtName)); err != nil {
			return err
		}
	}
	for at := int64(d.h.HeaderLength); ; {
		typ, n := be.Uint32(old[at:]), int64(be.Uint32(old[at+4:]))
		if typ == extEnd {
			break
		}
		if typ != extBackingFormat {
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
			return fmt.Errorf("set the backing file: the header extensions and the name do not fit in the first cluster")
		}
		copy(out[pos:], name)
		be.PutUint64(out[8:], uint64(pos))
		be.PutUint32(out[16:], uint32(len(name)))
		pos += int64(len(name))
	}
	h, err := parseHeader(out, d.c.Size())
	if err != nil {
		return fmt.Errorf("set the backing file: the new header does not parse: %w", err)
	}
	if _, err := d.c.WriteAt(out[:max(pos, int64(len(old)))], 0); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	d.h.BackingFile, d.h.BackingFormat = h.BackingFile, h.BackingFormat
	d.h.BackingFileOffset, d.h.BackingFileSize = h.BackingFileOffset, h.BackingFileSize
	d.h.Bitmaps = h.Bitmaps
	return nil
}
