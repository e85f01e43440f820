package nbd

import (
	"strings"

	"github.com/diskserve/diskserve"
)

// The range one call for extents covers starts at statusFirstStep and
// doubles while calls come back with few extents, up to statusMaxStep; it
// halves when a call brings many. A disk may hold an extent every few
// bytes (Android sparse blocks of 4 bytes), so a fixed large range could
// bring millions of extents in one call; this way one call brings at most
// statusFirstStep/4 of them (maxDescriptors), and a disk of large extents
// is still walked in a dozen calls.
const (
	statusFirstStep = 256 << 10
	statusMaxStep   = 1 << 30
	statusFew       = 1024 // extents per call below which the step grows

	// statusBytes is the most one context's chunk of a BLOCK_STATUS reply
	// holds: its ID and maxDescriptors descriptors.
	statusBytes = 4 + 8*maxDescriptors
)

// A metaContext is a metadata context selected on a connection.
type metaContext struct {
	id     uint32
	name   string
	bitmap diskserve.DirtyBitmap // for qemu:dirty-bitmap contexts
	err    error                 // why the bitmap could not be found
}

// selectContexts resolves the contexts selected by name, their IDs
// following their order. A bitmap that has gone since the server started
// (a live overlay replaced the disk that kept it) fails the BLOCK_STATUS
// requests that ask for it.
func selectContexts(e *Export, names []string) []metaContext {
	var meta []metaContext
	for i, name := range names {
		m := metaContext{id: uint32(i + 1), name: name}
		if b, ok := strings.CutPrefix(name, contextDirtyBitmap); ok {
			m.bitmap, m.err = diskserve.FindDirtyBitmap(e.Disk, b)
		}
		meta = append(meta, m)
	}
	return meta
}

// blockStatus serves NBD_CMD_BLOCK_STATUS: one chunk per selected
// context, each with at most maxDescriptors extents, from which a client
// asks again.
func (t *transmission) blockStatus(r *request) {
	p := r.buffer(len(t.meta) * statusBytes)[:0]
	for i, m := range t.meta {
		ext, err := t.contextExtents(r, m)
		if err != nil {
			t.failed(r, err)
			return
		}
		start := len(p)
		p = be.AppendUint32(p, m.id)
		for _, e := range ext {
			p = be.AppendUint32(p, uint32(e.Len))
			p = be.AppendUint32(p, uint32(e.Flags))
		}
		var flags uint16
		if i == len(t.meta)-1 {
			flags = replyFlagDone
		}
		r.chunk(flags, chunkBlockStatus, int64(len(p)-start))
		r.out = append(r.out, p[start:])
	}
}

// contextExtents returns the extents of context m over r's range, in r's
// scratch space.
func (t *transmission) contextExtents(r *request, m metaContext) ([]diskserve.Extent, error) {
	get := func(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
		return diskserve.Extents(t.disk, dst, off, n)
	}
	switch {
	case m.bitmap != nil:
		get = func(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
			return m.bitmap.DirtyExtents(dst, off, n), nil
		}
	case m.err != nil:
		return nil, m.err
	case m.name == contextDepth:
		get = func(dst []diskserve.Extent, off, n int64) ([]diskserve.Extent, error) {
			return diskserve.AllocationDepths(t.disk, dst, off, n)
		}
	}
	off := int64(r.off)
	end := off + int64(r.length)
	ext := r.ext[:0]
	step := int64(statusFirstStep)
	for pos := off; pos < end && len(ext) < maxDescriptors; {
		n := min(step, end-pos)
		had := len(ext)
		var err error
		if ext, err = get(ext, pos, n); err != nil {
			return nil, err
		}
		start := max(had-1, 0) // the new extents may continue the last one
		ext = ext[:start+len(diskserve.MergeExtents(ext[start:]))]
		switch got := len(ext) - had; {
		case got < statusFew:
			step = min(2*step, statusMaxStep)
		case got > maxDescriptors/4:
			step = max(step/2, 4096)
		}
		pos += n
	}
	r.ext = ext
	if len(ext) > maxDescriptors {
		ext = ext[:maxDescriptors]
	}
	if r.flags&cmdFlagReqOne != 0 {
		ext = ext[:1]
	}
	return ext, nil
}
