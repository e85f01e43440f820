package formatbench

import (
	"bufio"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/export/nbd"
	"github.com/diskserve/diskserve/format"
)

// The paths requests can take to the disk.
const (
	ViaEngine = "engine" // the I/O engine, called in process
	ViaNBD    = "nbd"    // diskserve's NBD server, over a Unix socket
	ViaFUSE   = "fuse"   // diskserve's FUSE file, with O_DIRECT
)

// Vias lists them.
var Vias = []string{ViaEngine, ViaNBD, ViaFUSE}

// A target is what a measurement reads and writes.
type target interface {
	io.ReaderAt
	io.WriterAt
}

// attach opens the image at path (of format openAs) through c's engine and
// returns a target that reaches it by way of c.Via, the disk's size, the
// engine's name, and a function that flushes, detaches and closes it all.
func attach(c Config, path, openAs string, readOnly bool) (target, int64, string, func() error, error) {
	if c.Via == ViaFUSE {
		return mount(c, path, openAs, readOnly)
	}
	opts := format.Options(c.Open)
	opts.Format, opts.ReadOnly = openAs, readOnly
	d, err := diskserve.Open(path, opts)
	if err != nil {
		return nil, 0, "", nil, err
	}
	w, err := async.Wrap(d, async.Options{Mode: c.Engine})
	if err != nil {
		d.Close()
		return nil, 0, "", nil, err
	}
	closeDisk := func() error { return errors.Join(diskserve.Flush(w), w.Close()) }
	switch c.Via {
	case ViaEngine, "":
		return w, w.Size(), w.Engine().Name(), closeDisk, nil
	case ViaNBD:
		srv, err := nbd.NewServer([]nbd.Export{{Disk: w}}, nbd.Options{})
		if err != nil {
			w.Close()
			return nil, 0, "", nil, err
		}
		sock := filepath.Join(c.Dir, "nbd.sock")
		os.Remove(sock)
		l, err := net.Listen("unix", sock)
		if err != nil {
			w.Close()
			return nil, 0, "", nil, err
		}
		go srv.Serve(l)
		cl, err := dialNBD(sock)
		if err != nil {
			srv.Shutdown(context.Background())
			w.Close()
			return nil, 0, "", nil, err
		}
		detach := func() error {
			return errors.Join(cl.Close(), srv.Shutdown(context.Background()), closeDisk())
		}
		return cl, w.Size(), w.Engine().Name(), detach, nil
	}
	w.Close()
	return nil, 0, "", nil, fmt.Errorf("unknown path %q (%v)", c.Via, Vias)
}

// mount serves the image with `diskserve mount` in a child process and
// opens the mounted file with O_DIRECT.
func mount(c Config, path, openAs string, readOnly bool) (target, int64, string, func() error, error) {
	if c.Self == "" {
		return nil, 0, "", nil, errors.New("measuring through FUSE needs the diskserve binary (Config.Self)")
	}
	mnt := filepath.Join(c.Dir, "fuse-disk")
	if err := os.WriteFile(mnt, nil, 0o600); err != nil {
		return nil, 0, "", nil, err
	}
	args := []string{"mount", "-f", openAs, "--aio=" + string(cmp.Or(c.Engine, async.Auto)), path, mnt}
	flag := os.O_RDWR
	if readOnly {
		args, flag = append([]string{"mount", "-r"}, args[1:]...), os.O_RDONLY
	}
	cmd := exec.Command(c.Self, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, 0, "", nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, 0, "", nil, err
	}
	stop := func() error {
		cmd.Process.Signal(syscall.SIGTERM)
		return cmd.Wait()
	}
	// The log line "mounted ... engine=NAME" says it is ready.
	var engine string
	sc := bufio.NewScanner(stderr)
	var log strings.Builder
	for sc.Scan() {
		line := sc.Text()
		log.WriteString(line + "\n")
		if strings.Contains(line, "msg=mounted") {
			_, engine, _ = strings.Cut(line, "engine=")
			break
		}
	}
	if engine == "" {
		stop()
		return nil, 0, "", nil, fmt.Errorf("diskserve mount did not mount:\n%s", log.String())
	}
	go io.Copy(io.Discard, stderr)
	f, err := os.OpenFile(mnt, flag|syscall.O_DIRECT, 0)
	if err != nil {
		stop()
		return nil, 0, "", nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		stop()
		return nil, 0, "", nil, err
	}
	detach := func() error { return errors.Join(f.Close(), stop()) }
	return f, st.Size(), strings.Fields(engine)[0], detach, nil
}

// alignedBuffer returns n bytes aligned for O_DIRECT.
func alignedBuffer(n int64) []byte {
	const align = 4096
	b := make([]byte, n+align)
	skip := (align - int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))%align)) % align
	return b[skip : int64(skip)+n : int64(skip)+n]
}

// nbdClient is the least NBD client a benchmark needs: fixed newstyle,
// OPT_GO to the default export, simple replies, many requests in flight
// on one connection (as fio's nbd engine keeps them).
type nbdClient struct {
	c   net.Conn
	wmu sync.Mutex // one request on the wire at a time

	mu      sync.Mutex
	cookie  uint64
	pending map[uint64]*nbdCall
	err     error
	done    chan struct{}
}

type nbdCall struct {
	buf  []byte // READ data goes here
	done chan error
}

const (
	nbdMagic        = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic     = 0x49484156454f5054 // "IHAVEOPT"
	nbdRepMagic     = 0x3e889045565a9
	nbdRequestMagic = 0x25609513
	nbdReplyMagic   = 0x67446698
	nbdOptGo        = 7
	nbdRepAck       = 1
	nbdRepErrBit    = 1 << 31
	nbdCmdRead      = 0
	nbdCmdWrite     = 1
	nbdCmdDisc      = 2
)

var be = binary.BigEndian

func dialNBD(sock string) (*nbdClient, error) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*nbdClient, error) {
		c.Close()
		return nil, fmt.Errorf("NBD handshake: %w", err)
	}
	var g [18]byte
	if _, err := io.ReadFull(c, g[:]); err != nil {
		return fail(err)
	}
	if be.Uint64(g[:]) != nbdMagic || be.Uint64(g[8:]) != nbdOptMagic {
		return fail(errors.New("not a fixed newstyle server"))
	}
	msg := be.AppendUint32(nil, 1|2) // FIXED_NEWSTYLE | NO_ZEROES
	msg = be.AppendUint64(msg, nbdOptMagic)
	msg = be.AppendUint32(msg, nbdOptGo)
	msg = be.AppendUint32(msg, 6) // empty name, no info requests
	msg = be.AppendUint32(msg, 0)
	msg = be.AppendUint16(msg, 0)
	if _, err := c.Write(msg); err != nil {
		return fail(err)
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return fail(err)
		}
		typ, n := be.Uint32(h[12:]), be.Uint32(h[16:])
		if be.Uint64(h[:]) != nbdRepMagic || n > 1<<20 {
			return fail(errors.New("bad option reply"))
		}
		if _, err := io.CopyN(io.Discard, c, int64(n)); err != nil {
			return fail(err)
		}
		if typ&nbdRepErrBit != 0 {
			return fail(fmt.Errorf("server refused OPT_GO (reply %#x)", typ))
		}
		if typ == nbdRepAck {
			break
		}
	}
	cl := &nbdClient{c: c, pending: map[uint64]*nbdCall{}, done: make(chan struct{})}
	go cl.readReplies()
	return cl, nil
}

// readReplies hands each reply to the request waiting for it.
func (cl *nbdClient) readReplies() {
	defer close(cl.done)
	var h [16]byte
	for {
		_, err := io.ReadFull(cl.c, h[:])
		if err == nil && be.Uint32(h[:]) != nbdReplyMagic {
			err = errors.New("bad reply magic")
		}
		var call *nbdCall
		if err == nil {
			cl.mu.Lock()
			call = cl.pending[be.Uint64(h[8:])]
			delete(cl.pending, be.Uint64(h[8:]))
			cl.mu.Unlock()
			if call == nil {
				err = errors.New("reply to no request")
			}
		}
		if err != nil {
			cl.mu.Lock()
			cl.err = err
			for k, p := range cl.pending {
				p.done <- err
				delete(cl.pending, k)
			}
			cl.mu.Unlock()
			return
		}
		if errno := be.Uint32(h[4:]); errno != 0 {
			call.done <- fmt.Errorf("NBD error %d", errno)
			continue
		}
		if call.buf != nil {
			if _, err := io.ReadFull(cl.c, call.buf); err != nil {
				call.done <- err
				continue
			}
		}
		call.done <- nil
	}
}

// do sends one request and waits for its reply.
func (cl *nbdClient) do(cmd uint16, off int64, p []byte) error {
	call := &nbdCall{done: make(chan error, 1)}
	if cmd == nbdCmdRead {
		call.buf = p
	}
	cl.mu.Lock()
	if cl.err != nil {
		cl.mu.Unlock()
		return cl.err
	}
	cl.cookie++
	cookie := cl.cookie
	cl.pending[cookie] = call
	cl.mu.Unlock()
	var h [28]byte
	be.PutUint32(h[0:], nbdRequestMagic)
	be.PutUint16(h[6:], cmd)
	be.PutUint64(h[8:], cookie)
	be.PutUint64(h[16:], uint64(off))
	be.PutUint32(h[24:], uint32(len(p)))
	bufs := net.Buffers{h[:]}
	if cmd == nbdCmdWrite {
		bufs = append(bufs, p)
	}
	cl.wmu.Lock()
	_, err := bufs.WriteTo(cl.c)
	cl.wmu.Unlock()
	if err != nil {
		return err
	}
	return <-call.done
}

func (cl *nbdClient) ReadAt(p []byte, off int64) (int, error) {
	if err := cl.do(nbdCmdRead, off, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (cl *nbdClient) WriteAt(p []byte, off int64) (int, error) {
	if err := cl.do(nbdCmdWrite, off, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close disconnects.
func (cl *nbdClient) Close() error {
	var h [28]byte
	be.PutUint32(h[0:], nbdRequestMagic)
	be.PutUint16(h[6:], nbdCmdDisc)
	cl.wmu.Lock()
	cl.c.Write(h[:])
	cl.wmu.Unlock()
	err := cl.c.Close()
	<-cl.done
	return err
}
