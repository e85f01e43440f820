package nbd

import (
	"bytes"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/testtool"
)

// TestHostileClients opens 200 connections at once: some send garbage,
// some stall in the handshake, some send oversized lengths, some hang up
// in the middle of a WRITE, while well-behaved nbdcopy clients copy the
// export and check every byte. The good clients all finish with the right
// data, and afterwards the server's goroutines and heap return to where
// they were.
func TestHostileClients(t *testing.T) {
	nbdcopy := testtool.Need(t, "nbdcopy")
	content := make([]byte, 16<<20)
	rand.NewChaCha8([32]byte{7}).Read(content)
	mem := disktest.NewMemory(content, false)
	_, path := start(t, []Export{{Disk: mem}}, Options{HandshakeTimeout: 5 * time.Second})
	baseGoroutines, baseHeap := settle()

	var wg sync.WaitGroup
	dial := func() net.Conn {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Error(err)
			return nil
		}
		c.SetDeadline(time.Now().Add(30 * time.Second))
		return c
	}
	// handshake negotiates the default export, without checking.
	handshake := func(c net.Conn) {
		c.Read(make([]byte, 18))
		b := be.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
		b = be.AppendUint64(b, magicOpt)
		b = be.AppendUint32(b, optGo)
		b = be.AppendUint32(b, uint32(len(infoData(""))))
		c.Write(append(b, infoData("")...))
	}
	request := func(typ uint16, off uint64, length uint32) []byte {
		return requestHeader(typ, 0, 1, off, length)
	}
	hostile := []func(c net.Conn, rnd *rand.Rand){
		func(c net.Conn, rnd *rand.Rand) { // garbage at once
			junk := make([]byte, 1+rnd.IntN(4096))
			rand.NewChaCha8([32]byte{byte(rnd.Uint32())}).Read(junk)
			c.Write(junk)
		},
		func(c net.Conn, _ *rand.Rand) { // stall in the handshake until timed out
			c.Read(make([]byte, 18))
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			c.Read(make([]byte, 1)) // returns when the server gives up
		},
		func(c net.Conn, _ *rand.Rand) { // oversized lengths
			handshake(c)
			c.Write(request(cmdRead, 0, 1<<31))
			c.Write(request(cmdWrite, 0, 0xffffffff))
			c.Write(make([]byte, 64<<10))
		},
		func(c net.Conn, _ *rand.Rand) { // hang up in the middle of a WRITE
			handshake(c)
			c.Write(request(cmdWrite, 4096, 1<<20))
			c.Write(make([]byte, 300<<10))
		},
		func(c net.Conn, rnd *rand.Rand) { // garbage after the handshake
			handshake(c)
			junk := make([]byte, 28*(1+rnd.IntN(50)))
			rand.NewChaCha8([32]byte{byte(rnd.Uint32())}).Read(junk)
			c.Write(junk)
		},
	}
	const good = 16
	for i := range 200 - good {
		wg.Go(func() {
			c := dial()
			if c == nil {
				return
			}
			defer c.Close()
			hostile[i%len(hostile)](c, rand.New(rand.NewPCG(uint64(i), 1)))
		})
	}
	dir := t.TempDir()
	for i := range good {
		wg.Go(func() {
			out := filepath.Join(dir, "copy"+string(rune('a'+i)))
			if b, err := exec.Command(nbdcopy, "nbd+unix:///?socket="+path, out).CombinedOutput(); err != nil {
				t.Errorf("nbdcopy %d: %v\n%s", i, err, b)
				return
			}
			got, err := os.ReadFile(out)
			if err != nil || !bytes.Equal(got, content) {
				t.Errorf("nbdcopy %d: the copy differs from the export (%v)", i, err)
			}
		})
	}
	wg.Wait()
	// The mid-WRITE hang-ups must not have written anything.
	if !bytes.Equal(mem.Bytes(), content) {
		t.Error("a WRITE cut short changed the disk")
	}
	goroutines, heap := settle()
	if goroutines > baseGoroutines+2 {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines before, %d after:\n%s", baseGoroutines, goroutines, buf[:runtime.Stack(buf, true)])
	}
	if heap > baseHeap+32<<20 {
		t.Errorf("heap in use grew from %d to %d bytes", baseHeap, heap)
	}
}

// settle waits for connections to wind down and returns the goroutine
// count and the heap in use after a garbage collection.
func settle() (int, uint64) {
	n, same := runtime.NumGoroutine(), 0
	for deadline := time.Now().Add(15 * time.Second); same < 5 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		prev := n
		if n = runtime.NumGoroutine(); n == prev {
			same++
		} else {
			same = 0
		}
	}
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return n, ms.HeapInuse
}
