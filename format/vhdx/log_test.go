package vhdx

import (
	"os"
	"testing"
)

// FuzzLog searches arbitrary logs for the sequence to replay: it must not
// panic, and what it returns must be a run of consecutive sequence
// numbers ending at the highest valid one it can reach from its tail.
// Its seed testdata/fuzz/FuzzLog/qemu-two-entries is the first 16 KiB of
// the log qemu-io 7.2 leaves after two allocating writes to a new disk
// (as in TestLogReplay).
func FuzzLog(f *testing.F) {
	if b, err := os.ReadFile("../../testdata/vhdx/pattern.vhdx"); err == nil {
		f.Add(b[mib : mib+64*kib])
	}
	f.Fuzz(func(t *testing.T, log []byte) {
		log = log[:len(log)/logSector*logSector]
		if len(log) == 0 {
			return
		}
		var id guid
		if len(log) >= 48 {
			copy(id[:], log[32:48])
		}
		seq, err := activeSequence(log, id)
		if err != nil {
			return
		}
		for k := 1; k < len(seq); k++ {
			if seq[k].seq != seq[k-1].seq+1 {
				t.Fatalf("entries %d and %d are not consecutive", seq[k-1].seq, seq[k].seq)
			}
		}
	})
}
