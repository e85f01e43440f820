package nbd

import (
	"bytes"
	"crypto/tls"
	"io"
	"testing"
	"time"
)

// TestStartTLSDiscardsPipelinedPlaintext sends an option in the clear
// right behind NBD_OPT_STARTTLS, in the same write, as an attacker in the
// middle could inject it (nbdkit's CVE-2021-3716): the server answers the
// STARTTLS, never the option, and ends the connection when what follows
// is not a TLS handshake.
func TestStartTLSDiscardsPipelinedPlaintext(t *testing.T) {
	cert := writeCA(t, t.TempDir())
	e, _ := memExport("", false)
	_, sock := start(t, []Export{e}, Options{TLS: &tls.Config{Certificates: []tls.Certificate{cert}}, TLSMode: TLSAllow})
	cl := connect(t, sock)
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, optStartTLS)
	b = be.AppendUint32(b, 0)
	b = be.AppendUint64(b, magicOpt) // pipelined in the clear: LIST
	b = be.AppendUint32(b, optList)
	b = be.AppendUint32(b, 0)
	cl.write(b)
	cl.expect(optStartTLS, repAck)
	cl.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	rest, err := io.ReadAll(cl.c)
	if err != nil && !isTimeout(err) {
		t.Logf("after STARTTLS: %v", err)
	}
	if isTimeout(err) {
		t.Fatal("the connection stayed open after plaintext where a TLS handshake belonged")
	}
	if m := be.AppendUint64(nil, magicOptReply); bytes.Contains(rest, m) {
		t.Fatalf("the server answered an option sent in the clear after STARTTLS: % x", rest)
	}
}

// TestStartTLSForgetsCleartextOptions negotiates structured replies in the
// clear, upgrades to TLS and attaches: the export is served with simple
// replies, since what was negotiated in the clear is forgotten.
func TestStartTLSForgetsCleartextOptions(t *testing.T) {
	cert := writeCA(t, t.TempDir())
	e, _ := memExport("", false)
	_, sock := start(t, []Export{e}, Options{TLS: &tls.Config{Certificates: []tls.Certificate{cert}}, TLSMode: TLSAllow})
	cl := connect(t, sock)
	cl.option(optStructuredReply, nil)
	cl.expect(optStructuredReply, repAck)
	cl.option(optStartTLS, nil)
	cl.expect(optStartTLS, repAck)
	tc := tls.Client(cl.c, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	secure := &client{t: t, c: tc}
	secure.goExport("")
	secure.request(cmdRead, 0, 7, 0, 512, nil)
	if errno, cookie := secure.simple(); errno != 0 || cookie != 7 {
		t.Fatalf("READ after STARTTLS: errno %d cookie %d", errno, cookie)
	}
}

func isTimeout(err error) bool {
	te, ok := err.(interface{ Timeout() bool })
	return ok && te.Timeout()
}
