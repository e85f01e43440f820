package qcow2

import (
	"fmt"
	"strings"
	"time"

	"github.com/diskserve/diskserve"
)

// snapshot is one entry of the internal snapshot table.
type snapshot struct {
	L1TableOffset uint64
	L1Size        uint32
	ID, Name      string
	DateSec       uint32
	DateNsec      uint32
	VMClockNsec   uint64
	VMStateSize   uint64
	DiskSize      uint64 // 0 if the entry does not record it
}

func (s snapshot) info() diskserve.Snapshot {
	return diskserve.Snapshot{
		ID:          s.ID,
		Name:        s.Name,
		Date:        time.Unix(int64(s.DateSec), int64(s.DateNsec)).UTC(),
		VMClock:     time.Duration(s.VMClockNsec),
		VMStateSize: s.VMStateSize,
		DiskSize:    s.DiskSize,
	}
}

// readSnapshots reads and checks the snapshot table, and returns it with
// the table's length in bytes.
func readSnapshots(c diskserve.DiskFile, h *header) ([]snapshot, int64, error) {
	var snaps []snapshot
	off := int64(h.SnapshotsOffset)
	for i := range h.NbSnapshots {
		var fixed [40]byte
		if err := diskserve.ReadFullAt(c, fixed[:], off); err != nil {
			return nil, 0, corrupt(off, "snapshot %d: %v", i, err)
		}
		s := snapshot{
			L1TableOffset: be.Uint64(fixed[0:]),
			L1Size:        be.Uint32(fixed[8:]),
			DateSec:       be.Uint32(fixed[16:]),
			DateNsec:      be.Uint32(fixed[20:]),
			VMClockNsec:   be.Uint64(fixed[24:]),
			VMStateSize:   uint64(be.Uint32(fixed[32:])),
		}
		idLen, nameLen, extra := int64(be.Uint16(fixed[12:])), int64(be.Uint16(fixed[14:])), int64(be.Uint32(fixed[36:]))
		if extra > maxSnapshotExtra {
			return nil, 0, corrupt(off+36, "snapshot %d: %d bytes of extra data, more than %d", i, extra, maxSnapshotExtra)
		}
		rest := make([]byte, extra+idLen+nameLen)
		if err := diskserve.ReadFullAt(c, rest, off+40); err != nil {
			return nil, 0, corrupt(off+40, "snapshot %d: %v", i, err)
		}
		if extra >= 8 {
			s.VMStateSize = be.Uint64(rest[0:])
		}
		if extra >= 16 {
			s.DiskSize = be.Uint64(rest[8:])
		}
		s.ID = string(rest[extra : extra+idLen])
		s.Name = string(rest[extra+idLen:])
		if int64(s.L1Size)*8 > maxL1Bytes {
			return nil, 0, corrupt(off+8, "snapshot %q: L1 table of %d entries is larger than %d bytes", s.ID, s.L1Size, maxL1Bytes)
		}
		snaps = append(snaps, s)
		off += (40 + extra + idLen + nameLen + 7) &^ 7
	}
	return snaps, off - int64(h.SnapshotsOffset), nil
}

// useSnapshot makes d the image as it was when the snapshot called name
// (its name or its ID) was taken: its L1 table and its disk size. The
// image is then read-only.
func (d *Disk) useSnapshot(name string, fileSize int64) error {
	var names []string
	for _, s := range d.snaps {
		if s.Name != name && s.ID != name {
			names = append(names, s.Name)
			continue
		}
		h := *d.h
		h.L1TableOffset, h.L1Size = s.L1TableOffset, s.L1Size
		if s.DiskSize != 0 {
			h.Size = s.DiskSize
		}
		if err := h.checkLayout(fileSize); err != nil {
			return fmt.Errorf("snapshot %q: %w", name, err)
		}
		l1, err := readTable(d.c, h.L1TableOffset, h.L1Size)
		if err != nil {
			return fmt.Errorf("snapshot %q: read L1 table: %w", name, err)
		}
		d.h, d.l1 = &h, l1
		return nil
	}
	if len(names) == 0 {
		return fmt.Errorf("no snapshot %q: the image has no internal snapshots", name)
	}
	return fmt.Errorf("no snapshot %q (snapshots: %s)", name, strings.Join(names, ", "))
}
