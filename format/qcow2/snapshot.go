package qcow2

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/diskserve/diskserve"
)

// Internal snapshots. A snapshot is an L1 table of its own whose L2 tables
// and clusters the active layer shares until it writes to them. Refcounts
// count references per path, as qemu's do: a cluster in an L2 table that
// two L1 tables share has refcount 2, although one table entry refers to
// it. The active layer's COPIED flags say refcount 1, which is what lets a
// write go to a cluster in place; every other write copies first (see
// l2ForWrite and prepareWrite).
//
// Each operation reaches the file in an order that a crash cannot turn
// into a lost write or a cluster referred to with refcount 0: refcounts are
// raised before anything new refers to the clusters, the header switches
// to a new L1 table or snapshot table in one sector write, and refcounts
// are lowered only after that is durable. An interrupted operation leaves
// the image as before or as after it, with at most leaked clusters (which
// qemu-img check -r leaks repairs) and, after a delete, COPIED flags still
// clear on clusters whose refcount fell to 1 (which costs copies on write,
// not data, and qemu-img check -r all sets them).

// snapshotExtraLen is the extra data diskserve writes for a new snapshot,
// as qemu does: the 64-bit VM state size, the disk size and the icount.
const snapshotExtraLen = 24

// maxSnapshotNameLen bounds the IDs and names diskserve writes; the table
// stores their lengths in 16 bits.
const maxSnapshotNameLen = math.MaxUint16

var _ diskserve.Snapshotter = (*Disk)(nil)

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
	ICount        uint64 // math.MaxUint64 if the entry does not record it

	// raw is the entry as stored, without padding: rewriting the table
	// keeps every entry byte for byte, extra data that later versions
	// define included.
	raw []byte
}

func (s snapshot) info() diskserve.Snapshot {
	info := diskserve.Snapshot{
		ID:          s.ID,
		Name:        s.Name,
		Date:        time.Unix(int64(s.DateSec), int64(s.DateNsec)).UTC(),
		VMClock:     time.Duration(s.VMClockNsec),
		VMStateSize: s.VMStateSize,
		DiskSize:    s.DiskSize,
	}
	if s.ICount != math.MaxUint64 {
		info.ICount = &s.ICount
	}
	return info
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
		s.raw = make([]byte, 40+extra+idLen+nameLen)
		copy(s.raw, fixed[:])
		rest := s.raw[40:]
		if err := diskserve.ReadFullAt(c, rest, off+40); err != nil {
			return nil, 0, corrupt(off+40, "snapshot %d: %v", i, err)
		}
		if extra >= 8 {
			s.VMStateSize = be.Uint64(rest[0:])
		}
		if extra >= 16 {
			s.DiskSize = be.Uint64(rest[8:])
		}
		s.ICount = math.MaxUint64
		if extra >= 24 {
			s.ICount = be.Uint64(rest[16:])
		}
		s.ID = string(rest[extra : extra+idLen])
		s.Name = string(rest[extra+idLen:])
		if int64(s.L1Size)*8 > maxL1Bytes {
			return nil, 0, corrupt(off+8, "snapshot %q: L1 table of %d entries is larger than %d bytes", s.ID, s.L1Size, maxL1Bytes)
		}
		snaps = append(snaps, s)
		off += (int64(len(s.raw)) + 7) &^ 7
	}
	return snaps, off - int64(h.SnapshotsOffset), nil
}

// findSnapshot returns the index of the snapshot whose ID is name or,
// failing that, the first whose name is name, as qemu looks them up.
func (d *Disk) findSnapshot(name string) (int, error) {
	for i, s := range d.snaps {
		if s.ID == name {
			return i, nil
		}
	}
	var names []string
	for i, s := range d.snaps {
		if s.Name == name {
			return i, nil
		}
		names = append(names, s.Name)
	}
	if len(names) == 0 {
		return 0, fmt.Errorf("no snapshot %q: the image has no internal snapshots", name)
	}
	return 0, fmt.Errorf("no snapshot %q (snapshots: %s)", name, strings.Join(names, ", "))
}

// snapshotState returns the header as it was when snapshot s was taken
// (its L1 table and its disk size, checked against the file) and its L1
// table.
func (d *Disk) snapshotState(s snapshot, fileSize int64) (*header, []uint64, error) {
	h := *d.h
	h.L1TableOffset, h.L1Size = s.L1TableOffset, s.L1Size
	if s.DiskSize != 0 {
		h.Size = s.DiskSize
	}
	if err := h.checkLayout(fileSize); err != nil {
		return nil, nil, fmt.Errorf("snapshot %q: %w", s.Name, err)
	}
	l1, err := readTable(d.c, h.L1TableOffset, h.L1Size)
	if err != nil {
		return nil, nil, fmt.Errorf("snapshot %q: read L1 table: %w", s.Name, err)
	}
	return &h, l1, nil
}

// lookupSnapshot returns the index of the snapshot called name (its ID or
// its name) and its state, as findSnapshot and snapshotState do.
func (d *Disk) lookupSnapshot(name string, fileSize int64) (int, *header, []uint64, error) {
	i, err := d.findSnapshot(name)
	if err != nil {
		return 0, nil, nil, err
	}
	h, l1, err := d.snapshotState(d.snaps[i], fileSize)
	return i, h, l1, err
}

// useSnapshot makes d the image as it was when the snapshot called name
// (its ID or its name) was taken. The image is then read-only.
func (d *Disk) useSnapshot(name string, fileSize int64) error {
	_, h, l1, err := d.lookupSnapshot(name, fileSize)
	if err != nil {
		return err
	}
	d.h, d.l1 = h, l1
	return nil
}

// CreateSnapshot records the disk's current content as snapshot name, with
// the ID after the highest numeric one. Unlike qemu-img, it refuses a name
// that another snapshot has: a name that means two snapshots makes apply
// and delete pick one by table order.
func (d *Disk) CreateSnapshot(name string) (diskserve.Snapshot, error) {
	if err := d.checkSnapshotWrite("create snapshot"); err != nil {
		return diskserve.Snapshot{}, err
	}
	d.lockAll()
	defer d.unlockAll()
	switch {
	case name == "":
		return diskserve.Snapshot{}, fmt.Errorf("create snapshot: the name is empty")
	case len(name) > maxSnapshotNameLen:
		return diskserve.Snapshot{}, fmt.Errorf("create snapshot: the name is %d bytes, more than %d", len(name), maxSnapshotNameLen)
	case len(d.snaps) >= maxSnapshots:
		return diskserve.Snapshot{}, fmt.Errorf("create snapshot: the image has %d snapshots, the most qcow2 allows", len(d.snaps))
	case d.w.bits < 2:
		return diskserve.Snapshot{}, unsupported(96, "create snapshot: refcounts of %d bit cannot count a snapshot's references (diskserve amend -o refcount_bits=16 widens them)", d.w.bits)
	}
	nextID := 1
	for _, s := range d.snaps {
		if s.Name == name {
			return diskserve.Snapshot{}, fmt.Errorf("create snapshot: snapshot %s is called %q already", s.ID, name)
		}
		if n, err := strconv.Atoi(s.ID); err == nil && n >= nextID {
			nextID = n + 1
		}
	}
	if err := d.flushLocked(); err != nil {
		return diskserve.Snapshot{}, err
	}
	// 1. The active layer's tables and clusters gain the snapshot's
	// reference and lose their COPIED flags; durable before anything
	// refers to them twice.
	if err := d.shareTree(d.l1); err != nil {
		return diskserve.Snapshot{}, err
	}
	d.w.l1Dirty = true
	// 2. The snapshot's own copy of the L1 table.
	l1Off, err := d.writeNewL1(d.l1)
	if err != nil {
		return diskserve.Snapshot{}, err
	}
	// 3. The snapshot table, with the new entry last.
	now := time.Now()
	s := snapshot{
		L1TableOffset: uint64(l1Off),
		L1Size:        uint32(len(d.l1)),
		ID:            strconv.Itoa(nextID),
		Name:          name,
		DateSec:       uint32(now.Unix()),
		DateNsec:      uint32(now.Nanosecond()),
		DiskSize:      d.h.Size,
		ICount:        math.MaxUint64, // no VM ran with icount
	}
	s.raw = s.encode()
	if err := d.writeSnapshotTable(append(d.snaps[:len(d.snaps):len(d.snaps)], s)); err != nil {
		return diskserve.Snapshot{}, err
	}
	return s.info(), nil
}

// encode returns a new entry's bytes, without padding, with the extra data
// qemu writes.
func (s snapshot) encode() []byte {
	b := make([]byte, 40+snapshotExtraLen+len(s.ID)+len(s.Name))
	be.PutUint64(b[0:], s.L1TableOffset)
	be.PutUint32(b[8:], s.L1Size)
	be.PutUint16(b[12:], uint16(len(s.ID)))
	be.PutUint16(b[14:], uint16(len(s.Name)))
	be.PutUint32(b[16:], s.DateSec)
	be.PutUint32(b[20:], s.DateNsec)
	be.PutUint64(b[24:], s.VMClockNsec)
	be.PutUint32(b[32:], uint32(min(s.VMStateSize, math.MaxUint32)))
	be.PutUint32(b[36:], snapshotExtraLen)
	be.PutUint64(b[40:], s.VMStateSize)
	be.PutUint64(b[48:], s.DiskSize)
	be.PutUint64(b[56:], s.ICount)
	copy(b[40+snapshotExtraLen:], s.ID)
	copy(b[40+snapshotExtraLen+len(s.ID):], s.Name)
	return b
}

// beginSnapshotChange checks that op may change the snapshots, takes lockAll,
// looks snapshot name up and flushes. Unless it fails, the caller holds
// the locks and calls unlockAll.
func (d *Disk) beginSnapshotChange(op, name string) (int, *header, []uint64, error) {
	if err := d.checkSnapshotWrite(op); err != nil {
		return 0, nil, nil, err
	}
	d.lockAll()
	i, h, l1, err := d.lookupSnapshot(name, d.c.Size())
	if err != nil {
		err = fmt.Errorf("%s: %w", op, err)
	} else {
		err = d.flushLocked()
	}
	if err != nil {
		d.unlockAll()
		return 0, nil, nil, err
	}
	return i, h, l1, nil
}

// ApplySnapshot reverts the disk to snapshot name (its ID or its name): its
// content and its disk size. The snapshot stays, and what the active layer
// alone held is freed.
func (d *Disk) ApplySnapshot(name string) error {
	_, h, l1, err := d.beginSnapshotChange("apply snapshot", name)
	if err != nil {
		return err
	}
	defer d.unlockAll()
	if h.Size != d.h.Size && len(d.bitmaps) > 0 {
		return unsupported(-1, "apply snapshot %q: its disk size, %d bytes, is not the image's, %d, and the image's persistent dirty bitmaps keep the disk's size", name, h.Size, d.h.Size)
	}
	if h.Size != d.h.Size && d.h.Version < 3 {
		return unsupported(60, "apply snapshot %q: its disk size, %d bytes, is not the image's, %d, and a version 2 image with snapshots keeps its size (as in qemu)", name, h.Size, d.h.Size)
	}
	// 1. The snapshot's tables and clusters gain the active layer's
	// reference; writeNewL1 makes that durable before it writes the
	// active layer's new L1 table.
	if err := d.shareTree(l1); err != nil {
		return err
	}
	l1Off, err := d.writeNewL1(l1)
	if err != nil {
		return err
	}
	// 2. Size and L1 table in one write of header bytes 24-47 (the
	// encryption method between them is 0: encrypted images do not open).
	var b [24]byte
	be.PutUint64(b[0:], h.Size)
	be.PutUint32(b[12:], uint32(len(l1)))
	be.PutUint64(b[16:], uint64(l1Off))
	if _, err := d.c.WriteAt(b[:], 24); err != nil {
		return fmt.Errorf("apply snapshot: write header: %w", err)
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	d.markDirty(0, int64(h.Size)) // every byte may read differently now
	old, oldOff := d.l1, int64(d.h.L1TableOffset)
	d.l1, d.h.Size, d.h.L1Size, d.h.L1TableOffset = l1, h.Size, uint32(len(l1)), uint64(l1Off)
	// 3. The old active layer's references go.
	if err := d.releaseTree(old, oldOff); err != nil {
		return err
	}
	return d.flushLocked()
}

// DeleteSnapshot deletes snapshot name (its ID or its name) and frees what
// only it held.
func (d *Disk) DeleteSnapshot(name string) error {
	i, _, l1, err := d.beginSnapshotChange("delete snapshot", name)
	if err != nil {
		return err
	}
	defer d.unlockAll()
	s := d.snaps[i]
	// 1. The table without the entry; then nothing refers to the
	// snapshot's L1 table on disk, and its references go.
	rest := append(d.snaps[:i:i], d.snaps[i+1:]...)
	if err := d.writeSnapshotTable(rest); err != nil {
		return err
	}
	if err := d.releaseTree(l1, int64(s.L1TableOffset)); err != nil {
		return err
	}
	if err := d.flushLocked(); err != nil {
		return err
	}
	// 2. What the active layer alone refers to now is its own again.
	if err := d.restoreCopied(); err != nil {
		return err
	}
	return d.flushLocked()
}

// checkSnapshotWrite returns the error a snapshot operation on d fails
// with before it starts, or nil.
func (d *Disk) checkSnapshotWrite(op string) error {
	if !d.writable() {
		return fmt.Errorf("%s: %w", op, diskserve.ErrReadOnly)
	}
	return nil
}

// forEachCluster calls fn for each host cluster that L2 entry e refers to:
// none, its data cluster (also for an allocated zero cluster), or every
// cluster its compressed data touches.
func (d *Disk) forEachCluster(e uint64, fn func(host int64) error) error {
	if e&entryCompressed != 0 {
		off, n := d.compressedRange(e)
		for c := off &^ (d.cs - 1); c < off+n; c += d.cs {
			if err := fn(c); err != nil {
				return err
			}
		}
		return nil
	}
	if host := int64(e & offsetMask); host != 0 {
		return fn(host)
	}
	return nil
}

// addRef raises the refcount of the host cluster at host by one.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) addRef(host int64) error {
	rc, err := d.refcount(host)
	if err != nil {
		return err
	}
	return d.setRefcount(host, rc+1)
}

// l2Table returns the L2 table that L1 entry i of l1 points to, or nil if
// there is none, checking its offset.
//
// Preconditions: d.mu is held.
func (d *Disk) l2Table(l1 []uint64, i int) (*metaTable, error) {
	off := int64(l1[i] & offsetMask)
	switch {
	case off == 0:
		return nil, nil
	case off%d.cs != 0 || off >= d.c.Size():
		return nil, corrupt(-1, "L1 entry %d: L2 table offset %#x not cluster aligned or past the end of the file", i, off)
	}
	return d.meta.get(off, kindL2, d.loadTable)
}

// shareTree gives every L2 table of l1, and every cluster those tables
// refer to, one more reference, and clears the COPIED flags in l1 and in
// the tables: they are shared from now on. The tables reach the file in
// the next flush, after the refcounts.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) shareTree(l1 []uint64) error {
	return d.eachL2(l1, func(i int, t *metaTable) error {
		for j := int64(0); j < d.l2n; j++ {
			e := be.Uint64(t.data[d.entryOff(j):])
			if err := d.forEachCluster(e, d.addRef); err != nil {
				return err
			}
			if e&entryCopied != 0 {
				be.PutUint64(t.data[d.entryOff(j):], e&^entryCopied)
				d.meta.markDirty(t)
			}
		}
		if err := d.addRef(t.off); err != nil {
			return err
		}
		l1[i] &^= entryCopied
		return nil
	})
}

// eachL2 calls fn with every L2 table that l1 refers to, and its index.
//
// Preconditions: d.mu is held.
func (d *Disk) eachL2(l1 []uint64, fn func(i int, t *metaTable) error) error {
	for i := range l1 {
		t, err := d.l2Table(l1, i)
		if err != nil {
			return err
		}
		if t == nil {
			continue
		}
		release := d.meta.hold(t)
		err = fn(i, t)
		release()
		if err != nil {
			return err
		}
	}
	return nil
}

// releaseTree drops the references of an L1 table that nothing refers to
// on disk any more: those of its L2 tables and their clusters, and its own
// clusters at l1Off. They are counted down in the next flush.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) releaseTree(l1 []uint64, l1Off int64) error {
	if err := d.releaseL2s(l1); err != nil {
		return err
	}
	for k := int64(0); k*d.cs < int64(len(l1))*8; k++ {
		d.w.pendingFree = append(d.w.pendingFree, l1Off+k*d.cs)
	}
	return nil
}

// releaseL2s drops the references of the L2 tables that the L1 entries
// l1 name, and of the clusters those tables refer to: a reference of each
// per tree, shared tables included. They are counted down in the next
// flush.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) releaseL2s(l1 []uint64) error {
	return d.eachL2(l1, func(_ int, t *metaTable) error {
		for j := int64(0); j < d.l2n; j++ {
			d.free(be.Uint64(t.data[d.entryOff(j):]))
		}
		d.w.pendingFree = append(d.w.pendingFree, t.off)
		return nil
	})
}

// restoreCopied sets the COPIED flags of the active layer where a refcount
// is 1 again: on L1 entries, and on the entries of the L2 tables that the
// active layer alone refers to (a shared table's clusters are shared too).
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) restoreCopied() error {
	return d.eachL2(d.l1, func(i int, t *metaTable) error {
		rc, err := d.refcount(t.off)
		if err != nil || rc != 1 {
			return err
		}
		if err := d.recomputeCopied(t); err != nil {
			return err
		}
		if d.l1[i]&entryCopied == 0 {
			d.l1[i] |= entryCopied
			d.w.l1Dirty = true
		}
		return nil
	})
}

// recomputeCopied sets the COPIED flag of each entry of L2 table t that
// refers to a data cluster exactly when that cluster's refcount is 1.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) recomputeCopied(t *metaTable) error {
	for j := int64(0); j < d.l2n; j++ {
		e := be.Uint64(t.data[d.entryOff(j):])
		host := int64(e & offsetMask)
		if e&entryCompressed != 0 || host == 0 {
			continue
		}
		rc, err := d.refcount(host)
		if err != nil {
			return err
		}
		next := e &^ entryCopied
		if rc == 1 {
			next |= entryCopied
		}
		if next != e {
			be.PutUint64(t.data[d.entryOff(j):], next)
			d.meta.markDirty(t)
		}
	}
	return nil
}

// writeNewL1 writes l1, without COPIED flags, into newly allocated
// clusters, after the refcounts and tables pending in the cache, and
// returns its offset. A table of no entries takes no cluster and is at 0.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) writeNewL1(l1 []uint64) (int64, error) {
	if len(l1) == 0 {
		return 0, d.flushLocked()
	}
	off, err := d.alloc((int64(len(l1))*8 + d.cs - 1) / d.cs)
	if err != nil {
		return 0, err
	}
	if err := d.flushLocked(); err != nil {
		return 0, err
	}
	plain := make([]uint64, len(l1))
	for i, e := range l1 {
		plain[i] = e &^ entryCopied
	}
	if err := writeEntries(d.c, plain, off); err != nil {
		return 0, fmt.Errorf("write L1 table: %w", err)
	}
	return off, diskserve.Flush(d.c)
}

// writeSnapshotTable writes snaps as the snapshot table in newly allocated
// clusters, switches the header to it in one write, and frees the old
// table. Everything else the table refers to must be durable already.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) writeSnapshotTable(snaps []snapshot) error {
	var table []byte
	for _, s := range snaps {
		table = append(table, s.raw...)
		table = append(table, make([]byte, (8-len(s.raw)%8)%8)...)
	}
	var off int64
	if len(table) > 0 {
		var err error
		if off, err = d.alloc((int64(len(table)) + d.cs - 1) / d.cs); err != nil {
			return err
		}
		if err := d.flushLocked(); err != nil {
			return err
		}
		if _, err := d.c.WriteAt(table, off); err != nil {
			return fmt.Errorf("write snapshot table: %w", err)
		}
		if err := diskserve.Flush(d.c); err != nil {
			return err
		}
	}
	var b [12]byte
	be.PutUint32(b[0:], uint32(len(snaps)))
	be.PutUint64(b[4:], uint64(off))
	if _, err := d.c.WriteAt(b[:], 60); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	oldOff, oldLen := int64(d.h.SnapshotsOffset), d.snapBytes
	for k := int64(0); d.h.NbSnapshots > 0 && k*d.cs < oldLen; k++ {
		d.w.pendingFree = append(d.w.pendingFree, oldOff+k*d.cs)
	}
	d.snaps, d.snapBytes = snaps, int64(len(table))
	d.h.NbSnapshots, d.h.SnapshotsOffset = uint32(len(snaps)), uint64(off)
	return d.flushLocked()
}
