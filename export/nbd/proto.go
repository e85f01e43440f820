package nbd

// Wire constants of the NBD protocol, from the specification (doc/proto.md of
// the NetworkBlockDevice/nbd project). All integers on the wire are
// big-endian.

// Magic numbers.
const (
	magicInit        = 0x4e42444d41474943 // "NBDMAGIC", the greeting
	magicOpt         = 0x49484156454F5054 // "IHAVEOPT", greeting and option headers
	magicOptReply    = 0x0003e889045565a9
	magicRequest     = 0x25609513
	magicSimpleReply = 0x67446698
	magicStructReply = 0x668e33ef
)

// Handshake flags (server, 16 bits) and client flags (32 bits) share bits.
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1
)

// Option codes.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optPeekExport      = 4 // withdrawn; answered ERR_UNSUP
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
	optExtendedHeaders = 11 // answered ERR_UNSUP
)

// Option reply types.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4

	repErrBit = 1 << 31 // set in every error reply

	repErrUnsup   = 1<<31 | 1
	repErrPolicy  = 1<<31 | 2
	repErrInvalid = 1<<31 | 3
	repErrTLSReqd = 1<<31 | 5
	repErrUnknown = 1<<31 | 6
	repErrTooBig  = 1<<31 | 9
)

// Info types inside NBD_REP_INFO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags (16 bits).
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendDF          = 1 << 7
	tflagCanMultiConn    = 1 << 8
	tflagSendCache       = 1 << 10
	tflagSendFastZero    = 1 << 11
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags (16 bits).
const (
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4
)

// Structured reply chunk types and flags.
const (
	replyFlagDone = 1 << 0

	chunkNone        = 0
	chunkOffsetData  = 1
	chunkOffsetHole  = 2
	chunkBlockStatus = 5
	chunkError       = 1<<15 | 1
)

// Error values sent to clients. Never raw errno values: clients know only
// these.
const (
	errPerm   = 1
	errIO     = 5
	errNoMem  = 12
	errInval  = 22
	errNoSpc  = 28
	errNotSup = 95
)

// Sizes and limits.
const (
	// Block sizes advertised in NBD_INFO_BLOCK_SIZE. Every format serves
	// unaligned requests, so the minimum is 1, which also lets clients use
	// exports whose size is not a multiple of 512.
	minBlockSize       = 1
	preferredBlockSize = 4096
	maxPayload         = 32 << 20 // the largest READ or WRITE served

	// maxDrain is the largest WRITE payload that is read and discarded
	// with an error reply; past it the connection is dropped, since
	// reading it would let a client make the server read without bound.
	maxDrain = 2 * maxPayload

	maxOptionLen   = 64 << 10 // the largest option data read; legitimate ones are a few KiB
	maxOptions     = 256      // options per handshake before the client is dropped
	maxStringLen   = 4096     // export names, descriptions, context names (the spec's MUST)
	maxMetaQueries = 128      // queries in one *_META_CONTEXT option

	// maxDescriptors caps the descriptors in one BLOCK_STATUS reply (the
	// spec says at most 2^20); clients ask again from where it ends.
	maxDescriptors = 1 << 16

	// maxReadChunks caps the chunks of one structured READ reply; past it
	// the rest of the range goes as one data chunk.
	maxReadChunks = 32
	maxBitmaps    = 8 // per export: a BLOCK_STATUS reply holds a chunk for each, and base:allocation's

	// sparseReadMin is the smallest READ for which holes are looked up
	// and sent as OFFSET_HOLE chunks; for smaller reads the lookup costs
	// more than sending the zeroes.
	sparseReadMin = 64 << 10
)

// The one metadata context served.
const (
	contextBaseAllocation = "base:allocation"
	contextDirtyBitmap    = "qemu:dirty-bitmap:" // and the bitmap's name
	contextDepth          = "qemu:allocation-depth"
)
