package nbd

import (
	"fmt"
)

// validate checks a request against the spec and the export, and returns
// the error to answer it with (0 if it is valid) and why.
func (t *transmission) validate(r *request) (uint32, string) {
	allowed := uint16(cmdFlagFUA) // valid on every command
	switch r.typ {
	case cmdRead:
		if t.structured {
			allowed |= cmdFlagDF
		}
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
		if t.flags&tflagSendFastZero != 0 {
			allowed |= cmdFlagFastZero
		}
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	case cmdWrite, cmdFlush, cmdTrim, cmdCache:
	default:
		return errInval, fmt.Sprintf("unknown command %d", r.typ)
	}
	if r.flags&^allowed != 0 {
		return errInval, fmt.Sprintf("flags %#x not valid on command %d", r.flags, r.typ)
	}
	write := r.typ == cmdWrite || r.typ == cmdTrim || r.typ == cmdWriteZeroes
	switch {
	case write && t.flags&tflagReadOnly != 0:
		return errPerm, "the export is read-only"
	case r.typ == cmdTrim && t.flags&tflagSendTrim == 0:
		return errInval, "TRIM was not advertised"
	case r.typ == cmdBlockStatus && len(t.meta) == 0:
		return errInval, "no metadata context was negotiated for this export"
	case r.typ == cmdBlockStatus && r.length == 0:
		return errInval, "BLOCK_STATUS of length 0"
	case r.typ == cmdFlush:
		return 0, ""
	}
	if r.off > uint64(t.size) || uint64(r.length) > uint64(t.size)-r.off {
		msg := fmt.Sprintf("range %d+%d is outside the export (%d bytes)", r.off, r.length, t.size)
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return errNoSpc, msg
		}
		return errInval, msg
	}
	if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > maxPayload {
		return errInval, fmt.Sprintf("%d bytes is more than the maximum payload, %d", r.length, maxPayload)
	}
	return 0, ""
}
