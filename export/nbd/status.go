package nbd

import (
	"github.com/diskserve/diskserve"
)

// The range one Extents call of BLOCK_STATUS covers starts at
// statusFirstStep and doubles while calls come back with few extents, up
// to statusMaxStep; it halves when a call brings many. A disk may hold an
// extent every few bytes (Android sparse blocks of 4 bytes), so a fixed
// large range could bring millions of extents in one call; this way one
// call brings at most statusFirstStep/4 of them (maxDescriptors), and a
// disk of large extents is still walked in a dozen calls.
const (
	statusFirstStep = 256 << 10
	statusMaxStep   = 1 << 30
	statusFew       = 1024 // extents per call below which the step grows
)

// blockStatus serves NBD_CMD_BLOCK_STATUS for base:allocation. The reply
// holds at most maxDescriptors extents, and a client asks again from where
// it ends.
func (t *transmission) blockStatus(r *request) {
	off := int64(r.off)
	end := off + int64(r.length)
	ext := r.ext[:0]
	step := int64(statusFirstStep)
	for pos := off; pos < end && len(ext) < maxDescriptors; {
		n := min(step, end-pos)
		had := len(ext)
		var err error
		if ext, err = diskserve.Extents(t.disk, ext, pos, n); err != nil {
			t.failed(r, err)
			return
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
	if len(ext) > maxDescriptors {
		ext = ext[:maxDescriptors]
	}
	if r.flags&cmdFlagReqOne != 0 {
		ext = ext[:1]
	}
	r.ext = ext
	p := r.buffer(4 + 8*len(ext))[:0]
	p = be.AppendUint32(p, contextIDBase)
	for _, e := range ext {
		p = be.AppendUint32(p, uint32(e.Len))
		p = be.AppendUint32(p, uint32(e.Flags))
	}
	r.chunk(replyFlagDone, chunkBlockStatus, int64(len(p)))
	r.out = append(r.out, p)
}
