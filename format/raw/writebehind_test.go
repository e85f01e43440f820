package raw

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestWriteBehind: a disk set to write behind starts the writeback every
// writeBehindStep bytes written, through pwrite (the first pass, into a
// file with nothing cached) or the mapping (the last, into cached pages)
// alike; one not set, or opened read-only, never does.
func TestWriteBehind(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 4*writeBehindStep); err != nil {
		t.Fatal(err)
	}
	for _, set := range []bool{true, false, true} {
		d, err := OpenFile(path, false)
		if err != nil {
			t.Fatal(err)
		}
		disk := d.(*Disk)
		if set {
			disk.SetWriteBehind()
		}
		p := bytes.Repeat([]byte{7}, writeBehindStep/2)
		for off := int64(0); off < 7*writeBehindStep/2; off += int64(len(p)) {
			if _, err := d.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
		}
		// 3.5 steps written: started three times, half a step left over.
		want := int64(0)
		if set {
			want = writeBehindStep / 2
		}
		if got := disk.unstarted.Load(); got != want {
			t.Errorf("set %v: %d bytes not yet started after 3.5 steps, want %d", set, got, want)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
	d, err := OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.(*Disk).SetWriteBehind()
	if d.(*Disk).writeBehind.Load() {
		t.Error("a read-only disk was set to write behind")
	}
}
