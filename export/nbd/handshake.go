package nbd

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/diskserve/diskserve"
)

var be = binary.BigEndian

// negotiate runs the handshake on c. It returns the transmission phase to
// serve, or nil after the client aborted or on error; in those cases it has
// closed the connection.
func (s *Server) negotiate(c net.Conn, log *slog.Logger) (*transmission, error) {
	h := &handshake{s: s, c: c, log: log}
	c.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	t, err := h.run()
	if t == nil {
		h.c.Close()
		return nil, err
	}
	h.c.SetDeadline(time.Time{})
	return t, nil
}

// handshake is the state of one connection's negotiation. STARTTLS
// resets everything but c and tls.
type handshake struct {
	s   *Server
	c   net.Conn // a *tls.Conn after STARTTLS
	log *slog.Logger
	tls bool

	noZeroes   bool
	structured bool
	metaExport string   // the export the metadata contexts were selected for
	metaNames  []string // the contexts selected, in the order of their IDs
}

func (h *handshake) run() (*transmission, error) {
	var greet [18]byte
	be.PutUint64(greet[0:], magicInit)
	be.PutUint64(greet[8:], magicOpt)
	be.PutUint16(greet[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := h.c.Write(greet[:]); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(h.c, cf[:]); err != nil {
		return nil, fmt.Errorf("read client flags: %w", err)
	}
	flags := be.Uint32(cf[:])
	if flags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return nil, fmt.Errorf("unknown client flags %#x", flags)
	}
	h.noZeroes = flags&flagNoZeroes != 0
	for range maxOptions {
		var hdr [16]byte
		if _, err := io.ReadFull(h.c, hdr[:]); err != nil {
			return nil, fmt.Errorf("read option: %w", err)
		}
		if m := be.Uint64(hdr[0:]); m != magicOpt {
			return nil, fmt.Errorf("bad option magic %#x", m)
		}
		opt, length := be.Uint32(hdr[8:]), be.Uint32(hdr[12:])
		if length > maxOptionLen {
			return nil, fmt.Errorf("option %d: %d bytes of data, more than %d", opt, length, maxOptionLen)
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(h.c, data); err != nil {
			return nil, fmt.Errorf("read option %d: %w", opt, err)
		}
		t, done, err := h.option(opt, data)
		if done || err != nil {
			return t, err
		}
	}
	return nil, fmt.Errorf("more than %d options", maxOptions)
}

// option handles one option. done means the negotiation is over: t is the
// transmission phase to enter, or nil if the client aborted.
func (h *handshake) option(opt uint32, data []byte) (t *transmission, done bool, err error) {
	tlsRequired := h.s.opts.TLS != nil && h.s.opts.TLSMode == TLSRequire && !h.tls
	switch {
	case opt == optExportName:
		return h.exportName(tlsRequired, data)
	case opt == optAbort:
		h.reply(opt, repAck, nil) // the client may close without reading it
		return nil, true, nil
	case opt == optStartTLS:
		return nil, false, h.startTLS(data)
	case tlsRequired:
		return nil, false, h.replyErr(opt, repErrTLSReqd, "TLS is required: send NBD_OPT_STARTTLS first")
	case opt == optList:
		return nil, false, h.list(data)
	case opt == optInfo, opt == optGo:
		return h.info(opt, data)
	case opt == optStructuredReply:
		if len(data) != 0 || h.structured {
			return nil, false, h.replyErr(opt, repErrInvalid, "structured replies take no data and are negotiated once")
		}
		h.structured = true
		return nil, false, h.reply(opt, repAck, nil)
	case opt == optListMetaContext, opt == optSetMetaContext:
		return nil, false, h.metaContext(opt, data)
	default:
		return nil, false, h.replyErr(opt, repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
	}
}

// reply sends one option reply.
func (h *handshake) reply(opt, typ uint32, data []byte) error {
	b := make([]byte, 20, 20+len(data))
	be.PutUint64(b[0:], magicOptReply)
	be.PutUint32(b[8:], opt)
	be.PutUint32(b[12:], typ)
	be.PutUint32(b[16:], uint32(len(data)))
	_, err := h.c.Write(append(b, data...))
	return err
}

// replyErr sends an error reply with a message for the client's log.
func (h *handshake) replyErr(opt, typ uint32, msg string) error {
	return h.reply(opt, typ, []byte(msg))
}

func (h *handshake) exportName(tlsRequired bool, data []byte) (*transmission, bool, error) {
	// This option has no error reply: the only answer to a bad one is to
	// close the connection.
	if tlsRequired {
		return nil, true, errors.New("NBD_OPT_EXPORT_NAME before STARTTLS")
	}
	e := h.s.export(string(data))
	if e == nil || len(data) > maxStringLen {
		return nil, true, fmt.Errorf("NBD_OPT_EXPORT_NAME: no export named %.64q", data)
	}
	t := h.start(e)
	b := make([]byte, 10, 10+124) // size, flags and, for old clients, 124 zero bytes
	be.PutUint64(b[0:], uint64(e.Disk.Size()))
	be.PutUint16(b[8:], t.flags)
	if !h.noZeroes {
		b = b[:10+124]
	}
	if _, err := h.c.Write(b); err != nil {
		return nil, true, err
	}
	return t, true, nil
}

func (h *handshake) startTLS(data []byte) error {
	switch {
	case len(data) != 0:
		return h.replyErr(optStartTLS, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case h.s.opts.TLS == nil:
		return h.replyErr(optStartTLS, repErrPolicy, "TLS is not configured on this server")
	case h.tls:
		return h.replyErr(optStartTLS, repErrInvalid, "TLS is already on")
	}
	if err := h.reply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	// Nothing was read ahead of the option, so no plaintext sent after it
	// can be taken for part of the TLS stream.
	tc := tls.Server(h.c, h.s.opts.TLS)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	// Forget what was negotiated in the clear (CVE-2021-3716).
	*h = handshake{s: h.s, c: tc, log: h.log, tls: true, noZeroes: h.noZeroes}
	return nil
}

func (h *handshake) list(data []byte) error {
	if len(data) != 0 {
		return h.replyErr(optList, repErrInvalid, "NBD_OPT_LIST takes no data")
	}
	for _, e := range h.s.exports {
		b := make([]byte, 4, 4+len(e.Name)+len(e.Description))
		be.PutUint32(b, uint32(len(e.Name)))
		b = append(append(b, e.Name...), e.Description...)
		if err := h.reply(optList, repServer, b); err != nil {
			return err
		}
	}
	return h.reply(optList, repAck, nil)
}

// parseName reads the export name that starts INFO, GO and the
// *_META_CONTEXT options, and returns the rest of data.
func parseName(data []byte) (name string, rest []byte, ok bool) {
	if len(data) < 4 {
		return "", nil, false
	}
	n := be.Uint32(data)
	if n > maxStringLen || uint64(n) > uint64(len(data)-4) {
		return "", nil, false
	}
	return string(data[4 : 4+n]), data[4+n:], true
}

func (h *handshake) info(opt uint32, data []byte) (*transmission, bool, error) {
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 2 || len(rest) != 2+2*int(be.Uint16(rest)) {
		return nil, false, h.replyErr(opt, repErrInvalid, "malformed NBD_OPT_INFO or NBD_OPT_GO")
	}
	e := h.s.export(name)
	if e == nil {
		return nil, false, h.replyErr(opt, repErrUnknown, fmt.Sprintf("no export named %.64q", name))
	}
	var wantName, wantDesc bool
	for i := 2; i < len(rest); i += 2 {
		switch be.Uint16(rest[i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	var b [14]byte
	be.PutUint16(b[0:], infoExport)
	be.PutUint64(b[2:], uint64(e.Disk.Size()))
	be.PutUint16(b[10:], exportFlags(e.Disk, h.structured))
	if err := h.reply(opt, repInfo, b[:12]); err != nil {
		return nil, false, err
	}
	if wantName {
		if err := h.reply(opt, repInfo, append([]byte{0, infoName}, e.Name...)); err != nil {
			return nil, false, err
		}
	}
	if wantDesc && e.Description != "" {
		if err := h.reply(opt, repInfo, append([]byte{0, infoDescription}, e.Description...)); err != nil {
			return nil, false, err
		}
	}
	// Sent whether asked for or not, as qemu does: clients that did not
	// ask may ignore it, and those that did must honour it.
	be.PutUint16(b[0:], infoBlockSize)
	be.PutUint32(b[2:], minBlockSize)
	be.PutUint32(b[6:], preferredBlockSize)
	be.PutUint32(b[10:], maxPayload)
	if err := h.reply(opt, repInfo, b[:14]); err != nil {
		return nil, false, err
	}
	if err := h.reply(opt, repAck, nil); err != nil {
		return nil, false, err
	}
	if opt == optGo {
		return h.start(e), true, nil
	}
	return nil, false, nil
}

func (h *handshake) metaContext(opt uint32, data []byte) error {
	set := opt == optSetMetaContext
	if set {
		h.metaExport, h.metaNames = "", nil // replaced even if this fails
	}
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 4 {
		return h.replyErr(opt, repErrInvalid, "malformed meta context option")
	}
	nq := be.Uint32(rest)
	rest = rest[4:]
	if nq > maxMetaQueries {
		return h.replyErr(opt, repErrTooBig, fmt.Sprintf("more than %d queries", maxMetaQueries))
	}
	var queries []string
	for range nq {
		q, r, ok := parseName(rest)
		if !ok {
			return h.replyErr(opt, repErrInvalid, "malformed meta context query")
		}
		rest = r
		queries = append(queries, q)
	}
	switch {
	case len(rest) != 0:
		return h.replyErr(opt, repErrInvalid, "meta context option longer than its queries")
	case set && !h.structured:
		return h.replyErr(opt, repErrInvalid, "NBD_OPT_SET_META_CONTEXT needs structured replies")
	case h.s.export(name) == nil:
		return h.replyErr(opt, repErrUnknown, fmt.Sprintf("no export named %.64q", name))
	}
	var chosen []string
	for _, c := range contexts(h.s.export(name)) {
		if !set && nq == 0 || slices.ContainsFunc(queries, func(q string) bool { return matches(q, c, set) }) {
			chosen = append(chosen, c)
		}
	}
	if set {
		h.metaExport, h.metaNames = name, chosen
	}
	for i, c := range chosen {
		var id uint32 // "SHOULD be 0" in a list
		if set {
			id = uint32(i + 1)
		}
		b := make([]byte, 4, 4+len(c))
		be.PutUint32(b, id)
		if err := h.reply(opt, repMetaContext, append(b, c...)); err != nil {
			return err
		}
	}
	return h.reply(opt, repAck, nil)
}

// contexts lists the metadata contexts of export e: base:allocation,
// qemu:allocation-depth if it offers it, and a qemu:dirty-bitmap context
// for each of its bitmaps.
func contexts(e *Export) []string {
	cs := []string{contextBaseAllocation}
	if e.AllocationDepth {
		cs = append(cs, contextDepth)
	}
	for _, b := range e.Bitmaps {
		cs = append(cs, contextDirtyBitmap+b)
	}
	return cs
}

// matches reports whether query q selects context c. Listing, a namespace
// ("base:", "qemu:") or a leaf prefix ending in ':' ("qemu:dirty-bitmap:")
// selects every context in it; setting takes exact names only.
func matches(q, c string, set bool) bool {
	return q == c || !set && strings.HasSuffix(q, ":") && strings.HasPrefix(c, q)
}

// start returns the transmission phase for export e with what has been
// negotiated so far.
func (h *handshake) start(e *Export) *transmission {
	var meta []string
	if h.metaExport == e.Name {
		meta = h.metaNames
	}
	return newTransmission(h.s, e, h.c, h.log.With("export", e.Name), h.structured, meta)
}

// exportFlags returns the transmission flags for d: exactly what the
// export can do.
func exportFlags(d diskserve.DiskFile, structured bool) uint16 {
	f := uint16(tflagHasFlags | tflagCanMultiConn | tflagSendCache)
	if structured {
		f |= tflagSendDF
	}
	if d.ReadOnly() {
		return f | tflagReadOnly
	}
	f |= tflagSendFlush | tflagSendFUA | tflagSendWriteZeroes
	caps := diskserve.CapabilitiesOf(d)
	if caps&diskserve.CanPunchHole != 0 {
		f |= tflagSendTrim
	}
	if caps&diskserve.CanWriteZeroes != 0 {
		f |= tflagSendFastZero
	}
	return f
}
