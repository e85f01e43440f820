package nbd

import (
	"github.com/diskserve/diskserve"
)

// handle serves a valid request and leaves its reply in r.
func (t *transmission) handle(r *request) {
	off, n := int64(r.off), int64(r.length)
	var err error
	switch r.typ {
	case cmdRead:
		t.read(r)
		return
	case cmdBlockStatus:
		t.blockStatus(r)
		return
	case cmdCache:
		err = t.cache(off, n, r.buffer(cacheStep))
	case cmdWrite:
		_, err = t.disk.WriteAt(r.payload(), off)
	case cmdFlush:
		err = diskserve.Flush(t.disk)
	case cmdTrim:
		err = diskserve.PunchHole(t.disk, off, n)
	case cmdWriteZeroes:
		var zf diskserve.ZeroFlags
		if r.flags&cmdFlagNoHole == 0 {
			zf |= diskserve.ZeroMayUnmap
		}
		if r.flags&cmdFlagFastZero != 0 {
			zf |= diskserve.ZeroFast
		}
		err = diskserve.WriteZeroes(t.disk, off, n, zf)
	}
	if err == nil && r.flags&cmdFlagFUA != 0 && r.typ != cmdFlush {
		err = diskserve.Flush(t.disk)
	}
	t.finish(r, err)
}

// finish encodes the reply of a request that returns no data.
func (t *transmission) finish(r *request, err error) {
	if err != nil {
		t.failed(r, err)
		return
	}
	r.simple(0)
}

// failed encodes an error reply for err, and logs it.
func (t *transmission) failed(r *request, err error) {
	errno := errnoOf(err, r)
	t.log.Warn("request failed", "cmd", r.typ, "offset", r.off, "length", r.length, "err", err)
	r.fail(t.structured, errno, err.Error())
}

// cache serves NBD_CMD_CACHE by reading the range, which brings it into
// the page cache and the format's own caches.
func (t *transmission) cache(off, n int64, buf []byte) error {
	for n > 0 {
		c := min(n, int64(len(buf)))
		if got, err := t.disk.ReadAt(buf[:c], off); int64(got) != c {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}
