package qcow2

import (
	"errors"
	"fmt"

	"github.com/diskserve/diskserve"
)

// The write path. Clusters are allocated at the end of the file and never
// reused while the image is open, so a mapping read under the lock stays
// safe to use after it: at worst it points at a cluster freed meanwhile,
// which nothing else will be given. Metadata changes are made in the cache
// and reach the file in Flush, in an order that survives a crash at any
// point: refcount increments before the tables that refer to the clusters,
// L2 tables before the L1 entries that point to them, and refcount
// decrements only after the references are gone on disk. A crash may leak
// clusters (qemu-img check -r leaks repairs that); it never leaves a
// reference to a cluster whose refcount is 0.

// writer is the state of an image open for writing.
type writer struct {
	rt       []uint64 // the refcount table
	bits     uint     // refcount width
	perBlock int64    // refcounts per refcount block
	end      int64    // where the next cluster is allocated

	rtDirty     bool
	rtMoved     bool // the header must point to the new table
	l1Dirty     bool
	pendingFree []int64 // host clusters to unreference once the references are durably gone

	compressedNext int64 // where the next compressed cluster may go; 0 before the first
}

var (
	_ diskserve.Flusher        = (*Disk)(nil)
	_ diskserve.ZeroWriter     = (*Disk)(nil)
	_ diskserve.HolePuncher    = (*Disk)(nil)
	_ diskserve.Resizer        = (*Disk)(nil)
	_ diskserve.Emptier        = (*Disk)(nil)
	_ diskserve.BackingChanger = (*Disk)(nil)
)

// newWriter prepares d for writing, refusing images whose state this
// writer cannot keep right.
func newWriter(d *Disk, fileSize int64) (*writer, error) {
	h := d.h
	switch {
	case h.IncompatibleFeatures&incompatCorrupt != 0:
		return nil, corrupt(72, "the image is marked corrupt: repair it with qemu-img check -r all, or open it read-only")
	}
	rt, err := readTable(d.c, h.RefcountTableOffset, uint32(int64(h.RefcountTableClusters)*d.cs/8))
	if err != nil {
		return nil, fmt.Errorf("read refcount table: %w", err)
	}
	w := &writer{
		rt:       rt,
		bits:     1 << h.RefcountOrder,
		perBlock: d.cs * 8 / (1 << h.RefcountOrder),
		end:      (fileSize + d.cs - 1) &^ (d.cs - 1),
	}
	// Autoclear bits must be cleared before the first write, but for the
	// bitmaps bit while the bitmaps are kept (see bitmap.go).
	if keep := h.AutoclearFeatures & autoclearBitmaps; h.AutoclearFeatures != keep {
		if err := d.setAutoclear(keep); err != nil {
			return nil, err
		}
	}
	if err := d.trackBitmaps(); err != nil {
		return nil, err
	}
	return w, nil
}

// setAutoclear writes the autoclear features.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) setAutoclear(v uint64) error {
	return d.setFeatures(&d.h.AutoclearFeatures, 88, v)
}

// setFeatures writes v, durably, as the feature bits at header offset at,
// and then into *field, the header's copy of them.
func (d *Disk) setFeatures(field *uint64, at int64, v uint64) error {
	var b [8]byte
	be.PutUint64(b[:], v)
	if _, err := d.c.WriteAt(b[:], at); err != nil {
		return fmt.Errorf("write the feature bits at header offset %d: %w", at, err)
	}
	if err := diskserve.Flush(d.c); err != nil {
		return err
	}
	*field = v
	return nil
}

// reserve takes n clusters at the end of the file, growing the file to
// hold them, and returns the offset of the first. Their refcounts are the
// caller's to set.
//
// Preconditions: d.mu is held.
func (d *Disk) reserve(n int64) int64 {
	off := d.w.end
	d.w.end += n * d.cs
	return off
}

// alloc reserves n clusters and counts a reference to each.
//
// Preconditions: d.mu is held.
func (d *Disk) alloc(n int64) (int64, error) {
	off := d.reserve(n)
	for k := range n {
		if err := d.setRefcount(off+k*d.cs, 1); err != nil {
			return 0, err
		}
	}
	return off, d.growFile()
}

// minGrowStep and maxGrowStep bound how far ahead of what is allocated
// growFile grows the image file: an eighth of its size.
const (
	minGrowStep = 1 << 20
	maxGrowStep = 64 << 20
)

// growFile makes the image file at least as long as everything reserved
// in it.
//
// Preconditions: d.mu is held.
func (d *Disk) growFile() error {
	if d.w.end <= d.c.Size() {
		return nil
	}
	// Ahead, in steps: a truncate per allocated cluster was a tenth of
	// the CPU of small allocating writes, under d.mu, and one per MiB
	// still cost a filesystem transaction per MiB written. Close trims
	// the file back to what is allocated.
	step := max(d.cs, min(maxGrowStep, max(minGrowStep, d.w.end/8)))
	size := (d.w.end + step + minGrowStep - 1) &^ (minGrowStep - 1)
	if err := diskserve.Resize(d.c, size); err != nil {
		return fmt.Errorf("grow the image file: %w", err)
	}
	return nil
}

// trimFile cuts the file back to what is allocated in it, undoing
// growFile's steps ahead.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) trimFile() error {
	if d.c.Size() <= d.w.end {
		return nil
	}
	if err := diskserve.Resize(d.c, d.w.end); err != nil {
		return fmt.Errorf("trim the image file: %w", err)
	}
	return diskserve.Flush(d.c)
}

// free unreferences the host clusters that an L2 entry being replaced
// pointed to, once the replacement is durable.
//
// Preconditions: d.mu is held.
func (d *Disk) free(entry uint64) {
	_ = d.forEachCluster(entry, func(host int64) error {
		d.w.pendingFree = append(d.w.pendingFree, host)
		return nil
	})
}

// l2ForWrite returns the L2 table of guest cluster ci for changing,
// allocating it if the image has none there yet and copying it if a
// snapshot shares it (COPIED clear in the L1 entry).
//
// Preconditions: d.mu is held.
func (d *Disk) l2ForWrite(ci int64) (*metaTable, error) {
	l1i := ci / d.l2n
	l1e := d.l1[l1i]
	l2off := int64(l1e & offsetMask)
	if l2off == 0 {
		off, err := d.alloc(1)
		if err != nil {
			return nil, err
		}
		d.l1[l1i] = uint64(off) | entryCopied
		d.w.l1Dirty = true
		return d.meta.add(off, kindL2, d.meta.buffer(), true), nil
	}
	if l2off%d.cs != 0 {
		return nil, corrupt(int64(d.h.L1TableOffset)+l1i*8, "L2 table offset %#x not cluster aligned", l2off)
	}
	t, err := d.meta.get(l2off, kindL2, d.loadTable)
	if err != nil || l1e&entryCopied != 0 {
		return t, err
	}
	return d.copyL2(l1i, t)
}

// copyL2 gives the active layer its own copy of the shared L2 table t of L1
// entry l1i. The clusters it refers to keep their refcounts: the copy
// takes over the active layer's references from t, which loses one. Their
// COPIED flags are set anew from their refcounts.
//
// Preconditions: d.mu is held.
func (d *Disk) copyL2(l1i int64, t *metaTable) (*metaTable, error) {
	off, err := d.alloc(1)
	if err != nil {
		return nil, err
	}
	data := d.meta.buffer()
	copy(data, t.data)
	c := d.meta.add(off, kindL2, data, true)
	if err := d.recomputeCopied(c); err != nil {
		return nil, err
	}
	d.l1[l1i] = uint64(off) | entryCopied
	d.w.l1Dirty = true
	d.w.pendingFree = append(d.w.pendingFree, t.off)
	return c, nil
}

// WriteAt writes p at off. Writes into clusters the image owns alone go
// straight to them; the rest allocate, copying what the cluster held before
// (from this image, its compressed data or the backing file).
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := diskserve.CheckWrite(d, off, int64(len(p))); err != nil {
		return 0, fmt.Errorf("write: %w", err)
	}
	d.markDirty(off, int64(len(p)))
	for done := 0; done < len(p); {
		pos := off + int64(done)
		if n, err := d.writeRun(pos, p[done:]); err != nil || n > 0 {
			if err != nil {
				return done, err
			}
			done += n
			continue
		}
		n := min(int(d.cs-pos&(d.cs-1)), len(p)-done)
		host, err := d.prepareWrite(pos, p[done:done+n])
		if err != nil {
			return done, err
		}
		if host >= 0 {
			if _, err := d.c.WriteAt(p[done:done+n], host); err != nil {
				return done, err
			}
		} else if err := d.flushIfFull(); err != nil {
			return done + n, err
		}
		done += n
	}
	return len(p), nil
}

// writeRun writes the whole clusters at the start of p, from the cluster
// boundary pos, in one call to the image file when at least two of them
// make a run: clusters the image owns that follow each other on the host,
// written in place; or clusters the write allocates afresh, placed in a
// row, where p replaces everything they held so nothing is copied. While
// the fresh clusters are written they are in flight, as one cluster's
// copy-on-write is (see prepareWrite). It returns how much of p it wrote:
// 0 when p starts with no run, for WriteAt to write cluster by cluster.
func (d *Disk) writeRun(pos int64, p []byte) (int, error) {
	if d.h.extendedL2() || pos&(d.cs-1) != 0 || int64(len(p)) < 2*d.cs {
		return 0, nil
	}
	ci := pos >> d.bits
	if err := d.lockWithL2(ci); err != nil {
		return 0, err
	}
	t, err := d.l2ForWrite(ci)
	if err != nil {
		d.mu.Unlock()
		return 0, err
	}
	limit := min(int64(len(p))>>d.bits, d.l2n-ci%d.l2n)
	e, _ := d.entryIn(t, ci)
	inPlace := d.ownedData(e)
	if !inPlace && d.ownedCluster(e) { // a zero cluster keeps its cluster
		d.mu.Unlock()
		return 0, nil
	}
	olds := []uint64{e}
	for k := int64(1); k < limit; k++ {
		if _, busy := d.inflight[ci+k]; busy {
			break
		}
		next, _ := d.entryIn(t, ci+k)
		if inPlace && (!d.ownedData(next) || next&offsetMask != e&offsetMask+uint64(k*d.cs)) ||
			!inPlace && d.ownedCluster(next) {
			break
		}
		olds = append(olds, next)
	}
	k := int64(len(olds))
	if k < 2 {
		d.mu.Unlock()
		return 0, nil
	}
	b := p[:k*d.cs]
	if inPlace {
		d.mu.Unlock()
		_, err := d.c.WriteAt(b, int64(e&offsetMask))
		return len(b), err
	}
	host, err := d.alloc(k)
	if err != nil {
		d.mu.Unlock()
		return 0, err
	}
	done := make(chan struct{})
	for j := range k {
		d.inflight[ci+j] = done
	}
	d.mu.Unlock()

	_, err = d.c.WriteAt(b, host)

	d.mu.Lock()
	for j := range k {
		delete(d.inflight, ci+j)
	}
	close(done)
	if err == nil {
		t, err = d.l2ForWrite(ci)
	}
	if err != nil {
		for j := range k {
			d.w.pendingFree = append(d.w.pendingFree, host+j*d.cs) // back to refcount 0
		}
		d.mu.Unlock()
		return 0, err
	}
	for j, old := range olds {
		d.setEntry(t, ci+int64(j), uint64(host+int64(j)*d.cs)|entryCopied, 0)
		d.free(old)
	}
	d.mu.Unlock()
	return len(b), d.flushIfFull()
}

// ownedCluster reports whether the plain L2 entry e names an uncompressed
// host cluster that the image alone refers to.
func (d *Disk) ownedCluster(e uint64) bool {
	return e&entryCompressed == 0 && e&offsetMask != 0 && e&entryCopied != 0
}

// ownedData reports whether the plain L2 entry e names an uncompressed
// host cluster that the image alone refers to and that reads as what it
// holds: written in place.
func (d *Disk) ownedData(e uint64) bool {
	return d.ownedCluster(e) && (e&entryZero == 0 || d.h.Version < 3) && int64(e&offsetMask)%d.cs == 0
}

// prepareWrite handles a write of p at pos, inside one cluster. It returns
// the host offset to write p to, or -1 if it wrote p itself: then the write
// allocated, and copied what the cluster read as before around p. That
// copy-on-write is planned under d.mu, carried out without it, and its L2
// entry set under d.mu again; meanwhile the cluster is in flight, and
// writes and zeroes of it wait (see lockIdle), while reads still see the
// old entry.
func (d *Disk) prepareWrite(pos int64, p []byte) (int64, error) {
	ci := pos >> d.bits
	if err := d.lockWithL2(ci); err != nil {
		return 0, err
	}
	var host int64
	var c *cow
	var err error
	if d.h.extendedL2() {
		host, c, err = d.planWriteSub(pos, p)
	} else {
		host, c, err = d.planWrite(pos, p)
	}
	if err != nil || c == nil {
		d.mu.Unlock()
		return host, err
	}
	done := make(chan struct{})
	d.inflight[ci] = done
	d.mu.Unlock()

	err = c.work()

	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.inflight, ci)
	close(done)
	if err != nil {
		if c.fresh {
			d.w.pendingFree = append(d.w.pendingFree, c.host) // back to refcount 0
		}
		return 0, err
	}
	t, err := d.l2ForWrite(ci)
	if err != nil {
		return 0, err
	}
	d.setEntry(t, ci, c.entry, c.bm)
	if c.fresh {
		d.free(c.old)
	}
	return -1, nil
}

// A cow is a copy-on-write of one guest cluster, planned by planWrite or
// planWriteSub.
type cow struct {
	work      func() error // reads what the cluster held and writes the new data; without d.mu
	host      int64        // the host cluster written
	fresh     bool         // host was allocated for this write; old is freed once the entry is set
	old       uint64       // the L2 entry it replaces
	entry, bm uint64       // the L2 entry, and subcluster bitmap, it sets
}

// lockWithL2 locks d.mu as lockIdle does, with the metadata a write of
// guest cluster ci reads in the cache: its L2 table, the refcount blocks
// that count the next clusters allocated, and those that count the
// clusters of a table a snapshot shares (which the write copies). What is
// missing is read first, without d.mu, so that a slow image file does not
// stall every other request; should it be evicted again before the write
// gets to it, the write reads it under the lock.
func (d *Disk) lockWithL2(ci int64) error {
	for try := 0; ; try++ {
		d.lockIdle(ci)
		l1i := ci / d.l2n
		l2off := int64(d.l1[l1i] & offsetMask)
		var missing []int64
		if d.missingL2(l1i) != 0 {
			missing = append(missing, l2off)
		} else if d.mayAllocate(ci) {
			// An allocation takes at most a data cluster, an L2 table and
			// a refcount block.
			next := [2]int64{d.w.end, d.w.end + 2*d.cs}
			missing = d.refblocks(next[:], missing)
			if l2off != 0 && d.l1[l1i]&entryCopied == 0 {
				missing = d.refblocks(d.tableHosts(l2off), missing)
			}
		}
		if len(missing) == 0 || try == 2 {
			return nil
		}
		for i, off := range missing {
			if i > 0 {
				d.mu.Lock()
			}
			var err error
			if off == l2off {
				err = d.cacheTable(off, kindL2, func() bool { return int64(d.l1[l1i]&offsetMask) == l2off })
			} else {
				err = d.cacheTable(off, kindRefblock, func() bool { return true })
			}
			if err != nil {
				return err
			}
		}
	}
}

// mayAllocate reports whether a write of guest cluster ci may allocate:
// unless the image alone owns its L2 table and its data cluster.
//
// Preconditions: d.mu is held.
func (d *Disk) mayAllocate(ci int64) bool {
	l1e := d.l1[ci/d.l2n]
	if l1e&entryCopied == 0 || !d.meta.has(int64(l1e&offsetMask)) {
		return true
	}
	e, _, err := d.l2Entry(ci)
	return err != nil || e&entryCopied == 0 || e&entryCompressed != 0 || e&offsetMask == 0
}

// tableHosts returns the host clusters that the L2 table at off refers
// to, uncompressed, if the table is cached.
//
// Preconditions: d.mu is held.
func (d *Disk) tableHosts(off int64) []int64 {
	if !d.meta.has(off) || off%d.cs != 0 {
		return nil
	}
	t, _ := d.meta.get(off, kindL2, nil)
	var hosts []int64
	for j := range d.l2n {
		e := be.Uint64(t.data[d.entryOff(j):])
		if host := int64(e & offsetMask); e&entryCompressed == 0 && host != 0 {
			hosts = append(hosts, host)
		}
	}
	return hosts
}

// lockIdle locks d.mu once no copy-on-write of guest cluster ci is in
// flight.
func (d *Disk) lockIdle(ci int64) {
	for {
		d.mu.Lock()
		done, busy := d.inflight[ci]
		if !busy {
			return
		}
		d.mu.Unlock()
		<-done
	}
}

// planWrite plans a write of p at pos, inside one cluster of an image with
// plain L2 entries: it returns where to write p if the image owns the
// cluster, or else the copy-on-write that writes the whole cluster.
//
// Preconditions: d.mu is held.
func (d *Disk) planWrite(pos int64, p []byte) (int64, *cow, error) {
	ci, in := pos>>d.bits, pos&(d.cs-1)
	t, err := d.l2ForWrite(ci)
	if err != nil {
		return 0, nil, err
	}
	e, _ := d.entryIn(t, ci)
	host := int64(e & offsetMask)
	zero := e&entryCompressed == 0 && e&entryZero != 0 && d.h.Version >= 3 // bit 0 of a compressed entry is part of its offset
	owned := e&entryCompressed == 0 && host != 0 && e&entryCopied != 0
	if owned && host%d.cs != 0 {
		return 0, nil, corrupt(-1, "L2 entry %#x for guest offset %#x: host offset not cluster aligned", e, pos)
	}
	if owned && !zero {
		return host + in, nil, nil
	}
	c := &cow{old: e, host: host}
	if !owned { // an allocated zero cluster keeps its cluster, and drops the flag
		if c.host, err = d.alloc(1); err != nil {
			return 0, nil, err
		}
		c.fresh = true
	}
	c.entry = uint64(c.host) | entryCopied
	guest, size := ci<<d.bits, int64(d.h.Size)
	c.work = func() error {
		// The whole cluster: what it read as before, with p over it.
		buf := p
		if int64(len(p)) < d.cs {
			buf = make([]byte, d.cs)
			var err error
			switch {
			case zero:
			case e&entryCompressed != 0:
				err = d.readCompressed(buf, e, 0)
			case host != 0:
				err = d.readHost(buf, host)
			default:
				err = d.readBacking(buf[:min(d.cs, size-guest)], guest)
			}
			if err != nil {
				return err
			}
			copy(buf[in:], p)
		}
		_, err := d.c.WriteAt(buf, c.host)
		return err
	}
	return -1, c, nil
}

// WriteZeroesAt makes [off, off+n) read as zeroes: whole clusters by their
// L2 entry (the zero flag, or unallocated where nothing would show
// through), partial ones by writing zeroes. With ZeroMayUnmap the clusters
// are freed; without it, an allocated cluster keeps its allocation.
func (d *Disk) WriteZeroesAt(off, n int64, flags diskserve.ZeroFlags) error {
	if err := diskserve.CheckWrite(d, off, n); err != nil {
		return fmt.Errorf("write zeroes: %w", err)
	}
	d.markDirty(off, n)
	end := off + n
	unit := d.cs // what an L2 entry zeroes: a cluster, or a subcluster
	if d.h.extendedL2() {
		unit /= subclusters
	}
	wholeStart := (off + unit - 1) &^ (unit - 1)
	wholeEnd := end &^ (unit - 1)
	if end == d.Size() {
		wholeEnd = (end + unit - 1) &^ (unit - 1) // the disk's last unit may be partial
	}
	// Without the zero flag (version 2), clusters over a backing file can
	// only be zeroed by writing.
	canZeroClusters := d.h.Version >= 3 || d.backing == nil
	if flags&diskserve.ZeroFast != 0 && (!canZeroClusters || wholeStart != off || wholeEnd < end) {
		return fmt.Errorf("fast zero of %d bytes at %d: %w", n, off, diskserve.ErrUnsupported)
	}
	if wholeStart >= wholeEnd || !canZeroClusters {
		return diskserve.WriteZeroBytes(d, off, n)
	}
	if err := diskserve.WriteZeroBytes(d, off, wholeStart-off); err != nil {
		return err
	}
	for c := wholeStart; c < wholeEnd; {
		ci := c >> d.bits
		stop := min(wholeEnd, (ci+1)<<d.bits)
		subs := subRange((c-ci<<d.bits)/unit, (stop-1-ci<<d.bits)/unit)
		err := d.zeroCluster(ci, subs, flags&diskserve.ZeroMayUnmap != 0)
		if errors.Is(err, errPartlyCompressed) {
			err = diskserve.WriteZeroBytes(d, c, min(stop, end)-c)
		}
		if err == nil {
			err = d.flushIfFull()
		}
		if err != nil {
			return err
		}
		c = stop
	}
	return diskserve.WriteZeroBytes(d, wholeEnd, max(0, end-wholeEnd))
}

// PunchHole frees [off, off+n) where whole clusters allow, and makes all of
// it read as zeroes.
func (d *Disk) PunchHole(off, n int64) error {
	return d.WriteZeroesAt(off, n, diskserve.ZeroMayUnmap)
}

// zeroCluster makes guest cluster ci read as zeroes through its L2 entry;
// with extended L2 entries, its subclusters subs only.
func (d *Disk) zeroCluster(ci int64, subs uint32, unmap bool) error {
	if err := d.lockWithL2(ci); err != nil {
		return err
	}
	defer d.mu.Unlock()
	l1i := ci / d.l2n
	if d.l1[l1i]&offsetMask == 0 && d.backing == nil {
		return nil // unallocated with nothing behind it: zeroes already
	}
	if d.h.extendedL2() {
		return d.zeroSubclusters(ci, subs, unmap)
	}
	t, err := d.l2ForWrite(ci)
	if err != nil {
		return err
	}
	e, _ := d.entryIn(t, ci)
	host := int64(e & offsetMask)
	var next uint64
	switch {
	case d.h.Version >= 3 && !unmap && e&entryCompressed == 0 && host != 0 && e&entryCopied != 0:
		next = uint64(host) | entryCopied | entryZero // keep the allocation
	case d.h.Version >= 3 && d.backing != nil:
		next = entryZero // do not let the backing file show through
	}
	if next == e {
		return nil
	}
	d.setEntry(t, ci, next, 0)
	if next&offsetMask == 0 {
		d.free(e)
	}
	return nil
}

// Resize grows the virtual size, moving the L1 table to a larger place
// when it has to, or shrinks it (shrink).
func (d *Disk) Resize(size int64) error {
	if !d.writable() {
		return fmt.Errorf("resize: %w", diskserve.ErrReadOnly)
	}
	d.lockAll()
	defer d.unlockAll()
	switch {
	case len(d.bitmaps) > 0:
		return unsupported(-1, "resize: the image has persistent dirty bitmaps, which keep the disk's size; remove them first (qemu-img bitmap --remove)")
	case d.h.Version < 3 && len(d.snaps) > 0:
		return unsupported(60, "resize: a version 2 image with internal snapshots keeps its size (its snapshots need not record theirs; qemu refuses it too)")
	case size < int64(d.h.Size):
		return d.shrink(size)
	case size > maxVirtualSize:
		return fmt.Errorf("resize to %d bytes: more than %d: %w", size, int64(maxVirtualSize), diskserve.ErrOutOfRange)
	}
	need := ((size+d.cs-1)/d.cs + d.l2n - 1) / d.l2n
	if need > int64(len(d.l1)) {
		if need*8 > maxL1Bytes {
			return fmt.Errorf("resize to %d bytes: the L1 table would exceed %d bytes: %w", size, maxL1Bytes, diskserve.ErrUnsupported)
		}
		clusters := (need*8 + d.cs - 1) / d.cs
		off, err := d.alloc(clusters)
		if err != nil {
			return err
		}
		if err := d.flushLocked(); err != nil { // the new clusters' refcounts first
			return err
		}
		l1 := make([]uint64, need)
		copy(l1, d.l1)
		if err := writeEntries(d.c, l1, off); err != nil {
			return err
		}
		if err := diskserve.Flush(d.c); err != nil {
			return err
		}
		var b [12]byte
		be.PutUint32(b[0:], uint32(need))
		be.PutUint64(b[4:], uint64(off))
		if _, err := d.c.WriteAt(b[:], 36); err != nil {
			return fmt.Errorf("write header: %w", err)
		}
		oldOff, oldClusters := int64(d.h.L1TableOffset), (int64(d.h.L1Size)*8+d.cs-1)/d.cs
		d.l1, d.h.L1Size, d.h.L1TableOffset = l1, uint32(need), uint64(off)
		for k := range oldClusters {
			d.w.pendingFree = append(d.w.pendingFree, oldOff+k*d.cs)
		}
	}
	var b [8]byte
	be.PutUint64(b[:], uint64(size))
	if _, err := d.c.WriteAt(b[:], 24); err != nil {
		return fmt.Errorf("write header: %w", err)
	}
	d.h.Size = uint64(size)
	return d.flushLocked()
}
