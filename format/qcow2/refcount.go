package qcow2

import "fmt"

// refTableMask keeps bits 9-63 of a refcount table entry: the offset of a
// refcount block.
const refTableMask = ^uint64(0x1ff)

// refcount returns the refcount of the host cluster at host.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) refcount(host int64) (uint64, error) { return d.refcountIn(d.w, host) }

// refcountIn returns the refcount of the host cluster at host, with the
// refcount table and widths of w.
//
// Preconditions: d.mu is held.
func (d *Disk) refcountIn(w *writer, host int64) (uint64, error) {
	ci := host >> d.bits
	bi := ci / w.perBlock
	if bi >= int64(len(w.rt)) || w.rt[bi]&refTableMask == 0 {
		return 0, nil
	}
	off := int64(w.rt[bi] & refTableMask)
	if off%d.cs != 0 {
		return 0, corrupt(int64(d.h.RefcountTableOffset)+bi*8, "refcount block offset %#x not cluster aligned", off)
	}
	t, err := d.meta.get(off, kindRefblock, d.loadTable)
	if err != nil {
		return 0, err
	}
	return getRefcount(t.data, ci%w.perBlock, w.bits), nil
}

// setRefcount sets the refcount of the host cluster at host, adding a
// refcount block (and growing the refcount table) where there is none.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) setRefcount(host int64, v uint64) error {
	w := d.w
	if w.bits < 64 && v >= 1<<w.bits {
		return fmt.Errorf("refcount of cluster %#x would overflow %d bits", host, w.bits)
	}
	ci := host >> d.bits
	bi := ci / w.perBlock
	if bi >= int64(len(w.rt)) {
		if err := d.growRefTable(bi + 1); err != nil {
			return err
		}
	}
	var t *metaTable
	if w.rt[bi]&refTableMask == 0 {
		// A new block, placed at the end of the file; its own cluster is
		// counted like any other, possibly in itself.
		rb := d.reserve(1)
		t = d.meta.add(rb, kindRefblock, d.meta.buffer(), true)
		w.rt[bi] = uint64(rb)
		w.rtDirty = true
		if err := d.setRefcount(rb, 1); err != nil {
			return err
		}
	} else {
		var err error
		if t, err = d.meta.get(int64(w.rt[bi]&refTableMask), kindRefblock, d.loadTable); err != nil {
			return err
		}
	}
	putRefcount(t.data, ci%w.perBlock, w.bits, v)
	d.meta.markDirty(t)
	return nil
}

// growRefTable moves the refcount table to a larger place at the end of
// the file, so that it has at least need entries. The header points to it
// from the next flush on, and the old table is freed after that.
//
// Preconditions: d.mu is held; the image is writable.
func (d *Disk) growRefTable(need int64) error {
	w := d.w
	perCluster := d.cs / 8
	n := (max(need, 2*int64(len(w.rt))) + perCluster - 1) / perCluster * perCluster
	clusters := n / perCluster
	if clusters*d.cs > maxRefTableBytes {
		return fmt.Errorf("the refcount table would grow past %d bytes", maxRefTableBytes)
	}
	oldOff, oldClusters := int64(d.h.RefcountTableOffset), int64(d.h.RefcountTableClusters)
	rt := make([]uint64, n)
	copy(rt, w.rt)
	w.rt = rt
	off := d.reserve(clusters)
	d.h.RefcountTableOffset, d.h.RefcountTableClusters = uint64(off), uint32(clusters)
	w.rtDirty, w.rtMoved = true, true
	for k := range clusters {
		if err := d.setRefcount(off+k*d.cs, 1); err != nil {
			return err
		}
	}
	for k := range oldClusters {
		w.pendingFree = append(w.pendingFree, oldOff+k*d.cs)
	}
	return nil
}

// getRefcount reads entry i of a refcount block of bits-wide entries:
// big-endian for 8 bits and more, packed from the least significant bit
// of each byte for fewer.
func getRefcount(b []byte, i int64, bits uint) uint64 {
	if bits >= 8 {
		var v uint64
		for _, c := range b[i*int64(bits/8) : (i+1)*int64(bits/8)] {
			v = v<<8 | uint64(c)
		}
		return v
	}
	bit := i * int64(bits)
	return uint64(b[bit/8]>>(bit%8)) & (1<<bits - 1)
}

func putRefcount(b []byte, i int64, bits uint, v uint64) {
	if bits >= 8 {
		n := int64(bits / 8)
		for k := n - 1; k >= 0; k-- {
			b[i*n+k] = byte(v)
			v >>= 8
		}
		return
	}
	bit := i * int64(bits)
	mask := byte(1<<bits-1) << (bit % 8)
	b[bit/8] = b[bit/8]&^mask | byte(v)<<(bit%8)&mask
}
