package qcow2

import (
	"fmt"
	"slices"

	"github.com/diskserve/diskserve"
)

// Flushing. The metadata changed in the cache reaches the file in rounds:
// under d.mu a round copies what is dirty and counts it clean, then writes
// the copies in crash-safe order (see write.go), and takes d.mu again only
// to settle. Reads and writes go on while a round's writes and syncs run;
// what they change meanwhile is dirty again, for the next round. A table
// being written stays in the cache (held), so nothing reads its old bytes
// back from the file. flushMu lets one flush run at a time, and keeps out
// the changes that flush with d.mu held throughout (snapshots, bitmaps,
// checks, resizing, closing: see lockAll).

// lockAll takes flushMu and then d.mu, for a change that flushes with d.mu
// held (flushLocked): no flush is then halfway through.
func (d *Disk) lockAll() {
	d.flushMu.Lock()
	d.mu.Lock()
}

// unlockAll releases what lockAll took.
func (d *Disk) unlockAll() {
	d.mu.Unlock()
	d.flushMu.Unlock()
}

// Flush makes every completed write durable, metadata in crash-safe order,
// without holding d.mu across any write or sync.
func (d *Disk) Flush() error {
	if !d.writable() {
		return nil
	}
	d.flushMu.Lock()
	defer d.flushMu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.flushMeta(true)
}

// flushIfFull flushes when the dirty metadata outgrows the cache, which
// holds dirty tables until they are written.
//
// Preconditions: neither d.mu nor flushMu is held.
func (d *Disk) flushIfFull() error {
	full := func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.meta.dirty > d.meta.max
	}
	if !full() {
		return nil
	}
	d.flushMu.Lock()
	defer d.flushMu.Unlock()
	if !full() { // another writer flushed meanwhile
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.flushMeta(true)
}

// flushLocked is Flush with d.mu held throughout, for changes that read or
// write metadata on disk directly afterwards.
//
// Preconditions: d.mu and flushMu are held (lockAll); the image is
// writable.
func (d *Disk) flushLocked() error { return d.flushMeta(false) }

// flushMeta writes the dirty metadata and syncs. With unlocked, d.mu is
// released across the I/O.
//
// Preconditions: d.mu and flushMu are held; the image is writable.
func (d *Disk) flushMeta(unlocked bool) error {
	io := func(fn func() error) error {
		if !unlocked {
			return fn()
		}
		d.mu.Unlock()
		defer d.mu.Lock()
		return fn()
	}
	w := d.w
	if d.meta.dirty == 0 && !w.rtDirty && !w.l1Dirty && len(w.pendingFree) == 0 {
		return io(func() error { return diskserve.Flush(d.c) })
	}
	f := d.takeDirty()
	freed := w.pendingFree
	w.pendingFree = nil
	err := io(func() error { return f.write(d) })
	d.settle(f, err)
	if err != nil {
		w.pendingFree = append(freed, w.pendingFree...)
		return err
	}
	if len(freed) == 0 {
		return nil
	}
	// Nothing on disk refers to the freed clusters any more: count them
	// down, reading their refcount blocks without d.mu first, and give
	// the space of those now unused back.
	if unlocked {
		if err := io(func() error { return d.cacheRefblocks(freed) }); err != nil {
			w.pendingFree = append(freed, w.pendingFree...)
			return err
		}
	}
	holes, err := d.unreference(freed)
	if err != nil {
		return err
	}
	f = d.takeDirty()
	err = io(func() error {
		slices.Sort(holes)
		for i := 0; i < len(holes); { // runs of neighbouring clusters in one punch
			j := i + 1
			for j < len(holes) && holes[j] == holes[j-1]+d.cs {
				j++
			}
			_ = diskserve.PunchHole(d.c, holes[i], min(holes[j-1]+d.cs, d.c.Size())-holes[i]) // only space; nothing reads it
			i = j
		}
		return f.write(d)
	})
	d.settle(f, err)
	return err
}

// unreference counts one reference less to each host cluster of freed,
// and returns those left with none.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) unreference(freed []int64) (unused []int64, err error) {
	for _, host := range freed {
		rc, err := d.refcount(host)
		if err != nil {
			return nil, err
		}
		if rc == 0 {
			return nil, corrupt(-1, "freeing host cluster %#x, whose refcount is already 0", host)
		}
		if err := d.setRefcount(host, rc-1); err != nil {
			return nil, err
		}
		if rc == 1 {
			unused = append(unused, host)
		}
	}
	return unused, nil
}

// A metaFlush is one round's copy of the dirty metadata.
type metaFlush struct {
	refblocks, l2s []tableCopy
	rt             []uint64 // the refcount table, if it changed
	rtOff          int64
	rtHeader       []byte   // header bytes 48-59, if the refcount table moved
	l1             []uint64 // the L1 table, if it changed
	l1Off          int64
}

// A tableCopy is the content of a cached table as a flush writes it.
type tableCopy struct {
	t    *metaTable // held in the cache until settled
	data []byte
}

// takeDirty copies the dirty metadata into a metaFlush and counts it clean.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) takeDirty() *metaFlush {
	w := d.w
	f := &metaFlush{}
	for _, t := range d.meta.dirtyTables() {
		c := tableCopy{t: t, data: append([]byte(nil), t.data...)}
		t.held++
		d.meta.markClean(t)
		if t.kind == kindRefblock {
			f.refblocks = append(f.refblocks, c)
		} else {
			f.l2s = append(f.l2s, c)
		}
	}
	if w.rtDirty {
		f.rt, f.rtOff = append([]uint64(nil), w.rt...), int64(d.h.RefcountTableOffset)
		if w.rtMoved {
			f.rtHeader = make([]byte, 12)
			be.PutUint64(f.rtHeader[0:], d.h.RefcountTableOffset)
			be.PutUint32(f.rtHeader[8:], d.h.RefcountTableClusters)
		}
		w.rtDirty, w.rtMoved = false, false
	}
	if w.l1Dirty {
		f.l1, f.l1Off = append([]uint64(nil), d.l1...), int64(d.h.L1TableOffset)
		w.l1Dirty = false
	}
	return f
}

// settle ends a round: the tables it wrote may be evicted again, and what
// it failed to write is dirty again.
//
// Preconditions: d.mu is held.
func (d *Disk) settle(f *metaFlush, err error) {
	for _, c := range append(f.refblocks, f.l2s...) {
		c.t.held--
		if err != nil {
			d.meta.markDirty(c.t)
		}
	}
	if err != nil {
		w := d.w
		w.rtDirty = w.rtDirty || f.rt != nil
		w.rtMoved = w.rtMoved || f.rtHeader != nil
		w.l1Dirty = w.l1Dirty || f.l1 != nil
	}
}

// write writes f: refcounts before the tables that refer to the clusters
// they count, L2 tables before the L1 entries that point to them, each
// step durable before the next. The first sync also makes the data
// written so far durable.
func (f *metaFlush) write(d *Disk) error {
	// 1. Refcount increments, with the data.
	if err := writeCopies(d.c, f.refblocks); err != nil {
		return err
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	// 2. The refcount table, and the header where the table moved.
	if f.rt != nil {
		if err := writeEntries(d.c, f.rt, f.rtOff); err != nil {
			return fmt.Errorf("write refcount table: %w", err)
		}
		if f.rtHeader != nil {
			if _, err := d.c.WriteAt(f.rtHeader, 48); err != nil {
				return fmt.Errorf("write header: %w", err)
			}
		}
		if err := diskserve.Flush(d.c); err != nil {
			return err
		}
	}
	// 3. L2 tables, then the L1 entries that point to them.
	if err := writeCopies(d.c, f.l2s); err != nil {
		return err
	}
	if f.l1 != nil {
		if len(f.l2s) > 0 {
			if err := diskserve.Flush(d.c); err != nil {
				return err
			}
		}
		if err := writeEntries(d.c, f.l1, f.l1Off); err != nil {
			return fmt.Errorf("write L1 table: %w", err)
		}
	}
	if len(f.l2s) > 0 || f.l1 != nil {
		return diskserve.Flush(d.c)
	}
	return nil
}

func writeCopies(c diskserve.DiskFile, copies []tableCopy) error {
	for _, tc := range copies {
		if _, err := c.WriteAt(tc.data, tc.t.off); err != nil {
			return fmt.Errorf("write metadata cluster at %#x: %w", tc.t.off, err)
		}
	}
	return nil
}

// writeEntries writes a table of 64-bit entries at off.
func writeEntries(c diskserve.DiskFile, t []uint64, off int64) error {
	b := make([]byte, len(t)*8)
	for i, e := range t {
		be.PutUint64(b[i*8:], e)
	}
	_, err := c.WriteAt(b, off)
	return err
}
