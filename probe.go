package diskserve

import (
	"fmt"
	"io"
	"io/fs"
)

// probedRaw guards an image that the opener took for raw only because no
// other format recognised it (no -f given). A guest that owns such a disk
// could write a qcow2 header into its first sector, and the next open
// would follow that header to any file the host can read (a backing file
// named /etc/shadow, say). As QEMU does, writes that would make the first
// SniffSize bytes look like another format are refused; everything else
// passes. Users who want guests to write anything pass the format.
type probedRaw struct {
	Passthrough
	path    string
	formats []Format // the formats that recognise images, the catch-all left out
}

// guardProbed wraps d, opened as raw by probing, when it is writable.
func guardProbed(d DiskFile, path string, formats []Format) DiskFile {
	if d.ReadOnly() {
		return d
	}
	var others []Format
	for _, f := range formats {
		if f.Magic != "" || f.Match != nil {
			others = append(others, f)
		}
	}
	return &probedRaw{Passthrough: Passthrough{D: d}, path: path, formats: others}
}

// WriteAt refuses a write that would give the image another format's
// magic.
func (p *probedRaw) WriteAt(b []byte, off int64) (int, error) {
	if off < SniffSize && off >= 0 {
		head := make([]byte, min(SniffSize, p.D.Size()))
		if n, err := p.D.ReadAt(head, 0); n < len(head) && err != io.EOF {
			return 0, err
		}
		if off < int64(len(head)) {
			copy(head[off:], b)
		}
		for _, f := range p.formats {
			if matchMagic(head, f.Magic) && (f.Match == nil || f.Match(head)) {
				return 0, fmt.Errorf("write of %d bytes at %d to %s: it would make an image probed as raw look like %s, which a later open would follow; pass the format (-f raw) to allow it: %w", len(b), off, p.path, f.Name, fs.ErrPermission)
			}
		}
	}
	return p.D.WriteAt(b, off)
}

// MapHost maps nothing that touches the start of the disk for writing,
// so that no engine writes there past the check.
func (p *probedRaw) MapHost(off, n int64, write bool) (HostRange, bool) {
	if write && off < SniffSize {
		return HostRange{}, false
	}
	return MapHost(p.D, off, n, write)
}
