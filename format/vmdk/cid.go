package vmdk

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/window"
)

// A VMDK's CID (content ID) changes when the disk first changes after an
// open, and a delta disk records its parent's CID as parentCID when it is
// made: a parent written since then no longer has the CID its children
// expect. qemu writes a new CID before the first write of an open, and
// refuses to read a delta disk's unallocated grains from a parent whose
// CID differs; diskserve does both.

// A cidKeeper writes a new CID into a writable disk's descriptor before
// its first change.
type cidKeeper struct {
	done atomic.Bool
	mu   sync.Mutex // serialises the update, and guards desc.CID against Describe
	f    diskserve.DiskFile
	at   int64 // where the descriptor text starts in f
	room int64 // bytes the text may take there; 0 for a file of its own
	text string
}

// renew gives desc a new CID in its text, once: it writes the text back
// and makes it durable, so that the change that follows cannot reach the
// disk while the old CID still says the disk is as its children knew it.
func (k *cidKeeper) renew(desc *descriptor) error {
	if k == nil || k.done.Load() {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.done.Load() {
		return nil
	}
	cid := desc.CID
	for cid == desc.CID || cid == 0xffffffff { // 0xffffffff means "no parent" in parentCID
		cid = rand.Uint32()
	}
	text, ok := withCID(k.text, cid)
	if !ok { // no CID line: nothing to keep up to date
		k.done.Store(true)
		return nil
	}
	if err := k.write(text); err != nil {
		return fmt.Errorf("vmdk: write the new CID into the descriptor: %w", err)
	}
	k.text, desc.CID = text, cid
	k.done.Store(true)
	return nil
}

// write writes text over the descriptor's, padding an embedded one with
// NULs and sizing a descriptor file to it, then syncs.
func (k *cidKeeper) write(text string) error {
	b := []byte(text)
	switch {
	case k.room > 0 && int64(len(b)) > k.room:
		return fmt.Errorf("a descriptor of %d bytes does not fit its %d", len(b), k.room)
	case k.room > 0:
		b = append(b, make([]byte, max(0, len(k.text)-len(b)))...)
	case len(b) > len(k.text):
		if err := diskserve.Resize(k.f, int64(len(b))); err != nil {
			return err
		}
	}
	if _, err := k.f.WriteAt(b, k.at); err != nil {
		return err
	}
	if k.room == 0 && len(b) < len(k.text) {
		if err := diskserve.Resize(k.f, int64(len(b))); err != nil {
			return err
		}
	}
	return diskserve.Flush(k.f)
}

// cid returns desc's CID, as renew may change it.
func (k *cidKeeper) cid(desc *descriptor) uint32 {
	if k == nil {
		return desc.CID
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return desc.CID
}

// withCID returns text with the value of its CID line replaced by cid,
// or false if it has none.
func withCID(text string, cid uint32) (string, bool) {
	for pos := 0; pos < len(text); {
		end := strings.IndexByte(text[pos:], '\n')
		if end < 0 {
			end = len(text)
		} else {
			end += pos
		}
		line := text[pos:end]
		if key, value, ok := strings.Cut(line, "="); ok && strings.TrimSpace(key) == "CID" {
			from := pos + len(key) + 1 + (len(value) - len(strings.TrimLeft(value, " \t")))
			to := pos + len(strings.TrimRight(strings.TrimSuffix(line, "\r"), " \t"))
			return text[:from] + fmt.Sprintf("%08x", cid) + text[max(from, to):], true
		}
		pos = end + 1
	}
	return "", false
}

// staleParent is the part of a parent under a delta disk when the parent's
// CID is not the one the delta disk recorded: reading it fails, as in
// qemu, rather than mix the delta's grains with a changed parent's.
type staleParent struct {
	*window.Disk
	err error
}

func (s staleParent) ReadAt([]byte, int64) (int, error) { return 0, s.err }
