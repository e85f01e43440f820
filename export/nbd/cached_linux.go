package nbd

import (
	"github.com/diskserve/diskserve"
)

// serveCached serves a READ smaller than sendfileMin on the reader itself
// when the disk maps its range onto a host file and all of it is in the
// page cache: preadv2 with RWF_NOWAIT copies it from there, or fails with
// EAGAIN rather than wait for the host's disk, and the READ then goes to a
// worker as any other. Serving it here saves handing it to a worker and
// its reply to the writer, two goroutine switches per small read. It
// reports whether r's reply is ready.
func (t *transmission) serveCached(r *request) bool {
	off, n := int64(r.off), int64(r.length)
	if t.noCached || n == 0 || n >= sendfileMin {
		return false
	}
	hr, ok := diskserve.MapHost(t.disk, off, n, false)
	if !ok || hr.Direct() {
		return false
	}
	buf := r.buffer(int(n))
	ok, unsupported := hr.ReadCached(buf)
	if unsupported { // no RWF_NOWAIT for this file
		t.noCached = true
	}
	if !ok {
		return false
	}
	r.data(t.structured, off, n)
	r.out = append(r.out, buf)
	return true
}
