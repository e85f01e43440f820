package fuse

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/window"
)

// gptDisk builds a GPT composite with partitions of the given sizes and
// returns it opened.
func gptDisk(t *testing.T, sizes ...int64) diskserve.DiskFile {
	t.Helper()
	dir := t.TempDir()
	var parts []composite.Partition
	for i, n := range sizes {
		p := filepath.Join(dir, "p"+string(rune('0'+i)))
		os.WriteFile(p, bytes.Repeat([]byte{byte(i + 1)}, int(n)), 0o644)
		parts = append(parts, composite.Partition{Label: filepath.Base(p), Path: p, Size: n})
	}
	img := filepath.Join(dir, "disk.img")
	if err := composite.CreateGPT(img, parts); err != nil {
		t.Fatal(err)
	}
	d, err := format.Open(img, diskserve.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestReadPartitionsGPT(t *testing.T) {
	d := gptDisk(t, 8192, 10000, 4096)
	got := readPartitions(d)
	want := []partition{{40 * 512, 8192}, {56 * 512, 12288}, {80 * 512, 4096}}
	if len(got) != len(want) {
		t.Fatalf("partitions %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("partitions %v, want %v", got, want)
		}
		b := make([]byte, 4096)
		w := window.New(d, got[i].off, got[i].n, false)
		if _, err := w.ReadAt(b, 0); err != nil || b[0] != byte(i+1) || b[4095] != byte(i+1) {
			t.Fatalf("partition %d reads %v, %v", i, b[:4], err)
		}
	}
}

func TestReadPartitionsMBR(t *testing.T) {
	b := make([]byte, 4<<20) // 8192 sectors
	e := b[446:]
	e[4] = 0x83
	binary.LittleEndian.PutUint32(e[8:], 2048)
	binary.LittleEndian.PutUint32(e[12:], 100)
	e = b[446+16:]
	e[4] = 0x83
	binary.LittleEndian.PutUint32(e[8:], 8000)
	binary.LittleEndian.PutUint32(e[12:], 1000) // runs past the disk: left out
	b[510], b[511] = 0x55, 0xAA
	got := readPartitions(disktest.NewMemory(b, true))
	if len(got) != 1 || got[0] != (partition{2048 * 512, 100 * 512}) {
		t.Fatalf("partitions %v", got)
	}
	if got := readPartitions(disktest.NewMemory(make([]byte, 1<<20), true)); got != nil {
		t.Fatalf("a blank disk has partitions %v", got)
	}
}

// FuzzPartitions reads partition tables from arbitrary disk contents:
// every partition found must lie inside the disk.
func FuzzPartitions(f *testing.F) {
	b := make([]byte, 1<<16)
	b[446+4], b[510], b[511] = 0x83, 0x55, 0xAA
	binary.LittleEndian.PutUint32(b[446+8:], 1)
	binary.LittleEndian.PutUint32(b[446+12:], 10)
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		d := disktest.NewMemory(b, true)
		for _, p := range readPartitions(d) {
			if p.off <= 0 || p.n <= 0 || p.off+p.n > d.Size() {
				t.Fatalf("partition %+v outside a disk of %d bytes", p, d.Size())
			}
		}
	})
}
