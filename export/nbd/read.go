package nbd

import (
	"io"

	"github.com/diskserve/diskserve"
)

// read serves NBD_CMD_READ. With structured replies and a large enough
// request, ranges that read as zeroes go as OFFSET_HOLE chunks and are
// never read; otherwise the data is read whole before any header goes out,
// so an error can still be reported.
func (t *transmission) read(r *request) {
	off, n := int64(r.off), int64(r.length)
	if n == 0 {
		if t.structured {
			r.chunk(replyFlagDone, chunkNone, 0)
		} else {
			r.simple(0)
		}
		return
	}
	runs := r.ext[:0]
	if t.structured && r.flags&cmdFlagDF == 0 && n >= sparseReadMin {
		var err error
		if runs, err = diskserve.Extents(t.disk, runs, off, n); err != nil {
			runs = runs[:0] // a failed lookup costs only the holes
		}
		runs = zeroRuns(runs, maxReadChunks)
	}
	if len(runs) == 0 {
		runs = append(runs, diskserve.Extent{Off: off, Len: n})
	}
	r.ext = runs
	if len(runs) == 1 && runs[0].Flags&diskserve.ExtentZero == 0 && t.fromPageCache(r, off, n) {
		r.data(t.structured, off, n)
		return
	}
	buf := r.buffer(int(n))
	for _, e := range runs {
		if e.Flags&diskserve.ExtentZero != 0 {
			continue
		}
		if got, err := t.disk.ReadAt(buf[e.Off-off:e.Off-off+e.Len], e.Off); int64(got) != e.Len {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			t.failed(r, err)
			return
		}
	}
	if !t.structured {
		r.simple(0)
		r.out = append(r.out, buf)
		return
	}
	for i, e := range runs {
		var fl uint16
		if i == len(runs)-1 {
			fl = replyFlagDone
		}
		if e.Flags&diskserve.ExtentZero != 0 {
			h := r.chunk(fl, chunkOffsetHole, 12)
			h = be.AppendUint64(h, uint64(e.Off))
			be.AppendUint32(h, uint32(e.Len))
			continue
		}
		h := r.chunk(fl, chunkOffsetData, 8+e.Len)
		be.AppendUint64(h, uint64(e.Off))
		r.out = append(r.out, buf[e.Off-off:e.Off-off+e.Len])
	}
}

// fromPageCache arranges for the data of r, [off, off+n) of the export, to
// go to the client with sendfile(2) from the page cache, without a copy in
// this process: where the connection is a plain socket, the read is large,
// the disk maps the range onto a host file, and all of it is cached. A read
// that would have to wait for the host's disk takes the pread path, so that
// the connection's reply writer never waits for one. Reads of cached pages
// do not fail; if the file shrinks under a sendfile, the reply cannot be
// finished and the connection ends.
func (t *transmission) fromPageCache(r *request, off, n int64) bool {
	if t.sock == nil || n < sendfileMin {
		return false
	}
	hr, ok := diskserve.MapHost(t.disk, off, n, false)
	if !ok || hr.Direct() || !pageCached(hr.FD, hr.Off, n) {
		return false
	}
	r.file = hostSpan{fd: hr.FD, off: hr.Off, n: n}
	return true
}

// zeroRuns merges extents into alternating runs of data and of zeroes, at
// most max of them (the tail past that becomes data), in place.
func zeroRuns(ext []diskserve.Extent, max int) []diskserve.Extent {
	out := ext[:0]
	for _, e := range ext {
		e.Flags &= diskserve.ExtentZero
		if n := len(out); n > 0 && (out[n-1].Flags == e.Flags || n == max) {
			out[n-1].Len += e.Len
			out[n-1].Flags &= e.Flags
			continue
		}
		out = append(out, e)
	}
	return out
}
