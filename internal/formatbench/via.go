package formatbench

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

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
		cl, err := nbd.Dial("unix", sock, "")
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
