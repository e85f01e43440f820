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
	err = d.allocateAll(mode)
	return errors.Join(err, d.Close())
}

// allocateAll maps every guest cluster to a host cluster of its own.
func (d *Disk) allocateAll(mode string) error {
	d.lockAll()
	defer d.unlockAll()
	clusters := (int64(d.h.Size) + d.cs - 1) / d.cs
	first := int64(-1)
	for ci := range clusters {
		t, err := d.l2ForWrite(ci)
		if err != nil {
			return err
		}
		host, err := d.alloc(1)
		if err != nil {
			return err
		}
		if first < 0 {
			first = host
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
	if first < 0 || mode == "metadata" {
		return nil
	}
	if err := diskserve.Resize(d.c, d.w.end); err != nil {
		return err
	}
	if mode == "falloc" { // allocated space that reads as zeroes
		if err := diskserve.WriteZeroes(d.c, first, d.w.end-first, 0); err != nil {
			return fmt.Errorf("preallocation=falloc: %w", err)
		}
		return diskserve.Flush(d.c)
	}
	zero := make([]byte, 1<<20)
	for off := first; off < d.w.end; off += int64(len(zero)) {
		if _, err := d.c.WriteAt(zero[:min(int64(len(zero)), d.w.end-off)], off); err != nil {
			return fmt.Errorf("preallocation=full: %w", err)
		}
	}
	return diskserve.Flush(d.c)
}
