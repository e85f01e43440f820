package composite_test

import (
	"encoding/binary"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"

	"github.com/diskserve/diskserve/format/composite"
)

// TestGPTLayout checks what crosvm's builder gets wrong: the protective
// MBR of a disk of 2 TiB or more (UEFI caps its size at 0xFFFFFFFF
// sectors), and the backup header, which must point at the backup entry
// array, not at the primary one.
func TestGPTLayout(t *testing.T) {
	img := filepath.Join(t.TempDir(), "big.img")
	if err := composite.CreateGPT(img, []composite.Partition{{Label: "big", Path: "/dev/null", Size: 3 << 40}}); err != nil {
		t.Fatal(err)
	}
	header, _ := os.ReadFile(img + ".header")
	footer, _ := os.ReadFile(img + ".footer")
	if got := binary.LittleEndian.Uint32(header[446+12:]); got != 0xFFFFFFFF {
		t.Errorf("protective MBR size %#x, want 0xffffffff", got)
	}
	if header[446+4] != 0xEE || header[510] != 0x55 || header[511] != 0xAA {
		t.Error("not a protective MBR")
	}
	primary, backup := header[512:], footer[len(footer)-512:]
	diskSize := int64(40*512) + 3<<40 + int64(len(footer))
	lastLBA := uint64(diskSize/512 - 1)
	for _, tc := range []struct {
		name                    string
		h                       []byte
		current, other, entries uint64
	}{
		{"primary", primary, 1, lastLBA, 2},
		{"backup", backup, lastLBA, 1, lastLBA - 32},
	} {
		if string(tc.h[:8]) != "EFI PART" {
			t.Fatalf("%s: no signature", tc.name)
		}
		if got := [3]uint64{binary.LittleEndian.Uint64(tc.h[24:]), binary.LittleEndian.Uint64(tc.h[32:]), binary.LittleEndian.Uint64(tc.h[72:])}; got != [3]uint64{tc.current, tc.other, tc.entries} {
			t.Errorf("%s: current, backup and entries LBA %v, want %v", tc.name, got, [3]uint64{tc.current, tc.other, tc.entries})
		}
		h := append([]byte(nil), tc.h[:92]...)
		crc := binary.LittleEndian.Uint32(h[16:])
		binary.LittleEndian.PutUint32(h[16:], 0)
		if crc32.ChecksumIEEE(h) != crc {
			t.Errorf("%s: header CRC does not match", tc.name)
		}
	}
	if err := composite.CreateGPT(img, []composite.Partition{{Label: "rw", Path: "x", Size: 1000, Writable: true}}); err == nil {
		t.Error("a writable partition of 1000 bytes was accepted")
	}
}
