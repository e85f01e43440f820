package nbd

import (
	"github.com/diskserve/diskserve"
)

// blockStatus serves NBD_CMD_BLOCK_STATUS for base:allocation.
func (t *transmission) blockStatus(r *request) {
	off := int64(r.off)
	end := off + int64(r.length)
	ext := r.ext[:0]
	for pos := off; pos < end && len(ext) < maxDescriptors; pos += statusStep {
		var err error
		if ext, err = diskserve.Extents(t.disk, ext, pos, min(statusStep, end-pos)); err != nil {
			t.failed(r, err)
			return
		}
	}
	ext = diskserve.MergeExtents(ext)
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
