package qcow2

import (
	"errors"
	"fmt"
	"slices"

	"github.com/diskserve/diskserve"
)

// amend changes the options of an open image, as qemu-img amend does:
// lazy_refcounts, size (through Resize), compat (1.1 to 0.10 and back),
// refcount_bits, and the recorded backing_file and backing_fmt (which
// qemu-img 7.2 refuses: the change is rebase -u's, the data is not
// touched). Options
// only creation sets (cluster_size, extended_l2, compression_type,
// preallocation) are refused, as are changes diskserve does not make yet
// (a downgrade of an image with bitmaps), all before anything changes. A
// downgrade expands zero clusters first, as qemu's; refcount_bits
// rewrites the refcount structures (setRefcountBits).
func amend(dd diskserve.DiskFile, o diskserve.CreateOptions) error {
	d, ok := unwrapDisk(dd)
	if !ok || !d.writable() {
		return errors.New("amend: the image is not open read-write as qcow2")
	}
	for _, name := range []string{"cluster_size", "extended_l2", "compression_type", "preallocation"} {
		if _, ok := o[name]; ok {
			return fmt.Errorf("invalid parameter %q: this option is only supported for image creation", name)
		}
	}
	for name := range o {
		if !slices.Contains([]string{"compat", "lazy_refcounts", "size", "refcount_bits", "backing_file", "backing_fmt"}, name) {
			return fmt.Errorf("invalid parameter %q", name)
		}
	}
	width := 1 << d.h.RefcountOrder
	if _, ok := o["refcount_bits"]; ok {
		var err error
		if width, err = o.Int("refcount_bits", width); err != nil {
			return err
		}
		if width <= 0 || width&(width-1) != 0 || width > 64 {
			return fmt.Errorf("refcount_bits %d is not a power of two up to 64", width)
		}
	}
	version := d.h.Version
	switch c := o.String("compat", ""); c {
	case "":
	case "1.1", "v3":
		version = 3
	case "0.10", "v2":
		version = 2
	default:
		return fmt.Errorf("compat must be 0.10 or 1.1, not %q", c)
	}
	lazy := d.h.CompatibleFeatures&compatLazyRefcounts != 0
	if _, ok := o["lazy_refcounts"]; ok {
		var err error
		if lazy, err = o.Bool("lazy_refcounts", false); err != nil {
			return err
		}
	}
	if lazy && version < 3 {
		return errors.New("lazy refcounts only supported with compatibility level 1.1 and above")
	}
	if width != 16 && version < 3 {
		return errors.New("different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
	}
	size := int64(d.h.Size)
	if _, ok := o["size"]; ok {
		var err error
		if size, err = o.Size("size", size); err != nil {
			return err
		}
	}
	_, setName := o["backing_file"]
	_, setFmt := o["backing_fmt"]

	if version == 2 && d.h.Version == 3 {
		if err := d.canDowngrade(width); err != nil {
			return err
		}
	}
	if size != int64(d.h.Size) {
		if err := d.Resize(size); err != nil {
			return err
		}
	}
	d.lockAll()
	defer d.unlockAll()
	if version == 2 && d.h.Version == 3 {
		if err := d.expandZeroClusters(); err != nil {
			return err
		}
	}
	if version != d.h.Version && version == 3 {
		if err := d.setVersion(version); err != nil {
			return err
		}
	}
	if width != 1<<d.h.RefcountOrder {
		if err := d.setRefcountBits(uint(width)); err != nil {
			return err
		}
	}
	if version != d.h.Version {
		if err := d.setVersion(version); err != nil {
			return err
		}
	}
	if lazy != (d.h.CompatibleFeatures&compatLazyRefcounts != 0) {
		v := d.h.CompatibleFeatures &^ compatLazyRefcounts
		if lazy {
			v |= compatLazyRefcounts
		}
		if err := d.setFeatures(&d.h.CompatibleFeatures, 80, v); err != nil {
			return err
		}
	}
	if setName || setFmt {
		name, fmtName := o.String("backing_file", d.h.BackingFile), o.String("backing_fmt", d.h.BackingFormat)
		if name == "" {
			fmtName = ""
		}
		var first []extension
		if fmtName != "" {
			first = append(first, extension{extBackingFormat, []byte(fmtName)})
		}
		if err := d.rewriteHeader(nil, func(typ uint32) bool { return typ != extBackingFormat }, first, name); err != nil {
			return err
		}
	}
	return nil
}

// unwrapDisk finds the qcow2 Disk under the wrappers of d.
func unwrapDisk(d diskserve.DiskFile) (*Disk, bool) {
	for {
		switch v := d.(type) {
		case *Disk:
			return v, true
		case diskserve.Wrapper:
			d = v.Unwrap()
		default:
			return nil, false
		}
	}
}

// canDowngrade refuses what a version 2 image cannot hold: features of
// version 3 in use (zero clusters it can hold once expanded:
// expandZeroClusters), refcounts of width bits other than 16.
func (d *Disk) canDowngrade(width int) error {
	switch {
	case d.h.IncompatibleFeatures&^incompatDirty != 0:
		return errors.New("compat=0.10: the image uses features of version 3 (extended L2 entries, zstd compression or an external data file) that version 2 cannot hold")
	case d.h.IncompatibleFeatures&incompatDirty != 0:
		return errors.New("compat=0.10: the image is dirty (lazy refcounts); open it read-write once to repair it")
	case width != 16:
		return fmt.Errorf("compat=0.10: version 2 has 16-bit refcounts, not %d-bit ones (add refcount_bits=16)", width)
	case len(d.bitmaps) > 0:
		return errors.New("compat=0.10: version 2 keeps no dirty bitmaps: remove them first (diskserve bitmap --remove)")
	}
	return nil
}

// expandZeroClusters rewrites every zero cluster of the image, its
// snapshots' included, as version 2 can read it, as qemu does before a
// downgrade: unallocated, when nothing lies below; otherwise a cluster of
// zeroes: the one it had, when no other table shares it, or a new one,
// counted as often as its L2 table is (the one shared loses as many
// references once the tables are written). The new clusters' zeroes and
// refcounts reach the file before the tables that name them.
//
// Preconditions: lockAll is held; the image is writable.
func (d *Disk) expandZeroClusters() error {
	trees := [][]uint64{d.l1}
	for _, sn := range d.snaps {
		_, l1, err := d.snapshotState(sn, d.c.Size())
		if err != nil {
			return err
		}
		trees = append(trees, l1)
	}
	for _, l1 := range trees {
		err := d.eachL2(l1, func(_ int, t *metaTable) error {
			shares, err := d.refcount(t.off)
			if err != nil {
				return err
			}
			for j := int64(0); j < d.l2n; j++ {
				e := be.Uint64(t.data[d.entryOff(j):])
				if e&entryZero == 0 {
					continue
				}
				host := int64(e & offsetMask)
				owned := false // the cluster is this table's alone
				if host != 0 {
					rc, err := d.refcount(host)
					if err != nil {
						return err
					}
					owned = rc == shares
				}
				switch {
				case host == 0 && d.h.BackingFile == "":
					e = 0
				case host != 0 && owned:
					if err := diskserve.WriteZeroBytes(d.c, host, d.cs); err != nil {
						return err
					}
					e &^= entryZero
				default:
					// A cluster of zeroes of the table's own, in place of
					// none or of one another table shares.
					n, err := d.alloc(1)
					if err != nil {
						return err
					}
					if err := d.setRefcount(n, shares); err != nil {
						return err
					}
					if err := diskserve.WriteZeroBytes(d.c, n, d.cs); err != nil {
						return err
					}
					for k := uint64(0); host != 0 && k < shares; k++ { // the old cluster loses this table's references
						d.w.pendingFree = append(d.w.pendingFree, host)
					}
					e = uint64(n)
					if shares == 1 {
						e |= entryCopied
					}
				}
				d.setEntry(t, j, e, 0)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return d.flushLocked()
}

// setVersion rewrites the header as version 2 (72 bytes, without the
// feature name table) or version 3 (112 bytes: no features, 16-bit
// refcounts, zlib).
//
// Preconditions: lockAll is held; the image is writable; for version 2,
// canDowngrade passed.
func (d *Disk) setVersion(version uint32) error {
	old := make([]byte, d.h.HeaderLength)
	if err := diskserve.ReadFullAt(d.c, old, 0); err != nil {
		return fmt.Errorf("read header: %w", err)
	}
	keep := func(uint32) bool { return true }
	fixed := make([]byte, v2HeaderLen)
	copy(fixed, old[:v2HeaderLen])
	if version == 3 {
		fixed = append(fixed, make([]byte, 112-v2HeaderLen)...)
		be.PutUint32(fixed[96:], 4)    // refcount_order
		be.PutUint32(fixed[100:], 112) // header_length
	} else {
		keep = func(typ uint32) bool { return typ != extFeatureNames }
	}
	be.PutUint32(fixed[4:], version)
	name := d.h.BackingFile
	return d.rewriteHeader(fixed, keep, nil, name)
}
