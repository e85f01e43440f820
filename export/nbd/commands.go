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
		err = t.cache(r, off, n)
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

// cache serves NBD_CMD_CACHE, a hint that the client will read the range.
// The range goes to the connection's prefetcher and the reply goes at
// once, so that a client prefetching much (a remote image's boot set)
// holds neither one of its requests nor a worker while the bytes arrive;
// the spec lets a server reply before the data is cached when the request
// has no flags. With flags (FUA), or with prefetchQueue ranges already
// waiting, the request reads its range before its reply: the latter is
// the client's back-pressure.
func (t *transmission) cache(r *request, off, n int64) error {
	if r.flags == 0 {
		select {
		case t.prefetch <- [2]int64{off, n}:
			return nil
		default:
		}
	}
	return t.readRange(off, n, r.buffer(cacheStep))
}

// prefetchLoop reads the ranges of CACHE requests, one at a time, into
// the caches of the disk (the page cache, a format's tables, a remote
// image's block cache), until the connection ends. Its buffer, allocated
// at the first CACHE, is outside the connection's budget.
func (t *transmission) prefetchLoop() {
	var buf []byte
	for rg := range t.prefetch {
		if buf == nil {
			buf = make([]byte, cacheStep)
		}
		if err := t.readRange(rg[0], rg[1], buf); err != nil {
			t.log.Warn("CACHE: reading ahead failed", "offset", rg[0], "length", rg[1], "err", err)
		}
	}
}

// readRange reads [off, off+n) into buf, a piece at a time, and drops it;
// it stops early once the connection has ended.
func (t *transmission) readRange(off, n int64, buf []byte) error {
	for n > 0 && !t.ended.Load() {
		c := min(n, int64(len(buf)))
		if got, err := t.disk.ReadAt(buf[:c], off); int64(got) != c {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}
