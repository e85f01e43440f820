// Package qcow2 reads and writes qcow2 images, the format of qemu, as
// specified in docs/interop/qcow2.txt of the qemu project.
//
// # Supported
//
//   - Versions 2 and 3; cluster sizes from 512 B to 2 MiB; refcount widths
//     from 1 to 64 bits.
//   - Header extensions: the backing file format (0xE2792ACA), the
//     feature name table, which names unknown feature bits in errors, and
//     the bitmaps (0x23852875); others are skipped, and left as they are
//     when writing.
//   - The zero flag, plain and allocated: such clusters read as zeroes,
//     never as backing data or as what the host cluster holds. Write
//     zeroes and punch hole set it (or unallocate, where no backing file
//     would show through) instead of writing data.
//   - Compressed clusters, zlib (raw deflate) and zstd, with pooled
//     decoders and a small cache of decompressed clusters. A write into a
//     compressed cluster copies it to a new one and frees the old sectors.
//   - Extended L2 entries (32 subclusters per cluster), read and written:
//     writes allocate, copy on write and zero at subcluster granularity
//     (see subcluster.go).
//   - Persistent dirty bitmaps: listed, checked, read for NBD's
//     qemu:dirty-bitmap contexts, and the enabled ones kept up to date by
//     every write (see bitmap.go).
//   - Dirty images (lazy refcounts): opened for writing, their refcounts
//     are rebuilt first, as in qemu.
//   - Backing files, opened through the opener with the format the image
//     records, relative names taken relative to the image's directory;
//     reads past the end of a shorter backing file return zeroes, and
//     partial writes over it copy the rest of the cluster from it.
//   - Internal snapshots: listed by Describe, opened read-only through
//     [diskserve.Options.Snapshot], and created, applied and deleted as
//     qemu-img snapshot does (see snapshot.go); reads see the active layer.
//   - Allocation extents from the L1 and L2 tables, through to the backing
//     file, so NBD block status and `diskserve map` are exact.
//   - Writing with refcounts kept exact (qemu-img check finds no error and
//     no leak), copy-on-write of clusters whose COPIED flag is clear, a
//     refcount table that grows, and resize (grow). L2 tables that a
//     snapshot shares (COPIED clear in the L1 entry) are copied before
//     they change. Metadata reaches the file in crash-safe order on Flush;
//     see write.go.
//
// # Not supported
//
//   - Encryption (AES and LUKS), external data files, and unknown
//     incompatible features are refused with an error naming them.
//   - Writing images marked corrupt: they open read-only only.
//   - Resizing an image that has persistent dirty bitmaps.
//   - Resizing a version 2 image that has internal snapshots, as in qemu:
//     version 2 snapshots need not record their disk size.
//   - A backing file whose format the image does not record: probing it
//     could take a raw file a guest wrote for a qcow2 image, so it is
//     refused; `diskserve rebase -u -F FORMAT` (or qemu-img's) records the format.
//   - Reusing freed clusters while the image is open: the file grows by
//     appending, and freed clusters are punched out of it.
//
// # Concurrency
//
// Every method may be called concurrently. Metadata in memory (the L1
// table, the cache of L2 tables and refcount blocks, the allocator) is
// behind one mutex, which no file I/O of reads, writes and flushes holds:
// tables are read into the cache without it (cacheTable), copy-on-write
// runs without it with its cluster marked in flight (prepareWrite), and a
// flush writes copies of the dirty tables without it (flush.go). Only
// changes to the image's structure hold it across their I/O: snapshots,
// bitmap edits, check, resize, close. Clusters are never reused while the
// image is open, so a write that races with a discard of the same cluster
// cannot land in a cluster given to someone else.
package qcow2

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"sync"

	"golang.org/x/sync/singleflight"

	"github.com/diskserve/diskserve"
)

// Format is the qcow2 format for the opener.
var Format = diskserve.Format{Name: "qcow2", Magic: Magic, Open: open, Snapshots: true, Create: creator}

// L2 entry bits.
const (
	entryCopied     = 1 << 63
	entryCompressed = 1 << 62
	entryZero       = 1 << 0
	offsetMask      = 0x00ff_ffff_ffff_fe00 // bits 9-55: host offsets of L2 tables and clusters
)

// A Disk is an open qcow2 image.
type Disk struct {
	c         diskserve.DiskFile // the image file
	path      string
	cs        int64         // cluster size
	bits      uint          // cluster_bits
	l2n       int64         // entries per L2 table
	clust     *clusterCache // decompressed clusters
	backing   diskserve.DiskFile
	snaps     []snapshot
	snapBytes int64     // length of the snapshot table
	w         *writer   // the state of writing; nil when the image is open read-only
	bitmaps   []*bitmap // the persistent dirty bitmaps (see bitmap.go)
	tracked   []*bitmap // those of them that writes set; fixed at open

	// mu guards the metadata: the header's mutable fields, the L1 table,
	// the metadata cache and the writer's state. Data is read and written
	// outside it.
	mu    sync.Mutex
	h     *header
	l1    []uint64
	meta  *metaCache
	loads singleflight.Group // L2 tables being read outside mu, by offset
	// inflight holds the guest clusters whose copy-on-write runs outside
	// mu; each channel is closed when it is over (see prepareWrite).
	inflight map[int64]chan struct{}
	// flushMu is held by a flush from start to end, and by changes that
	// flush with mu held (see flush.go); it is taken before mu.
	flushMu sync.Mutex
}

var (
	_ diskserve.DiskFile     = (*Disk)(nil)
	_ diskserve.ExtentMapper = (*Disk)(nil)
	_ diskserve.Describer    = (*Disk)(nil)
)

func open(c diskserve.DiskFile, oc *diskserve.OpenContext) (_ diskserve.DiskFile, err error) {
	fileSize := c.Size()
	// The cluster size comes from the header; read enough to know it,
	// then the whole first cluster, which holds the extensions and the
	// backing file name.
	var fixed [v3HeaderLen]byte
	n, err := c.ReadAt(fixed[:min(int64(len(fixed)), fileSize)], 0)
	if err != nil && err != io.EOF {
		return nil, fmt.Errorf("read header: %w", err)
	}
	if n < 24 {
		return nil, corrupt(0, "header truncated: the file has %d bytes", fileSize)
	}
	bits := be.Uint32(fixed[20:])
	if bits < minClusterBits || bits > maxClusterBits {
		return nil, corrupt(20, "cluster_bits %d outside %d..%d", bits, minClusterBits, maxClusterBits)
	}
	cluster0 := make([]byte, min(int64(1)<<bits, fileSize))
	if err := diskserve.ReadFullAt(c, cluster0, 0); err != nil {
		return nil, fmt.Errorf("read header: %w", err)
	}
	h, err := parseHeader(cluster0, fileSize)
	if err != nil {
		return nil, err
	}
	d := &Disk{
		c:        c,
		path:     oc.Path(),
		h:        h,
		cs:       h.clusterSize(),
		bits:     uint(h.ClusterBits),
		l2n:      h.l2Entries(),
		meta:     newMetaCache(h.clusterSize(), oc.MetadataCache()),
		inflight: map[int64]chan struct{}{},
		clust:    newClusterCache(h.clusterSize()),
	}
	defer func() {
		if err != nil {
			if d.backing != nil {
				d.backing.Close()
			}
			d.meta.close()
		}
	}()
	if d.l1, err = readTable(c, h.L1TableOffset, h.L1Size); err != nil {
		return nil, fmt.Errorf("read L1 table: %w", err)
	}
	d.pinMetadata()
	if d.snaps, d.snapBytes, err = readSnapshots(c, h); err != nil {
		return nil, err
	}
	if d.bitmaps, err = readBitmaps(c, h, fileSize); err != nil {
		return nil, err
	}
	if name := oc.Snapshot(); name != "" {
		if err := d.useSnapshot(name, fileSize); err != nil {
			return nil, err
		}
	}
	if h.BackingFile != "" && !oc.NoBacking() {
		if h.BackingFormat == "" {
			return nil, unsupported(-1, "backing file %q has no recorded format: record it with diskserve rebase -u -b %q -F FORMAT (or qemu-img's)", h.BackingFile, h.BackingFile)
		}
		if d.backing, err = oc.OpenChild(h.BackingFile, h.BackingFormat, true); err != nil {
			return nil, fmt.Errorf("backing file: %w", err)
		}
	}
	// Last, as it changes the image (bitmaps marked in use, a dirty
	// image repaired): an open that fails leaves the image as it was.
	if !oc.ReadOnly() {
		if d.w, err = newWriter(d, fileSize); err != nil {
			return nil, err
		}
		if h.IncompatibleFeatures&incompatDirty != 0 {
			if err := d.repairDirty(oc.Logger()); err != nil {
				return nil, err
			}
		}
	}
	return d, nil
}

// pinMetadata asks a caching image file (a remote image's block cache)
// to keep the header, the L1 and refcount tables and every L2 table
// resident, since every read needs them.
func (d *Disk) pinMetadata() {
	diskserve.Pin(d.c, 0, d.cs)
	diskserve.Pin(d.c, int64(d.h.L1TableOffset), int64(d.h.L1Size)*8)
	diskserve.Pin(d.c, int64(d.h.RefcountTableOffset), int64(d.h.RefcountTableClusters)*d.cs)
	for _, e := range d.l1 {
		if off := int64(e & offsetMask); off != 0 {
			diskserve.Pin(d.c, off, d.cs)
		}
	}
}

// readTable reads n big-endian 64-bit entries at off.
func readTable(c diskserve.DiskFile, off uint64, n uint32) ([]uint64, error) {
	b := make([]byte, int64(n)*8)
	if err := diskserve.ReadFullAt(c, b, int64(off)); err != nil {
		return nil, err
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = be.Uint64(b[i*8:])
	}
	return t, nil
}

// Size returns the virtual size.
func (d *Disk) Size() int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return int64(d.h.Size)
}

// ReadOnly reports whether the image was opened read-only.
func (d *Disk) ReadOnly() bool { return !d.writable() }

// writable reports whether the image is open for writing.
func (d *Disk) writable() bool { return d.w != nil }

// Close flushes a writable image, stores the bitmaps it keeps, and closes
// the backing chain and the image file.
func (d *Disk) Close() error {
	var errs []error
	if d.writable() {
		d.lockAll()
		err := d.flushLocked()
		if err == nil {
			err = d.storeBitmaps()
		}
		if err == nil {
			err = d.trimFile()
		}
		d.unlockAll()
		errs = append(errs, err)
	}
	if d.backing != nil {
		errs = append(errs, d.backing.Close())
	}
	d.mu.Lock()
	d.meta.close()
	d.mu.Unlock()
	return errors.Join(append(errs, d.c.Close())...)
}

// A mapping is where the bytes of one guest range come from.
type mapping struct {
	kind mappingKind
	host int64  // host offset of the range's first byte: kindData; kindZero and kindBacking where the cluster keeps its space (else 0)
	l2e  uint64 // kindCompressed: the L2 entry
	n    int64  // length of the range
}

type mappingKind uint8

const (
	kindBacking    mappingKind = iota // not allocated here: the backing file, or zeroes
	kindZero                          // the zero flag
	kindData                          // stored verbatim at host
	kindCompressed                    // a compressed cluster
)

// mapAt returns how the guest bytes from off onwards are stored, for as
// far as one cluster (one subcluster with extended L2) stores them alike.
//
// Preconditions: d.mu is held.
func (d *Disk) mapAt(off int64) (mapping, error) {
	ci := off >> d.bits
	in := off & (d.cs - 1)
	clusterLeft := d.cs - in
	entry, bitmap, err := d.l2Entry(ci)
	if err != nil {
		return mapping{}, err
	}
	if entry&entryCompressed != 0 {
		return mapping{kind: kindCompressed, l2e: entry, n: clusterLeft}, nil
	}
	host := int64(entry & offsetMask)
	if host%d.cs != 0 {
		return mapping{}, corrupt(-1, "L2 entry %#x for guest offset %#x: host offset not cluster aligned", entry, off)
	}
	kept := host // where a zero cluster keeps its space
	if host != 0 {
		kept += in
	}
	if !d.h.extendedL2() {
		switch {
		case entry&entryZero != 0 && d.h.Version >= 3:
			return mapping{kind: kindZero, host: kept, n: clusterLeft}, nil
		case host != 0:
			return mapping{kind: kindData, host: host + in, n: clusterLeft}, nil
		case entry&entryCopied != 0:
			return mapping{}, corrupt(-1, "L2 entry %#x for guest offset %#x: data cluster at host offset 0", entry, off)
		}
		return mapping{kind: kindBacking, n: clusterLeft}, nil
	}
	// Extended L2: 32 subclusters, each allocated, zero, or neither.
	sub := d.cs / 32
	si := in / sub
	left := sub - in%sub
	alloc, zero := bitmap&(1<<si) != 0, bitmap&(1<<(32+si)) != 0
	switch {
	case alloc && zero:
		return mapping{}, corrupt(-1, "subcluster %d of guest cluster %#x is both allocated and zero", si, ci<<d.bits)
	case zero:
		return mapping{kind: kindZero, host: kept, n: left}, nil
	case alloc && host == 0:
		return mapping{}, corrupt(-1, "allocated subcluster %d of guest cluster %#x has host offset 0", si, ci<<d.bits)
	case alloc:
		return mapping{kind: kindData, host: host + in, n: left}, nil
	}
	return mapping{kind: kindBacking, host: kept, n: left}, nil
}

// l2Entry returns the L2 entry of guest cluster ci, and its subcluster
// bitmap when the image has extended L2 entries. An unallocated L2 table
// gives a zero entry.
//
// Preconditions: d.mu is held.
func (d *Disk) l2Entry(ci int64) (entry, bitmap uint64, err error) {
	l1i := ci / d.l2n
	if l1i >= int64(len(d.l1)) {
		return 0, 0, nil // checked against the size at open; unreachable
	}
	l2off := d.l1[l1i] & offsetMask
	if l2off == 0 {
		return 0, 0, nil
	}
	if l2off%uint64(d.cs) != 0 {
		return 0, 0, corrupt(int64(d.h.L1TableOffset)+l1i*8, "L2 table offset %#x not cluster aligned", l2off)
	}
	t, err := d.meta.get(int64(l2off), kindL2, d.loadTable)
	if err != nil {
		return 0, 0, err
	}
	i := ci % d.l2n
	if d.h.extendedL2() {
		return be.Uint64(t.data[i*16:]), be.Uint64(t.data[i*16+8:]), nil
	}
	return be.Uint64(t.data[i*8:]), 0, nil
}

// loadTable reads the metadata cluster (an L2 table or a refcount block)
// at off.
func (d *Disk) loadTable(off int64) ([]byte, error) {
	t := d.meta.buffer()
	if err := diskserve.ReadFullAt(d.c, t, off); err != nil {
		d.meta.slab.put(t)
		return nil, fmt.Errorf("read metadata cluster at %#x: %w", off, err)
	}
	return t, nil
}

// cacheL2 brings the L2 table that maps guest offset off into the
// metadata cache, reading it without holding d.mu (see cacheTable).
func (d *Disk) cacheL2(off int64) error {
	d.mu.Lock()
	l1i := off >> d.bits / d.l2n
	l2off := d.missingL2(l1i)
	if l2off == 0 {
		d.mu.Unlock()
		return nil // nothing to read, or mapAt reports the corruption
	}
	return d.cacheTable(l2off, kindL2, func() bool {
		return l1i < int64(len(d.l1)) && int64(d.l1[l1i]&offsetMask) == l2off
	})
}

// cacheTable brings the metadata cluster at off into the cache, reading
// it without holding d.mu: a slow image file (a remote image, a cold disk)
// then stalls only the requests that need this table, not every request.
// Concurrent misses of one table share one read. The table is cached only
// if current still holds and no table was written back while it was read
// (the read may have seen a write half done); else the next lookup reads
// it under the lock.
//
// Preconditions: d.mu is held; cacheTable releases it.
func (d *Disk) cacheTable(off int64, kind tableKind, current func() bool) error {
	if d.meta.has(off) {
		d.mu.Unlock()
		return nil
	}
	writebacks := d.meta.writebacks
	d.mu.Unlock()
	// The goroutine that reads the table caches it; the others wait for
	// it, and never hold the buffer, which the cache recycles once it
	// evicts the table.
	_, err, _ := d.loads.Do(strconv.FormatInt(off, 10), func() (any, error) {
		t, err := d.loadTable(off)
		if err != nil {
			return nil, err
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.meta.writebacks == writebacks && !d.meta.has(off) && current() {
			d.meta.add(off, kind, t, false)
		} else {
			d.meta.slab.put(t)
		}
		return nil, nil
	})
	return err
}

// cacheRefblocks brings the refcount blocks that count the host clusters
// hosts into the cache, reading them without holding d.mu.
//
// Preconditions: d.mu is not held; the image is writable.
func (d *Disk) cacheRefblocks(hosts []int64) error {
	d.mu.Lock()
	offs := d.refblocks(hosts, nil)
	d.mu.Unlock()
	for _, off := range offs {
		d.mu.Lock()
		if err := d.cacheTable(off, kindRefblock, func() bool { return true }); err != nil {
			return err
		}
	}
	return nil
}

// refblocks appends to dst the offsets of the refcount blocks that count
// hosts and are not in the cache, each once.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) refblocks(hosts []int64, dst []int64) []int64 {
	w := d.w
	first := len(dst)
	for _, host := range hosts {
		bi := host >> d.bits / w.perBlock
		if bi >= int64(len(w.rt)) {
			continue
		}
		off := int64(w.rt[bi] & refTableMask)
		if off != 0 && off%d.cs == 0 && !d.meta.has(off) && !slices.Contains(dst[first:], off) {
			dst = append(dst, off)
		}
	}
	return dst
}

// lockedMapAt is mapAt for callers that do not hold d.mu.
// The table it needs is read without d.mu; should that read be discarded
// (see cacheTable), it is tried again before mapAt reads it under the lock.
func (d *Disk) lockedMapAt(off int64) (mapping, error) {
	for try := 0; ; try++ {
		if err := d.cacheL2(off); err != nil {
			return mapping{}, err
		}
		d.mu.Lock()
		if try == 2 || d.missingL2(off>>d.bits/d.l2n) == 0 {
			defer d.mu.Unlock()
			return d.mapAt(off)
		}
		d.mu.Unlock()
	}
}

// missingL2 returns the offset of the L2 table of L1 entry l1i if it is to
// be read into the cache, or else 0.
//
// Preconditions: d.mu is held.
func (d *Disk) missingL2(l1i int64) int64 {
	if l1i >= int64(len(d.l1)) {
		return 0
	}
	off := int64(d.l1[l1i] & offsetMask)
	if off == 0 || off%d.cs != 0 || d.meta.has(off) {
		return 0
	}
	return off
}

// ReadAt reads the guest bytes at off. Host ranges that follow each other
// are read in one call.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(d.Size(), off, p)
	if len(p) == 0 {
		return 0, eof
	}
	var run mapping // pending verbatim range, not yet read
	runBuf := p[:0]
	for done := int64(0); done < int64(len(p)); {
		m, err := d.lockedMapAt(off + done)
		if err != nil {
			return int(done), err
		}
		m.n = min(m.n, int64(len(p))-done)
		dst := p[done : done+m.n]
		if m.kind == kindData && run.n > 0 && run.host+run.n == m.host {
			run.n += m.n
			runBuf = p[done-int64(len(runBuf)) : done+m.n]
			done += m.n
			continue
		}
		if run.n > 0 {
			if err := d.readHost(runBuf, run.host); err != nil {
				return int(done) - len(runBuf), err
			}
			run.n = 0
		}
		switch m.kind {
		case kindData:
			run, runBuf = m, dst
		case kindZero:
			clear(dst)
		case kindBacking:
			err = d.readBacking(dst, off+done)
		case kindCompressed:
			err = d.readCompressed(dst, m.l2e, (off+done)&(d.cs-1))
		}
		if err != nil {
			return int(done), err
		}
		done += m.n
	}
	if run.n > 0 {
		if err := d.readHost(runBuf, run.host); err != nil {
			return len(p) - len(runBuf), err
		}
	}
	return len(p), eof
}

// readHost reads clusters stored verbatim. Clusters past the end of the
// file (preallocated metadata without data) read as zeroes, as in qemu.
func (d *Disk) readHost(p []byte, host int64) error {
	n, err := d.c.ReadAt(p, host)
	if n == len(p) || err == io.EOF {
		clear(p[n:])
		return nil
	}
	return fmt.Errorf("read host cluster at %#x: %w", host, err)
}

// readBacking reads guest bytes that this image does not hold: from the
// backing file, and zeroes past its end or without one.
func (d *Disk) readBacking(p []byte, off int64) error {
	if d.backing == nil {
		clear(p)
		return nil
	}
	n := max(0, min(int64(len(p)), d.backing.Size()-off))
	if n > 0 {
		got, err := d.backing.ReadAt(p[:n], off)
		if int64(got) < n {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("backing file: %w", err)
		}
	}
	clear(p[n:])
	return nil
}

// AppendDepths reports depth 1 where the L2 tables map a range (data,
// compressed or zero), and elsewhere the backing file's depths, one
// deeper; past the backing file's end, the backing file's own depth (it
// reads as zeroes there, as qemu reports it); 0 without a backing file.
func (d *Disk) AppendDepths(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	end := off + n
	var below []diskserve.Extent
	for pos := off; pos < end; {
		var m mapping
		if span := d.l2n << d.bits; d.l2Unallocated(pos) {
			// An unallocated L2 table leaves its whole span to the
			// backing file.
			m = mapping{kind: kindBacking, n: (pos/span+1)*span - pos}
		} else {
			var err error
			if m, err = d.lockedMapAt(pos); err != nil {
				return dst, err
			}
		}
		m.n = min(m.n, end-pos)
		if m.kind != kindBacking {
			dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: pos, Len: m.n, Flags: 1})
			pos += m.n
			continue
		}
		var held int64 // by the backing file, within its size
		if d.backing != nil {
			held = max(0, min(d.backing.Size()-pos, m.n))
			if held > 0 {
				var err error
				if below, err = diskserve.AllocationDepths(d.backing, below[:0], pos, held); err != nil {
					return dst, err
				}
				for _, e := range below {
					if e.Flags != 0 {
						e.Flags++
					}
					dst = diskserve.AppendExtent(dst, e)
				}
			}
			if held < m.n {
				dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: pos + held, Len: m.n - held, Flags: 2})
			}
		} else {
			dst = diskserve.AppendExtent(dst, diskserve.Extent{Off: pos, Len: m.n})
		}
		pos += m.n
	}
	return dst, nil
}

// AppendExtents reports data, zeroes and unallocated ranges from the L2
// tables; unallocated ranges take the backing file's extents.
func (d *Disk) AppendExtents(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
	end := off + n
	add := func(e diskserve.Extent) {
		dst = diskserve.AppendExtent(dst, e)
	}
	for pos := off; pos < end; {
		// An unallocated L2 table leaves its whole span to the backing
		// file: skip it in one step, which keeps huge sparse images fast.
		span := d.l2n << d.bits
		if d.l2Unallocated(pos) {
			next := min(end, (pos/span+1)*span)
			if err := d.backingExtents(add, pos, next-pos); err != nil {
				return dst, err
			}
			pos = next
			continue
		}
		m, err := d.lockedMapAt(pos)
		if err != nil {
			return dst, err
		}
		m.n = min(m.n, end-pos)
		switch m.kind {
		case kindBacking:
			err = d.backingExtents(add, pos, m.n)
		case kindZero:
			add(diskserve.Extent{Off: pos, Len: m.n, Flags: diskserve.ExtentHole | diskserve.ExtentZero})
		default:
			add(diskserve.Extent{Off: pos, Len: m.n})
		}
		if err != nil {
			return dst, err
		}
		pos += m.n
	}
	return dst, nil
}

// l2Unallocated reports whether the L2 table that maps off is unallocated.
func (d *Disk) l2Unallocated(off int64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	l1i := off >> d.bits / d.l2n
	return l1i < int64(len(d.l1)) && d.l1[l1i]&offsetMask == 0
}

// backingExtents adds the extents of an unallocated range: the backing
// file's where it has data, a zero hole elsewhere.
func (d *Disk) backingExtents(add func(diskserve.Extent), off, n int64) error {
	hole := diskserve.ExtentHole | diskserve.ExtentZero
	covered := int64(0)
	if d.backing != nil {
		covered = max(0, min(n, d.backing.Size()-off))
	}
	if covered > 0 {
		ext, err := diskserve.Extents(d.backing, nil, off, covered)
		if err != nil {
			return fmt.Errorf("backing file: %w", err)
		}
		for _, e := range ext {
			add(e)
		}
	}
	if covered < n {
		add(diskserve.Extent{Off: off + covered, Len: n - covered, Flags: hole})
	}
	return nil
}

// Describe reports the image's header facts, its snapshots and its
// backing chain.
func (d *Disk) Describe(info *diskserve.Info) {
	d.mu.Lock()
	defer d.mu.Unlock()
	h := d.h
	info.Format = Format.Name
	info.Filename = d.path
	info.ClusterSize = d.cs
	info.BackingFile = h.BackingFile
	info.BackingFormat = h.BackingFormat
	info.Dirty = h.IncompatibleFeatures&incompatDirty != 0
	compat := "1.1"
	if h.Version == 2 {
		compat = "0.10"
	}
	ct := "zlib"
	if h.CompressionType == compressionZstd {
		ct = "zstd"
	}
	info.Specific = map[string]any{"compat": compat, "refcount-bits": 1 << h.RefcountOrder, "compression-type": ct}
	if h.Version >= 3 {
		info.Specific["lazy-refcounts"] = h.CompatibleFeatures&compatLazyRefcounts != 0
		info.Specific["corrupt"] = h.IncompatibleFeatures&incompatCorrupt != 0
		info.Specific["extended-l2"] = d.h.extendedL2()
		if bms := d.bitmapInfo(); len(bms) > 0 {
			info.Specific["bitmaps"] = bms
		}
	}
	for _, s := range d.snaps {
		info.Snapshots = append(info.Snapshots, s.info())
	}
	if d.backing != nil {
		b := diskserve.Describe(d.backing)
		info.Backing = &b
	}
}
