package qcow2

import "errors"

// Writing images with extended L2 entries (docs/interop/qcow2.txt,
// "Extended L2 Entries"). Each cluster has 32 subclusters, each
// allocated (its data at the same place in the host cluster), zero, or
// neither (it reads from the backing file). A write allocates and copies
// at subcluster granularity: a 4 KiB write into an unallocated 64 KiB
// cluster of an overlay writes 4 KiB, where a plain L2 entry would copy the
// other 60 KiB from the backing file first. The host cluster is reserved
// whole, as qemu does, and the subclusters a write does not touch keep
// their state.

const (
	subclusters = 32
	allSubs     = 1<<subclusters - 1
)

// errPartlyCompressed says that a subcluster range of a compressed cluster
// cannot be changed through the L2 entry (a compressed cluster has no
// subcluster bitmap): the caller writes it instead.
var errPartlyCompressed = errors.New("zeroing part of a compressed cluster")

// entryOff is where entry j lies in an L2 table: 16 bytes apart with
// extended L2 entries, 8 otherwise.
func (d *Disk) entryOff(j int64) int64 {
	if d.h.extendedL2() {
		return j * 16
	}
	return j * 8
}

// entryIn returns the L2 entry of guest cluster ci in its table t, and its
// subcluster bitmap (0 without extended L2 entries).
func (d *Disk) entryIn(t *metaTable, ci int64) (e, bm uint64) {
	at := d.entryOff(ci % d.l2n)
	if d.h.extendedL2() {
		bm = be.Uint64(t.data[at+8:])
	}
	return be.Uint64(t.data[at:]), bm
}

// setEntry sets the L2 entry of guest cluster ci in its table t, and with
// extended L2 entries its subcluster bitmap bm.
//
// Preconditions: d.mu is held.
func (d *Disk) setEntry(t *metaTable, ci int64, e, bm uint64) {
	at := d.entryOff(ci % d.l2n)
	be.PutUint64(t.data[at:], e)
	if d.h.extendedL2() {
		be.PutUint64(t.data[at+8:], bm)
	}
	d.meta.markDirty(t)
}

// subRange returns the bitmap of subclusters first..last.
func subRange(first, last int64) uint32 {
	return uint32(allSubs >> (subclusters - 1 - (last - first)) << first)
}

// checkSubclusters refuses a subcluster bitmap that the format forbids.
func (d *Disk) checkSubclusters(e, bm uint64, pos int64) error {
	alloc, zero := uint32(bm), uint32(bm>>32)
	switch {
	case e&entryCompressed != 0 && bm != 0:
		return corrupt(-1, "compressed cluster at guest offset %#x has subcluster bitmap %#x", pos&^(d.cs-1), bm)
	case alloc&zero != 0:
		return corrupt(-1, "subclusters %#x of guest cluster %#x are both allocated and zero", alloc&zero, pos&^(d.cs-1))
	case e&entryCompressed == 0 && alloc != 0 && e&offsetMask == 0:
		return corrupt(-1, "guest cluster %#x has allocated subclusters %#x and no host cluster", pos&^(d.cs-1), alloc)
	case e&entryCompressed == 0 && e&offsetMask%uint64(d.cs) != 0:
		return corrupt(-1, "L2 entry %#x for guest offset %#x: host offset not cluster aligned", e, pos)
	}
	return nil
}

// planWriteSub is planWrite for an image with extended L2 entries: only
// the subclusters p touches become allocated, and of those not allocated
// yet, the parts p does not cover are filled with what they read as
// before (zeroes or the backing file).
//
// Preconditions: d.mu is held.
func (d *Disk) planWriteSub(pos int64, p []byte) (int64, *cow, error) {
	ci, in := pos>>d.bits, pos&(d.cs-1)
	t, err := d.l2ForWrite(ci)
	if err != nil {
		return 0, nil, err
	}
	e, bm := d.entryIn(t, ci)
	if err := d.checkSubclusters(e, bm, pos); err != nil {
		return 0, nil, err
	}
	if e&entryCompressed != 0 {
		c := d.planRewriteCompressed(e, in, p)
		c.old, c.bm = e, allSubs
		if err := d.allocCow(c); err != nil {
			return 0, nil, err
		}
		return -1, c, nil
	}
	sub := d.cs / subclusters
	first, last := in/sub, (in+int64(len(p))-1)/sub
	touched := subRange(first, last)
	alloc, zero := uint32(bm), uint32(bm>>32)
	host := int64(e & offsetMask)
	owned := host != 0 && e&entryCopied != 0
	if owned && alloc&touched == touched {
		return host + in, nil, nil
	}
	c := &cow{old: e, host: host, entry: e, bm: uint64(alloc|touched) | uint64(zero&^touched)<<32}
	var shared uint32 // allocated subclusters to copy from a cluster a snapshot shares
	if !owned {
		shared = alloc &^ touched
		if host == 0 {
			shared = 0
		}
		if err := d.allocCow(c); err != nil {
			return 0, nil, err
		}
	}
	guest, size := ci<<d.bits, int64(d.h.Size)
	c.work = func() error {
		for s := range int64(subclusters) {
			if shared&(1<<s) == 0 {
				continue
			}
			buf := make([]byte, sub)
			if err := d.readHost(buf, host+s*sub); err != nil {
				return err
			}
			if _, err := d.c.WriteAt(buf, c.host+s*sub); err != nil {
				return err
			}
		}
		// The rest of the edge subclusters p covers in part, unless
		// they are allocated in c.host already (then their other bytes
		// stay: a concurrent write may be putting its own there).
		fill := func(s, from, to int64) error {
			if from == to || owned && alloc&(1<<s) != 0 {
				return nil
			}
			buf := make([]byte, sub)
			if err := d.readSubcluster(buf, guest, size, s, host, alloc, zero); err != nil {
				return err
			}
			_, err := d.c.WriteAt(buf[from-s*sub:to-s*sub], c.host+from)
			return err
		}
		if err := fill(first, first*sub, in); err != nil {
			return err
		}
		if err := fill(last, in+int64(len(p)), (last+1)*sub); err != nil {
			return err
		}
		_, err := d.c.WriteAt(p, c.host+in)
		return err
	}
	return -1, c, nil
}

// allocCow gives copy-on-write c a new host cluster, which its entry
// points to.
//
// Preconditions: d.mu is held.
func (d *Disk) allocCow(c *cow) error {
	host, err := d.alloc(1)
	if err != nil {
		return err
	}
	c.host, c.fresh = host, true
	c.entry = uint64(host) | entryCopied
	return nil
}

// readSubcluster reads what subcluster s of the guest cluster at guest
// (of a disk of size bytes) reads as: from host if allocated, zeroes if
// zero, else the backing file.
func (d *Disk) readSubcluster(buf []byte, guest, size, s, host int64, alloc, zero uint32) error {
	sub := int64(len(buf))
	switch {
	case alloc&(1<<s) != 0:
		return d.readHost(buf, host+s*sub)
	case zero&(1<<s) != 0:
		clear(buf)
		return nil
	}
	at := guest + s*sub
	return d.readBacking(buf[:max(0, min(sub, size-at))], at)
}

// planRewriteCompressed returns the work of writing p at in into the
// compressed cluster of L2 entry e: the whole cluster, decompressed with p
// over it, goes into c.host, a new cluster.
func (d *Disk) planRewriteCompressed(e uint64, in int64, p []byte) *cow {
	c := &cow{}
	c.work = func() error {
		buf := make([]byte, d.cs)
		if err := d.readCompressed(buf, e, 0); err != nil {
			return err
		}
		copy(buf[in:], p)
		_, err := d.c.WriteAt(buf, c.host)
		return err
	}
	return c
}

// zeroSubclusters makes the subclusters subs of guest cluster ci read as
// zeroes through its L2 entry. A whole cluster loses its host cluster
// with unmap, or when it is not the image's alone; part of one keeps it.
// Without a backing file, unallocated subclusters read as zeroes already.
//
// Preconditions: d.mu is held.
func (d *Disk) zeroSubclusters(ci int64, subs uint32, unmap bool) error {
	t, err := d.l2ForWrite(ci)
	if err != nil {
		return err
	}
	e, bm := d.entryIn(t, ci)
	if err := d.checkSubclusters(e, bm, ci<<d.bits); err != nil {
		return err
	}
	host := int64(e & offsetMask)
	compressed := e&entryCompressed != 0
	next, nbm := e, bm
	switch {
	case subs != allSubs && compressed:
		return errPartlyCompressed
	case subs != allSubs:
		nbm = uint64(uint32(bm)&^subs) | uint64(uint32(bm>>32)|subs)<<32
	case !unmap && !compressed && host != 0 && e&entryCopied != 0:
		next, nbm = e, uint64(allSubs)<<32 // keep the allocation
	case d.backing != nil:
		next, nbm = 0, uint64(allSubs)<<32
	default:
		next, nbm = 0, 0
	}
	if next == e && nbm == bm {
		return nil
	}
	d.setEntry(t, ci, next, nbm)
	if next&offsetMask == 0 && host != 0 || compressed && next != e {
		d.free(e)
	}
	return nil
}
