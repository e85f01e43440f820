package diskserve

import (
	"errors"
	"fmt"
)

// Sentinel errors. Callers match them with [errors.Is]; the errors returned
// wrap them with context (the operation, the range, the file).
var (
	// ErrReadOnly is returned for a write, zero, punch or resize on a
	// read-only disk.
	ErrReadOnly = errors.New("disk is read-only")

	// ErrOutOfRange is returned for a request that does not fit inside
	// the disk: a write, zero or punch past Size, or a negative offset.
	ErrOutOfRange = errors.New("range outside the disk")

	// ErrUnsupported is [errors.ErrUnsupported], named here so that the
	// package's sentinels can be read in one place. A capability method
	// returns it (wrapped) to mean "not possible for this request; use the
	// fallback".
	ErrUnsupported = errors.ErrUnsupported

	// ErrNestingDepth is returned when opening an image would exceed the
	// opener's nesting depth: a backing chain or composite tree that is
	// too deep, or one that refers to itself.
	ErrNestingDepth = errors.New("maximum image nesting depth exceeded")

	// ErrCorrupt matches every [*FormatError] that reports a malformed
	// image (rather than an unsupported feature).
	ErrCorrupt = errors.New("corrupt image")

	// ErrUnknownFormat is returned for a format name that the opener does
	// not know.
	ErrUnknownFormat = errors.New("unknown disk format")
)

// A FormatError reports an image that is malformed, or that uses a feature
// this implementation does not have. It is shaped like [debug/elf.FormatError].
//
// A FormatError matches [ErrCorrupt] under [errors.Is], unless its cause
// wraps [errors.ErrUnsupported], in which case it matches that instead: a
// caller can tell "this image is broken" from "this image needs a feature we
// lack" without parsing messages. The opener wraps it in an [*fs.PathError]
// naming the file.
type FormatError struct {
	Format string // the format's name: "qcow2"
	Off    int64  // byte offset of the bad structure in the image file, or -1
	Msg    string // what is wrong, lower case: "L1 table offset not aligned"
	Err    error  // the cause, or nil
}

// Error returns "FORMAT: MSG (at byte 0xOFF): CAUSE", leaving out the parts
// that are empty. A bare [errors.ErrUnsupported] cause is left out too: the
// message already says what is not supported.
func (e *FormatError) Error() string {
	s := e.Format + ": " + e.Msg
	if e.Off >= 0 {
		s += fmt.Sprintf(" (at byte %#x)", e.Off)
	}
	if e.Err != nil && e.Err != errors.ErrUnsupported {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns the cause.
func (e *FormatError) Unwrap() error { return e.Err }

// Is reports whether e matches target: [ErrCorrupt] for every FormatError
// whose cause is not [errors.ErrUnsupported].
func (e *FormatError) Is(target error) bool {
	return target == ErrCorrupt && !errors.Is(e.Err, errors.ErrUnsupported)
}

// Corrupt returns a [*FormatError] for format at offset off, with a message
// formatted as by [fmt.Sprintf].
func Corrupt(format string, off int64, msg string, args ...any) error {
	return &FormatError{Format: format, Off: off, Msg: fmt.Sprintf(msg, args...)}
}

// Unsupported returns a [*FormatError] for a feature that format does not
// implement; it matches [errors.ErrUnsupported]. The message should say what
// is not supported: "encrypted images are not supported".
func Unsupported(format string, off int64, msg string, args ...any) error {
	return &FormatError{Format: format, Off: off, Msg: fmt.Sprintf(msg, args...), Err: errors.ErrUnsupported}
}
