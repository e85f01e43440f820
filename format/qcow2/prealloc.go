package qcow2

import (
	"errors"
	"fmt"

	"github.com/diskserve/diskserve"
)

// preallocate gives every guest cluster of the new image a host cluster,
// as qemu-img create -o preallocation does: metadata maps them all (the
// data clusters stay holes in the file and read as zeroes), falloc
// allocates their space too, full writes zeroes into them. Each L2 table
// is followed by the clusters it maps, in guest order, as qemu lays them
// out. a.Container opens the image's file.
func preallocate(a diskserve.CreateArgs, mode string) error {
	if a.Container == nil {
		return errors.New("preallocation: the image's file cannot be opened here")
	}
	// The format without its Creator, which refers to this function.
	f := diskserve.Format{Name: "qcow2", Magic: Magic, Open: open}
	opts := diskserve.Options{
		Formats:   []diskserve.Format{f},
		Format:    f.Name,
		NoBacking: true, // the backing file plays no part in the allocation
		OpenFile:  func(string, bool) (diskserve.DiskFile, error) { return a.Container() },
	}
	dd, err := diskserve.Open(a.Path, opts)
	if err != nil {
		return err
	}
	d := dd.(*Disk)
	err = d.allocate(0, int64(d.h.Size), mode)
	return errors.Join(err, d.Close())
}

// allocate gives each guest cluster of [off, off+n) that has no host
// cluster one of its own, mapped after its L2 table (metadata), its space
// allocated too (falloc), or zeroes written into it (full). Clusters
// already mapped keep what they hold.
func (d *Disk) allocate(off, n int64, mode string) error {
	switch mode {
	case "off":
		return nil
	case "metadata", "falloc", "full":
	default:
		return fmt.Errorf("preallocation must be off, metadata, falloc or full, not %q", mode)
	}
	if n <= 0 {
		return nil
	}
	d.lockAll()
	defer d.unlockAll()
	first := off / d.cs
	if d.h.BackingFile != "" {
		first = (off + d.cs - 1) / d.cs // a cluster partly below off shows the backing file there
	}
	var runs [][2]int64 // host ranges of the new data clusters
	for ci := first; ci < (off+n+d.cs-1)/d.cs; ci++ {
		t, err := d.l2ForWrite(ci)
		if err != nil {
			return err
		}
		if e, _ := d.entryIn(t, ci); e&(offsetMask|entryCompressed) != 0 {
			continue // already stored
		}
		host, err := d.alloc(1)
		if err != nil {
			return err
		}
		if k := len(runs); k > 0 && runs[k-1][1] == host {
			runs[k-1][1] += d.cs
		} else {
			runs = append(runs, [2]int64{host, host + d.cs})
		}
		var bm uint64
		if d.h.extendedL2() {
			bm = allSubs
		}
		d.setEntry(t, ci, uint64(host)|entryCopied, bm)
		if d.meta.dirty >= d.meta.max/2 {
			if err := d.flushLocked(); err != nil {
				return err
			}
		}
	}
	if err := d.flushLocked(); err != nil {
		return err
	}
	if len(runs) == 0 || mode == "metadata" {
		return nil
	}
	if err := diskserve.Resize(d.c, max(d.c.Size(), d.w.end)); err != nil {
		return err
	}
	for _, r := range runs {
		if mode == "falloc" { // allocated space that reads as zeroes
			if err := diskserve.WriteZeroes(d.c, r[0], r[1]-r[0], 0); err != nil {
				return fmt.Errorf("preallocation=falloc: %w", err)
			}
		} else if err := diskserve.WriteZeroBytes(d.c, r[0], r[1]-r[0]); err != nil {
			return fmt.Errorf("preallocation=full: %w", err)
		}
	}
	return diskserve.Flush(d.c)
}

// preallocateRange is the format's [diskserve.Creator.Preallocate].
func preallocateRange(dd diskserve.DiskFile, off, n int64, mode string) error {
	d, ok := unwrapDisk(dd)
	if !ok || !d.writable() {
		return errors.New("preallocation: the image is not open read-write as qcow2")
	}
	return d.allocate(off, n, mode)
}
