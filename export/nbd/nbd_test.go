package nbd

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"fmt"
	"io"
	"math/big"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/disktest"
)

// pattern returns n bytes in which every 8-byte word holds its own offset,
// so a read from the wrong place shows at once.
func pattern(n int) []byte {
	p := make([]byte, n+8)
	for i := 0; i < n; i += 8 {
		binary.BigEndian.PutUint64(p[i:], uint64(i))
	}
	return p[:n]
}

const diskSize = 1<<20 + 512 // not a multiple of 4096

func memExport(name string, readOnly bool) (Export, *disktest.Memory) {
	d := disktest.NewMemory(pattern(diskSize), readOnly)
	return Export{Name: name, Description: "test disk " + name, Disk: d}, d
}

func TestGreetingAndClientFlags(t *testing.T) {
	e, _ := memExport("", false)
	_, path := start(t, []Export{e}, Options{})
	cl := dial(t, path)
	cl.u32(1 << 5) // unknown client flag
	cl.closed()
}

func TestList(t *testing.T) {
	a, _ := memExport("a", false)
	b, _ := memExport("", true)
	_, path := start(t, []Export{a, b}, Options{})
	cl := connect(t, path)
	cl.option(optList, nil)
	var got []string
	for {
		r := cl.optReply()
		if r.typ == repAck {
			break
		}
		if r.typ != repServer {
			t.Fatalf("LIST reply type %#x", r.typ)
		}
		n := be.Uint32(r.data)
		got = append(got, string(r.data[4:4+n])+"|"+string(r.data[4+n:]))
	}
	if want := []string{"a|test disk a", "|test disk "}; !slices.Equal(got, want) {
		t.Fatalf("LIST = %q, want %q", got, want)
	}
	cl.option(optList, []byte("x"))
	cl.expect(optList, repErrInvalid)
}

func TestInfo(t *testing.T) {
	e, _ := memExport("disk", false)
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	cl.option(optInfo, infoData("disk", infoName, infoDescription, infoBlockSize, 999))
	infos := map[uint16][]byte{}
	for r := cl.optReply(); r.typ != repAck; r = cl.optReply() {
		if r.typ != repInfo {
			t.Fatalf("INFO reply %#x %q", r.typ, r.data)
		}
		infos[be.Uint16(r.data)] = r.data[2:]
	}
	exp := infos[infoExport]
	if len(exp) != 10 || be.Uint64(exp) != diskSize {
		t.Fatalf("NBD_INFO_EXPORT = % x", exp)
	}
	flags := be.Uint16(exp[8:])
	want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendWriteZeroes | tflagCanMultiConn | tflagSendCache)
	if flags != want { // a bare memory disk: no TRIM, no FAST_ZERO, no DF without structured replies
		t.Errorf("flags %#x, want %#x", flags, want)
	}
	if string(infos[infoName]) != "disk" || string(infos[infoDescription]) != "test disk disk" {
		t.Errorf("name %q, description %q", infos[infoName], infos[infoDescription])
	}
	bs := infos[infoBlockSize]
	if len(bs) != 12 || be.Uint32(bs) != 1 || be.Uint32(bs[4:]) != 4096 || be.Uint32(bs[8:]) != 32<<20 {
		t.Errorf("block sizes % x", bs)
	}
	cl.option(optInfo, infoData("nope"))
	cl.expect(optInfo, repErrUnknown)
	for _, bad := range [][]byte{nil, {0, 0, 0, 9, 'a'}, infoData("disk")[:5], append(infoData("disk", 1), 0)} {
		cl.option(optInfo, bad)
		cl.expect(optInfo, repErrInvalid)
	}
	// INFO does not end the negotiation; GO does.
	if f := cl.goExport("disk"); f != flags {
		t.Errorf("GO flags %#x, INFO flags %#x", f, flags)
	}
	cl.request(cmdRead, 0, 1, 0, 8, nil)
	if errno, cookie := cl.simple(); errno != 0 || cookie != 1 {
		t.Fatalf("READ after GO: errno %d cookie %d", errno, cookie)
	}
}

func TestUnknownOptionsKeepSync(t *testing.T) {
	e, _ := memExport("", false)
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	cl.option(99, bytes.Repeat([]byte{0xff}, 1000))
	cl.expect(99, repErrUnsup)
	cl.option(optExtendedHeaders, nil)
	cl.expect(optExtendedHeaders, repErrUnsup)
	cl.option(optPeekExport, nil)
	cl.expect(optPeekExport, repErrUnsup)
	cl.option(optStartTLS, nil)
	cl.expect(optStartTLS, repErrPolicy) // no TLS configured
	cl.option(optStructuredReply, []byte{1})
	cl.expect(optStructuredReply, repErrInvalid)
	cl.option(optStructuredReply, nil)
	cl.expect(optStructuredReply, repAck)
	cl.option(optStructuredReply, nil)
	cl.expect(optStructuredReply, repErrInvalid)
	cl.option(optAbort, nil)
	cl.expect(optAbort, repAck)
	cl.closed()
}

func TestMetaContext(t *testing.T) {
	e, _ := memExport("", false)
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	cl.option(optSetMetaContext, metaData("", contextBaseAllocation))
	cl.expect(optSetMetaContext, repErrInvalid) // needs structured replies
	for _, queries := range [][]string{nil, {"base:"}, {contextBaseAllocation, "qemu:dirty-bitmap:x"}} {
		cl.option(optListMetaContext, metaData("", queries...))
		r := cl.expect(optListMetaContext, repMetaContext)
		if be.Uint32(r.data) != 0 || string(r.data[4:]) != contextBaseAllocation {
			t.Fatalf("LIST_META_CONTEXT %q: % x", queries, r.data)
		}
		cl.expect(optListMetaContext, repAck)
	}
	cl.option(optListMetaContext, metaData("", "x-unknown:thing"))
	cl.expect(optListMetaContext, repAck) // unknown namespaces are ignored
	cl.option(optListMetaContext, metaData("missing"))
	cl.expect(optListMetaContext, repErrUnknown)
	cl.option(optListMetaContext, append(metaData("", "base:"), 7))
	cl.expect(optListMetaContext, repErrInvalid)
	cl.option(optStructuredReply, nil)
	cl.expect(optStructuredReply, repAck)
	cl.option(optSetMetaContext, metaData("", "base:", "x-unknown:a", contextBaseAllocation))
	r := cl.expect(optSetMetaContext, repMetaContext)
	if be.Uint32(r.data) != 1 || string(r.data[4:]) != contextBaseAllocation {
		t.Fatalf("SET_META_CONTEXT reply % x", r.data)
	}
	cl.expect(optSetMetaContext, repAck)
}

func TestExportName(t *testing.T) {
	e, _ := memExport("disk", false)
	_, path := start(t, []Export{e}, Options{})
	for _, noZeroes := range []bool{true, false} {
		cl := dial(t, path)
		flags := uint32(flagFixedNewstyle)
		if noZeroes {
			flags |= flagNoZeroes
		}
		cl.u32(flags)
		cl.option(optExportName, []byte("disk"))
		b := cl.read(10)
		if be.Uint64(b) != diskSize || be.Uint16(b[8:])&tflagHasFlags == 0 {
			t.Fatalf("EXPORT_NAME reply % x", b)
		}
		if !noZeroes && !bytes.Equal(cl.read(124), make([]byte, 124)) {
			t.Fatal("padding is not zero")
		}
		cl.request(cmdRead, 0, 7, 8, 8, nil)
		if errno, cookie := cl.simple(); errno != 0 || cookie != 7 || be.Uint64(cl.read(8)) != 8 {
			t.Fatalf("READ after EXPORT_NAME failed")
		}
	}
	cl := connect(t, path)
	cl.option(optExportName, []byte("other"))
	cl.closed() // EXPORT_NAME has no error reply
}

func TestBadOptions(t *testing.T) {
	e, _ := memExport("", false)
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	cl.write(make([]byte, 16)) // bad magic
	cl.closed()
	cl = connect(t, path)
	b := be.AppendUint64(nil, magicOpt)
	b = be.AppendUint32(b, optList)
	cl.write(be.AppendUint32(b, maxOptionLen+1))
	cl.closed()
}

func TestHandshakeTimeout(t *testing.T) {
	e, _ := memExport("", false)
	_, path := start(t, []Export{e}, Options{HandshakeTimeout: 200 * time.Millisecond})
	cl := connect(t, path)
	cl.closed()
}

// TestSimpleReplies drives every command without structured replies, as
// the Linux kernel does.
func TestSimpleReplies(t *testing.T) {
	e, d := memExport("", false)
	data := d.Bytes()
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	cl.goExport("")
	check := func(what string, wantErr uint32, cookie uint64) {
		t.Helper()
		errno, c := cl.simple()
		if errno != wantErr || c != cookie {
			t.Fatalf("%s: errno %d cookie %d, want %d and %d", what, errno, c, wantErr, cookie)
		}
	}
	cl.request(cmdRead, 0, 1, 4096, 100, nil)
	check("READ", 0, 1)
	if got := cl.read(100); !bytes.Equal(got, data[4096:4196]) {
		t.Fatal("READ returned the wrong data")
	}
	payload := bytes.Repeat([]byte{0xab}, 777)
	cl.request(cmdWrite, cmdFlagFUA, 2, 1000, 777, payload)
	check("WRITE", 0, 2)
	if !bytes.Equal(d.Bytes()[1000:1777], payload) {
		t.Fatal("WRITE did not reach the disk")
	}
	cl.request(cmdWriteZeroes, cmdFlagNoHole, 3, 2000, 5000, nil)
	check("WRITE_ZEROES", 0, 3)
	if !bytes.Equal(d.Bytes()[2000:7000], make([]byte, 5000)) {
		t.Fatal("WRITE_ZEROES did not zero")
	}
	cl.request(cmdFlush, 0, 4, 0, 0, nil)
	check("FLUSH", 0, 4)
	cl.request(cmdCache, 0, 5, 0, diskSize, nil)
	check("CACHE", 0, 5)
	cl.request(cmdRead, 0, 6, diskSize, 0, nil)
	check("READ of 0 bytes at the end", 0, 6)

	// Errors, each followed by a request that must still be understood.
	cl.request(cmdRead, 0, 10, diskSize-10, 11, nil)
	check("READ past the end", errInval, 10)
	cl.request(cmdWrite, 0, 11, diskSize-10, 11, make([]byte, 11))
	check("WRITE past the end", errNoSpc, 11)
	cl.request(cmdWriteZeroes, 0, 12, 1<<62, 1, nil)
	check("WRITE_ZEROES far past the end", errNoSpc, 12)
	cl.request(cmdRead, 0, 13, ^uint64(0), 1, nil)
	check("READ at 2^64-1", errInval, 13)
	cl.request(99, 0, 14, 0, 0, nil)
	check("unknown command", errInval, 14)
	cl.request(cmdRead, cmdFlagNoHole, 15, 0, 1, nil)
	check("NO_HOLE on READ", errInval, 15)
	cl.request(cmdRead, cmdFlagDF, 16, 0, 1, nil)
	check("DF without structured replies", errInval, 16)
	cl.request(cmdBlockStatus, 0, 17, 0, 4096, nil)
	check("BLOCK_STATUS without a context", errInval, 17)
	cl.request(cmdTrim, 0, 18, 0, 4096, nil)
	check("TRIM that was not advertised", errInval, 18)
	cl.request(cmdWriteZeroes, cmdFlagFastZero, 19, 0, 4096, nil)
	check("FAST_ZERO that was not advertised", errInval, 19)
	cl.request(cmdRead, 0, 20, 0, maxPayload+1, nil)
	check("READ over the maximum payload", errInval, 20)
	cl.request(cmdRead, 0, 21, 0, 8, nil)
	check("READ after errors", 0, 21)
	cl.read(8)

	cl.request(cmdDisc, 0, 22, 0, 0, nil)
	cl.closed()
}

func TestReadOnlyExport(t *testing.T) {
	e, d := memExport("", true)
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	if f := cl.goExport(""); f&tflagReadOnly == 0 || f&(tflagSendFlush|tflagSendWriteZeroes|tflagSendTrim) != 0 {
		t.Fatalf("read-only export flags %#x", f)
	}
	before := d.Bytes()
	cl.request(cmdWrite, 0, 1, 0, 4096, make([]byte, 4096))
	cl.request(cmdWriteZeroes, 0, 2, 0, 4096, nil)
	cl.request(cmdTrim, 0, 3, 0, 4096, nil)
	for range 3 {
		if errno, _ := cl.simple(); errno != errPerm {
			t.Fatalf("write to a read-only export: errno %d, want EPERM", errno)
		}
	}
	if !bytes.Equal(d.Bytes(), before) {
		t.Fatal("read-only export changed")
	}
}

func TestOversizedWrite(t *testing.T) {
	e, _ := memExport("", false)
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	cl.goExport("")
	// Over the maximum but within what is drained: an error, in sync.
	n := maxPayload + 4096
	cl.request(cmdWrite, 0, 1, 0, uint32(n), make([]byte, n))
	if errno, _ := cl.simple(); errno != errInval && errno != errNoSpc {
		t.Fatalf("oversized WRITE: errno %d", errno)
	}
	cl.request(cmdFlush, 0, 2, 0, 0, nil)
	if errno, cookie := cl.simple(); errno != 0 || cookie != 2 {
		t.Fatal("stream out of sync after an oversized WRITE")
	}
	// Past what is drained: the connection is dropped, not read forever.
	cl.request(cmdWrite, 0, 3, 0, maxDrain+1, nil)
	cl.closed()
}

func TestStructuredReads(t *testing.T) {
	data := pattern(diskSize)
	clear(data[64<<10 : 192<<10]) // a hole of two 64 KiB runs
	clear(data[300<<10 : 304<<10])
	e := Export{Name: "", Disk: sparseDisk{disktest.NewMemory(data, false)}}
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	if flags := cl.structured(""); flags&tflagSendDF == 0 || flags&tflagSendTrim != 0 {
		t.Errorf("flags %#x: want DF (structured replies) and no TRIM (no HolePuncher)", flags)
	}
	buf := bytes.Repeat([]byte{0xee}, 512<<10)
	cl.request(cmdRead, 0, 1, 0, 512<<10, nil)
	types, errno := cl.structuredRead(1, 0, buf)
	if errno != 0 || !bytes.Equal(buf, data[:512<<10]) {
		t.Fatalf("sparse READ: errno %d, data equal %v", errno, bytes.Equal(buf, data[:512<<10]))
	}
	if !slices.Contains(types, chunkOffsetHole) {
		t.Errorf("a READ over a hole sent no hole chunk: %v", types)
	}
	cl.request(cmdRead, cmdFlagDF, 2, 4096, 300<<10, nil)
	types, errno = cl.structuredRead(2, 4096, buf)
	if errno != 0 || len(types) != 1 || types[0] != chunkOffsetData || !bytes.Equal(buf[:300<<10], data[4096:4096+300<<10]) {
		t.Fatalf("DF READ: chunks %v errno %d", types, errno)
	}
	cl.request(cmdRead, 0, 3, 100, 0, nil)
	if types, errno := cl.structuredRead(3, 100, buf); errno != 0 || !slices.Equal(types, []uint16{chunkNone}) {
		t.Fatalf("READ of 0 bytes: %v %d", types, errno)
	}
	cl.request(cmdRead, 0, 4, diskSize, 1, nil)
	if _, errno := cl.structuredRead(4, diskSize, buf); errno != errInval {
		t.Fatalf("READ past the end: errno %d", errno)
	}
}

func TestStructuredReadError(t *testing.T) {
	e := Export{Disk: failingDisk{disktest.NewMemory(pattern(diskSize), false), 1 << 19}}
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	cl.structured("")
	buf := make([]byte, 1<<20)
	cl.request(cmdRead, 0, 1, 0, 1<<20, nil)
	types, errno := cl.structuredRead(1, 0, buf)
	if errno != errIO || !slices.Equal(types, []uint16{chunkError}) {
		t.Fatalf("failing READ: chunks %v errno %d, want one EIO error chunk", types, errno)
	}
	cl.request(cmdRead, 0, 2, 0, 4096, nil)
	if _, errno := cl.structuredRead(2, 0, buf); errno != 0 {
		t.Fatalf("READ after a failed one: errno %d", errno)
	}
}

func TestBlockStatus(t *testing.T) {
	data := pattern(diskSize)
	clear(data[8192 : 3*4096])
	e := Export{Disk: sparseDisk{disktest.NewMemory(data, false)}}
	_, path := start(t, []Export{e}, Options{})
	cl := connect(t, path)
	cl.structured("")
	status := func(cookie uint64, flags uint16, off uint64, length uint32) [][2]uint32 {
		t.Helper()
		cl.request(cmdBlockStatus, flags, cookie, off, length, nil)
		c := cl.chunk()
		if c.typ != chunkBlockStatus || c.flags&replyFlagDone == 0 || c.cookie != cookie || be.Uint32(c.payload) != 1 { // base:allocation, the only context selected
			t.Fatalf("BLOCK_STATUS reply: %+v", c)
		}
		var d [][2]uint32
		for p := c.payload[4:]; len(p) >= 8; p = p[8:] {
			d = append(d, [2]uint32{be.Uint32(p), be.Uint32(p[4:])})
		}
		return d
	}
	got := status(1, 0, 0, 8*4096)
	want := [][2]uint32{{8192, 0}, {4096, 3}, {5 * 4096, 0}}
	if !slices.Equal(got, want) {
		t.Fatalf("BLOCK_STATUS = %v, want %v", got, want)
	}
	if got := status(2, cmdFlagReqOne, 100, 12000); !slices.Equal(got, [][2]uint32{{8092, 0}}) { // one descriptor, though more follow
		t.Fatalf("BLOCK_STATUS REQ_ONE = %v", got)
	}
	if got := status(3, 0, diskSize-100, 100); !slices.Equal(got, [][2]uint32{{100, 0}}) {
		t.Fatalf("BLOCK_STATUS of the unaligned tail = %v", got)
	}
	cl.request(cmdBlockStatus, 0, 4, 0, 0, nil)
	if c := cl.chunk(); c.typ != chunkError || be.Uint32(c.payload) != errInval {
		t.Fatalf("BLOCK_STATUS of length 0: %+v", c)
	}
}

// TestParallelOutOfOrder pipelines many requests and matches replies by
// cookie, from several connections at once.
func TestParallelOutOfOrder(t *testing.T) {
	e, d := memExport("", false)
	_, path := start(t, []Export{e}, Options{})
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			cl := connect(t, path)
			cl.goExport("")
			const n = 200 // more than requestsPerConn: back-pressure
			region := uint64(g) * (diskSize / 4)
			go func() {
				for i := range uint64(n) {
					if i%2 == 0 {
						cl.request(cmdWrite, 0, i, region+i*512, 512, bytes.Repeat([]byte{byte(g + 1)}, 512))
					} else {
						cl.request(cmdRead, 0, i, region+(i-1)*512, 512, nil)
					}
				}
			}()
			seen := map[uint64]bool{}
			for range n {
				errno, cookie := cl.simple()
				if errno != 0 || seen[cookie] {
					t.Errorf("cookie %d: errno %d, seen %v", cookie, errno, seen[cookie])
					return
				}
				seen[cookie] = true
				if cookie%2 == 1 {
					cl.read(512) // its write may or may not have landed first
				}
			}
		})
	}
	wg.Wait()
	data := d.Bytes()
	for g := range 4 {
		region := g * (diskSize / 4)
		if data[region] != byte(g+1) || data[region+198*512] != byte(g+1) {
			t.Errorf("connection %d's writes are missing", g)
		}
	}
}

func TestBadRequestMagicClosesOnlyThatConnection(t *testing.T) {
	e, _ := memExport("", false)
	_, path := start(t, []Export{e}, Options{})
	good := connect(t, path)
	good.goExport("")
	bad := connect(t, path)
	bad.goExport("")
	bad.write(make([]byte, 28))
	bad.closed()
	good.request(cmdRead, 0, 1, 0, 8, nil)
	if errno, _ := good.simple(); errno != 0 {
		t.Fatal("the other connection broke")
	}
	good.read(8)
}

// flushCounter counts flushes.
type flushCounter struct {
	*disktest.Memory
	mu      sync.Mutex
	flushes int
}

func (f *flushCounter) Flush() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.flushes++
	return nil
}

func TestShutdownFlushes(t *testing.T) {
	d := &flushCounter{Memory: disktest.NewMemory(pattern(diskSize), false)}
	srv, path := start(t, []Export{{Disk: d}}, Options{})
	cl := connect(t, path)
	cl.goExport("")
	cl.request(cmdWrite, 0, 1, 0, 4, []byte("abcd"))
	if errno, _ := cl.simple(); errno != 0 {
		t.Fatal(errno)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	cl.closed()
	if d.flushes == 0 {
		t.Fatal("Shutdown did not flush the export")
	}
	if _, err := net.Dial("unix", path); err == nil {
		t.Fatal("still accepting after Shutdown")
	}
}

// testCert returns a self-signed certificate for 127.0.0.1 and a pool that
// trusts it.
func testCert(t *testing.T) (tls.Certificate, *x509.CertPool) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "diskserve test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"localhost"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

func TestTLS(t *testing.T) {
	cert, pool := testCert(t)
	for _, mode := range []TLSMode{TLSRequire, TLSAllow} {
		t.Run(fmt.Sprint(mode), func(t *testing.T) {
			e, d := memExport("", false)
			data := d.Bytes()
			_, path := start(t, []Export{e}, Options{TLS: &tls.Config{Certificates: []tls.Certificate{cert}}, TLSMode: mode})
			cl := connect(t, path)
			cl.option(optStructuredReply, nil)
			if mode == TLSRequire {
				cl.expect(optStructuredReply, repErrTLSReqd)
				cl.option(optList, nil)
				cl.expect(optList, repErrTLSReqd)
			} else {
				cl.expect(optStructuredReply, repAck) // to be forgotten after STARTTLS
			}
			cl.option(optStartTLS, nil)
			cl.expect(optStartTLS, repAck)
			tc := tls.Client(cl.c, &tls.Config{RootCAs: pool, ServerName: "localhost"})
			if err := tc.Handshake(); err != nil {
				t.Fatal(err)
			}
			cl.c = tc
			cl.option(optStartTLS, nil)
			cl.expect(optStartTLS, repErrInvalid)
			cl.goExport("")
			cl.request(cmdRead, 0, 1, 8, 8, nil) // a simple reply: structured replies were forgotten
			if errno, _ := cl.simple(); errno != 0 || !bytes.Equal(cl.read(8), data[8:16]) {
				t.Fatal("READ over TLS failed")
			}
		})
	}
	t.Run("EXPORT_NAME before STARTTLS", func(t *testing.T) {
		e, _ := memExport("", false)
		_, path := start(t, []Export{e}, Options{TLS: &tls.Config{Certificates: []tls.Certificate{cert}}})
		cl := connect(t, path)
		cl.option(optExportName, nil)
		cl.closed()
	})
}

func TestNewServerValidates(t *testing.T) {
	e, _ := memExport("a", false)
	if _, err := NewServer([]Export{e, e}, Options{}); err == nil {
		t.Error("duplicate export names accepted")
	}
	if _, err := NewServer([]Export{{Name: "x"}}, Options{}); err == nil {
		t.Error("export without a disk accepted")
	}
}

// TestTLSClientCertificates requires client certificates signed by the
// configured CA: a client without one, or with one from another CA, gets
// no export; a client with a good one reads.
func TestTLSClientCertificates(t *testing.T) {
	cert, pool := testCert(t)
	stranger, _ := testCert(t)
	e, d := memExport("", false)
	data := d.Bytes()
	_, path := start(t, []Export{e}, Options{TLS: &tls.Config{
		Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert,
	}})
	attach := func(clientCerts []tls.Certificate) (*client, error) {
		cl := connect(t, path)
		cl.option(optStartTLS, nil)
		cl.expect(optStartTLS, repAck)
		tc := tls.Client(cl.c, &tls.Config{RootCAs: pool, ServerName: "localhost", Certificates: clientCerts})
		if err := tc.Handshake(); err != nil {
			return nil, err
		}
		// In TLS 1.3 the server's verdict on the client certificate
		// arrives with the first read.
		cl.c = tc
		b := be.AppendUint64(nil, magicOpt)
		b = be.AppendUint32(b, optGo)
		b = be.AppendUint32(b, uint32(len(infoData(""))))
		if _, err := tc.Write(append(b, infoData("")...)); err != nil {
			return nil, err
		}
		h := make([]byte, 20)
		if _, err := io.ReadFull(tc, h); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(tc, make([]byte, be.Uint32(h[16:]))); err != nil {
			return nil, err
		}
		for typ := be.Uint32(h[12:]); typ != repAck; typ = cl.optReply().typ {
		}
		return cl, nil
	}
	for name, certs := range map[string][]tls.Certificate{"no certificate": nil, "another CA's certificate": {stranger}} {
		if _, err := attach(certs); err == nil {
			t.Errorf("%s: the server went on past the TLS handshake", name)
		}
	}
	cl, err := attach([]tls.Certificate{cert})
	if err != nil {
		t.Fatalf("a certificate from the CA: %v", err)
	}
	cl.request(cmdRead, 0, 1, 0, 16, nil)
	if errno, _ := cl.simple(); errno != 0 || !bytes.Equal(cl.read(16), data[:16]) {
		t.Fatal("READ with a good client certificate failed")
	}
}

// TestClient reads and writes an export with the package's Client, many
// requests at once.
func TestClient(t *testing.T) {
	e, mem := memExport("", false)
	_, sock := start(t, []Export{e}, Options{})
	cl, err := Dial("unix", sock, "")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			p := bytes.Repeat([]byte{byte(i + 1)}, 4096)
			if _, err := cl.WriteAt(p, int64(i)*4096); err != nil {
				t.Error(err)
			}
			got := make([]byte, 4096)
			if _, err := cl.ReadAt(got, int64(i)*4096); err != nil || !bytes.Equal(got, p) {
				t.Errorf("read back %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if err := cl.Close(); err != nil {
		t.Error(err)
	}
	if got := mem.Bytes()[7*4096]; got != 8 {
		t.Errorf("the disk holds %d at the last write", got)
	}
}
