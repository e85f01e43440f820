package nbd

import (
	"bytes"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/faultdisk"
)

// TestInjectedFaults fails reads, writes and flushes of the disk beneath
// the I/O engine: each reaches the client as the NBD error its cause maps
// to, the connection goes on serving, and a second client is served
// throughout.
func TestInjectedFaults(t *testing.T) {
	mem := disktest.NewMemory(pattern(1<<20), false)
	fd := faultdisk.New(mem)
	w, err := async.Wrap(fd, async.Options{Mode: async.Pool})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	_, path := start(t, []Export{{Disk: w}}, Options{})
	a, b := connect(t, path), connect(t, path)
	a.goExport("")
	b.goExport("")
	expect := func(cl *client, what string, want uint32, cookie uint64) {
		t.Helper()
		errno, c := cl.simple()
		if errno != want || c != cookie {
			t.Fatalf("%s: errno %d cookie %d, want %d and %d", what, errno, c, want, cookie)
		}
	}
	data := bytes.Repeat([]byte{0xc3}, 4096)
	cookie := uint64(0)
	next := func() uint64 { cookie++; return cookie }

	for _, tc := range []struct {
		what  string
		op    faultdisk.Op
		err   error
		cmd   uint16
		errno uint32
	}{
		{"READ with EIO", faultdisk.Read, syscall.EIO, cmdRead, errIO},
		{"WRITE with EIO", faultdisk.Write, syscall.EIO, cmdWrite, errIO},
		{"WRITE with ENOSPC", faultdisk.Write, syscall.ENOSPC, cmdWrite, errNoSpc},
		{"WRITE_ZEROES with EIO", faultdisk.Write, syscall.EIO, cmdWriteZeroes, errIO},
		{"FLUSH with EIO", faultdisk.Flush, syscall.EIO, cmdFlush, errIO},
	} {
		fd.Fail(tc.op, tc.err, 0)
		var payload []byte
		length := uint32(4096)
		switch tc.cmd {
		case cmdWrite:
			payload = data
		case cmdFlush:
			length = 0
		}
		c := next()
		a.request(tc.cmd, 0, c, 8192, length, payload)
		expect(a, tc.what, tc.errno, c)
		fd.Fail(tc.op, nil, 0)

		// The same connection and another one go on.
		c = next()
		a.request(cmdWrite, 0, c, 8192, 4096, data)
		expect(a, tc.what+": WRITE after it", 0, c)
		c = next()
		b.request(cmdRead, 0, c, 8192, 4096, nil)
		expect(b, tc.what+": READ on another connection", 0, c)
		if got := b.read(4096); !bytes.Equal(got, data) {
			t.Fatalf("%s: the other connection reads the wrong data", tc.what)
		}
	}
	if n := fd.Hits(faultdisk.Read) + fd.Hits(faultdisk.Write) + fd.Hits(faultdisk.Flush); n != 5 {
		t.Fatalf("%d faults injected, want one per case", n)
	}
}
