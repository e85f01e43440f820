package nbd

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/disktest"
)

// TestClientVanishes drops clients in the middle of a WRITE payload and
// with READs in flight; the server keeps serving others, and the cut-short
// WRITE changes nothing.
func TestClientVanishes(t *testing.T) {
	e, d := memExport("", false)
	_, path := start(t, []Export{e}, Options{})
	good := connect(t, path)
	good.goExport("")

	cut := connect(t, path)
	cut.goExport("")
	cut.request(cmdWrite, 0, 1, 0, 65536, bytes.Repeat([]byte{0xcc}, 1000))
	cut.c.Close()

	busy := connect(t, path)
	busy.goExport("")
	for i := range uint64(100) {
		busy.request(cmdRead, 0, i, 0, 256<<10, nil)
	}
	busy.c.Close()

	for i := range uint64(20) {
		good.request(cmdRead, 0, i, 0, 4096, nil)
		if errno, cookie := good.simple(); errno != 0 || cookie != i {
			t.Fatalf("READ on the remaining connection: errno %d cookie %d", errno, cookie)
		}
		good.read(4096)
	}
	if !bytes.Equal(d.Bytes()[:65536], pattern(65536)) {
		t.Fatal("a WRITE whose payload never fully arrived changed the disk")
	}
}

// TestRequestPathAllocs pins that serving READ and WRITE requests, once
// warm, allocates nothing: request objects, buffers and reply headers are
// all reused.
func TestRequestPathAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	e, _ := memExport("", false)
	_, path := start(t, []Export{e}, Options{})
	for _, structured := range []bool{false, true} {
		cl := attach(t, path, structured)
		read := requestHeader(cmdRead, 0, 1, 8192, 4096)
		write := bytes.Clone(read)
		be.PutUint16(write[6:], cmdWrite)
		write = append(write, make([]byte, 4096)...)
		readReply := make([]byte, 16+4096)
		if structured {
			readReply = make([]byte, 20+8+4096)
		}
		writeReply := make([]byte, 16)
		roundTrip := func() {
			cl.c.Write(read)
			io.ReadFull(cl.c, readReply)
			cl.c.Write(write)
			io.ReadFull(cl.c, writeReply)
		}
		for range 100 { // warm the pools
			roundTrip()
		}
		if n := testing.AllocsPerRun(500, roundTrip); n > 0.1 {
			t.Errorf("structured=%v: %.2f allocations per READ and WRITE", structured, n)
		}
	}
}

// FuzzServer feeds arbitrary bytes to a server as a client's whole side of
// a connection. The server must neither panic nor hang, and must leave the
// disk's size alone. The read-only export maps its reads onto a host file,
// so that its READs take the reader's page-cache path.
func FuzzServer(f *testing.F) {
	for _, seed := range fuzzSeeds() {
		f.Add(seed)
	}
	host := hostFile(f, pattern(4096))
	f.Fuzz(func(t *testing.T, in []byte) {
		data := pattern(64 << 10)
		disk := sparseDisk{disktest.NewMemory(data, false)}
		ro := hostMapped{disktest.NewMemory(pattern(4096), true), host}
		srv, err := NewServer([]Export{{Name: "", Disk: disk}, {Name: "ro", Disk: ro}}, Options{HandshakeTimeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		server, client := net.Pipe()
		done := make(chan struct{})
		go func() {
			srv.ServeConn(server)
			close(done)
		}()
		go io.Copy(io.Discard, client)
		client.Write(in)
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the server did not end the connection")
		}
		if disk.Size() != 64<<10 {
			t.Fatalf("disk size changed to %d", disk.Size())
		}
	})
}

// fuzzSeeds are whole client sessions: negotiation in several styles
// followed by requests of every kind.
func fuzzSeeds() [][]byte {
	opt := func(b []byte, o uint32, data []byte) []byte {
		b = be.AppendUint64(b, magicOpt)
		b = be.AppendUint32(b, o)
		b = be.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	req := func(b []byte, typ, flags uint16, off uint64, n uint32, payload bool) []byte {
		b = be.AppendUint32(b, magicRequest)
		b = be.AppendUint16(b, flags)
		b = be.AppendUint16(b, typ)
		b = be.AppendUint64(b, 7)
		b = be.AppendUint64(b, off)
		b = be.AppendUint32(b, n)
		if payload {
			b = append(b, bytes.Repeat([]byte{0x5a}, int(n))...)
		}
		return b
	}
	requests := func(b []byte) []byte {
		b = req(b, cmdRead, 0, 0, 4096, false)
		b = req(b, cmdWrite, cmdFlagFUA, 100, 300, true)
		b = req(b, cmdWriteZeroes, cmdFlagNoHole, 1000, 5000, false)
		b = req(b, cmdTrim, 0, 8192, 8192, false)
		b = req(b, cmdBlockStatus, cmdFlagReqOne, 0, 65536, false)
		b = req(b, cmdRead, cmdFlagDF, 60000, 5536, false)
		b = req(b, cmdCache, 0, 0, 65536, false)
		b = req(b, cmdFlush, 0, 0, 0, false)
		b = req(b, cmdRead, 0, 65000, 1000, false)
		return req(b, cmdDisc, 0, 0, 0, false)
	}
	flags := be.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	var seeds [][]byte
	// GO with structured replies and block status.
	b := opt(bytes.Clone(flags), optStructuredReply, nil)
	b = opt(b, optSetMetaContext, metaData("", contextBaseAllocation))
	b = opt(b, optGo, infoData("", infoBlockSize))
	seeds = append(seeds, requests(b))
	// GO with simple replies, after LIST and INFO.
	b = opt(bytes.Clone(flags), optList, nil)
	b = opt(b, optInfo, infoData("ro", infoName, infoDescription))
	b = opt(b, optGo, infoData(""))
	seeds = append(seeds, requests(b))
	// EXPORT_NAME, old style.
	seeds = append(seeds, requests(opt(be.AppendUint32(nil, flagFixedNewstyle), optExportName, []byte("ro"))))
	// Options the server refuses, then ABORT.
	b = opt(bytes.Clone(flags), 99, []byte("junk"))
	b = opt(b, optStartTLS, nil)
	b = opt(b, optListMetaContext, metaData("", "base:"))
	seeds = append(seeds, opt(b, optAbort, nil))
	return seeds
}
