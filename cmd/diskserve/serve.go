package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/export/nbd"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/internal/control"
	"github.com/diskserve/diskserve/remote"
)

type serveFlags struct {
	open        openFlags
	listen      []string
	exportName  string
	description string
	tlsCert     string
	tlsKey      string
	tlsCA       string
	tlsMode     string
	verbose     bool
	control     string
	overlayDir  string
	bitmaps     []string
	depth       bool
	vhostUser   string
	queues      int
	serial      string

	metrics *control.Metrics // with --control
	lives   []control.Export // with --control
}

func newServeCommand() *cobra.Command {
	var f serveFlags
	cmd := &cobra.Command{
		Use:   "serve [flags] IMAGE | NAME=IMAGE...",
		Short: "Serve images over NBD",
		Long: `serve exports images over the Network Block Device protocol until it is
interrupted (SIGINT or SIGTERM), then finishes the requests in flight,
flushes every image and exits.

With one IMAGE it is the default export (name ""), and also NAME with
-x NAME. With NAME=IMAGE arguments each image is exported under its name;
nbdinfo --list shows them.

Clients: qemu (-drive file=nbd://HOST:PORT/NAME or
nbd+unix:///NAME?socket=PATH), nbdinfo, nbdcopy, nbdfuse, fio, nbd-client.

Listeners: --listen HOST:PORT (TCP) or --listen unix:PATH, as often as
needed; the default is 127.0.0.1:10809. Under systemd socket activation
(LISTEN_FDS) the passed sockets are used instead.

With --vhost-user-blk PATH the image is also a vhost-user-blk device: a
VMM attaches it from the socket PATH, one at a time, and a VMM that
reconnects (qemu's -chardev socket,reconnect=1) finds the device where it
left it, requests in flight included. NBD is then served only on the
--listen addresses given. For qemu:

  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=c0,path=PATH,reconnect=1
  -device vhost-user-blk-pci,chardev=c0,num-queues=N`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return runServe(&f, args) },
	}
	fl := cmd.Flags()
	f.open.register(fl, withReadOnly|withSnapshot|withConfine|withAIO|withCache, "each IMAGE")
	fl.StringArrayVarP(&f.listen, "listen", "l", nil, "address to listen on: HOST:PORT or unix:PATH (repeatable; default 127.0.0.1:10809)")
	fl.StringVarP(&f.exportName, "export-name", "x", "", "also export a single IMAGE under this name")
	fl.StringVarP(&f.description, "description", "D", "", "export description shown to clients")
	fl.StringVar(&f.tlsCert, "tls-cert", "", "x509 server certificate (PEM); enables TLS")
	fl.StringVar(&f.tlsKey, "tls-key", "", "private key of --tls-cert (PEM)")
	fl.StringVar(&f.tlsCA, "tls-ca", "", "CA certificates (PEM) that client certificates must chain to; requires client certificates")
	fl.StringVar(&f.tlsMode, "tls", "require", "with TLS: require (no export before STARTTLS) or allow")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log every refused request")
	fl.StringVar(&f.control, "control", "", "serve the control API (exports, live overlays, /metrics) on unix:PATH")
	fl.StringArrayVarP(&f.bitmaps, "bitmap", "B", nil, "offer the image's dirty bitmap NAME as the NBD metadata context qemu:dirty-bitmap:NAME, for incremental backup (repeatable; as qemu-nbd -B; every export must have it)")
	fl.BoolVarP(&f.depth, "allocation-depth", "A", false, "offer the NBD metadata context qemu:allocation-depth: which layer of the backing chain holds each range (as qemu-nbd -A)")
	fl.StringVar(&f.vhostUser, "vhost-user-blk", "", "also serve the image as a vhost-user-blk device on the Unix socket PATH (one VMM at a time)")
	fl.IntVar(&f.queues, "queues", min(runtime.NumCPU(), 16), "with --vhost-user-blk: the most queues a VMM may use")
	fl.StringVar(&f.serial, "serial", "", "with --vhost-user-blk: the disk's serial number (at most 20 bytes), which the guest reads")
	fl.StringVar(&f.overlayDir, "overlay", "", "serve each image writable through a qcow2 overlay in DIR (NAME-overlay.qcow2, made on first use and kept), leaving the image itself unchanged: for remote golden images")
	return cmd
}

func runServe(f *serveFlags, args []string) error {
	level := slog.LevelInfo
	if f.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	tlsConfig, tlsMode, err := f.tlsConfig()
	if err != nil {
		return err
	}
	var reg *prometheus.Registry
	if f.control != "" {
		if !strings.HasPrefix(f.control, "unix:") {
			return fmt.Errorf("--control %s: the control API listens on a Unix socket only (unix:PATH)", f.control)
		}
		reg = prometheus.NewRegistry()
		f.metrics = control.NewMetrics(reg)
	}
	exports, err := f.openExports(args, log)
	defer closeDisks(exports)
	if err != nil {
		return err
	}
	srv, err := nbd.NewServer(exports, nbd.Options{TLS: tlsConfig, TLSMode: tlsMode, Logger: log})
	if err != nil {
		return err
	}
	// From here a signal shuts the server down cleanly: one that arrived
	// while the sockets came up, or right after the log said so, would
	// otherwise kill the process and leave its sockets behind.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	if f.control != "" {
		l, err := control.Listen(strings.TrimPrefix(f.control, "unix:"))
		if err != nil {
			return fmt.Errorf("--control: %w", err)
		}
		api := &http.Server{Handler: control.Handler(f.lives, srv.Clients, reg), ReadHeaderTimeout: 10 * time.Second}
		go api.Serve(l)
		defer api.Close()
		log.Info("control API", "socket", l.Addr().String())
	}
	listeners, err := f.listeners()
	if err != nil {
		return err
	}
	errc := make(chan error, len(listeners)+1)
	if f.vhostUser != "" {
		vs, err := f.serveVhostUser(exports, log, errc)
		if err != nil {
			return err
		}
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			vs.Shutdown(ctx)
		}()
	}
	for _, e := range exports {
		log.Info("export", "name", e.Name, "size", e.Disk.Size(), "read-only", e.Disk.ReadOnly(), "engine", engineName(e.Disk))
	}
	for _, l := range listeners {
		log.Info("listening", "addr", l.Addr().Network()+":"+l.Addr().String())
		go func() { errc <- srv.Serve(l) }()
	}
	var serveErr error
	select {
	case s := <-sig:
		log.Info("shutting down", "signal", s.String())
	case serveErr = <-errc:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		return errors.Join(serveErr, err)
	}
	return serveErr
}

// openExports opens the images named on the command line.
func (f *serveFlags) openExports(args []string, log *slog.Logger) ([]nbd.Export, error) {
	opts, err := f.open.options(false, log)
	if err != nil {
		return nil, err
	}
	if len(args) == 1 && !isNamed(args[0]) {
		d, err := f.openExport("", args[0], opts, log)
		if err != nil {
			return nil, err
		}
		exports := []nbd.Export{{Name: "", Description: f.description, Disk: d, Bitmaps: f.bitmaps, AllocationDepth: f.depth}}
		if f.exportName != "" {
			exports = append(exports, nbd.Export{Name: f.exportName, Description: f.description, Disk: d, Bitmaps: f.bitmaps, AllocationDepth: f.depth})
		}
		return exports, nil
	}
	if f.exportName != "" {
		return nil, errors.New("-x names the export of a single IMAGE; with NAME=IMAGE arguments each names its own")
	}
	var exports []nbd.Export
	for _, a := range args {
		name, path, ok := strings.Cut(a, "=")
		if !ok {
			return exports, fmt.Errorf("%q: with several images, each argument is NAME=IMAGE", a)
		}
		d, err := f.openExport(name, path, opts, log)
		if err != nil {
			return exports, err
		}
		exports = append(exports, nbd.Export{Name: name, Description: f.description, Disk: d, Bitmaps: f.bitmaps, AllocationDepth: f.depth})
	}
	return exports, nil
}

// openExport opens one image, for the export called name, and serves it
// through the I/O engine; with --control, also through a Live disk (for
// live overlays) and the metrics.
func (f *serveFlags) openExport(name, path string, opts diskserve.Options, log *slog.Logger) (diskserve.DiskFile, error) {
	var (
		d   diskserve.DiskFile
		err error
	)
	open := func() error {
		if f.overlayDir != "" {
			d, err = f.openOverlay(name, path, opts, log)
		} else {
			d, err = format.Open(path, opts)
		}
		return err
	}
	if f.metrics != nil {
		f.metrics.RemoteOf(name, open)
	} else {
		open()
	}
	if err != nil {
		return nil, err
	}
	if f.metrics != nil {
		live := control.NewLive(d, opts)
		f.lives = append(f.lives, control.Export{Name: name, Live: live})
		d = live
	}
	d = diskserve.WithCache(d, f.open.cacheMode) // above a live overlay, which it must cover too
	if f.metrics != nil {
		d = f.metrics.Metered(name, d)
	}
	return f.open.aio.wrap(d, log)
}

// openOverlay opens, read-write, the overlay in --overlay DIR of the image
// at path, making it first if it does not exist. An overlay that exists
// must have been made for the same image: it holds the writes of an
// earlier run, which go on from where they were.
func (f *serveFlags) openOverlay(name, path string, opts diskserve.Options, log *slog.Logger) (diskserve.DiskFile, error) {
	if opts.Snapshot != "" || f.open.readOnly {
		return nil, errors.New("--overlay serves images writable: it does not go with --read-only or --snapshot")
	}
	base := path
	if !remote.IsURL(path) {
		var err error
		if base, err = filepath.Abs(path); err != nil {
			return nil, err
		}
	}
	if name == "" {
		name = strings.TrimSuffix(filepath.Base(diskserve.DisplayName(path)), filepath.Ext(path))
	}
	ov := filepath.Join(f.overlayDir, name+"-overlay.qcow2")
	if _, err := os.Lstat(ov); errors.Is(err, fs.ErrNotExist) {
		if strings.HasPrefix(path, "http") && path != diskserve.DisplayName(path) {
			return nil, fmt.Errorf("%s: an overlay records the name of its backing file, and this URL carries credentials (a query or user information): name the image by s3:// or by a URL without them", diskserve.DisplayName(path))
		}
		ro := opts
		ro.ReadOnly = true
		b, err := format.Open(base, ro)
		if err != nil {
			return nil, err
		}
		info, size := diskserve.Describe(b), b.Size()
		b.Close()
		tmp := ov + ".new"
		if err := qcow2.Create(tmp, qcow2.CreateOptions{Size: size, BackingFile: base, BackingFormat: info.Format}); err != nil {
			os.Remove(tmp)
			return nil, err
		}
		if err := os.Rename(tmp, ov); err != nil {
			return nil, err
		}
		log.Info("made an overlay", "overlay", ov, "image", diskserve.DisplayName(base))
	} else if err != nil {
		return nil, err
	} else {
		log.Info("writing to the existing overlay", "overlay", ov, "image", diskserve.DisplayName(base))
	}
	opts.Format, opts.ReadOnly = qcow2.Format.Name, false
	d, err := format.Open(ov, opts)
	if err != nil {
		return nil, err
	}
	if info := diskserve.Describe(d); info.BackingFile != base {
		d.Close()
		return nil, fmt.Errorf("the overlay %s was made for %s, not %s: move it away, or give another --overlay directory", ov, diskserve.DisplayName(info.BackingFile), diskserve.DisplayName(base))
	}
	return d, nil
}

// closeDisks closes the disks of exports, each once.
func closeDisks(exports []nbd.Export) {
	closed := map[diskserve.DiskFile]bool{}
	for _, e := range exports {
		if !closed[e.Disk] {
			closed[e.Disk] = true
			e.Disk.Close()
		}
	}
}

// isNamed reports whether arg is NAME=IMAGE rather than a path that
// happens to contain '='.
func isNamed(arg string) bool {
	if !strings.Contains(arg, "=") || remote.IsURL(arg) { // a presigned URL's query has '='
		return false
	}
	_, err := os.Stat(arg)
	return err != nil
}

// listeners returns the sockets passed by systemd socket activation, or
// else those named by --listen.
func (f *serveFlags) listeners() ([]net.Listener, error) {
	if ls, err := activationListeners(); ls != nil || err != nil {
		return ls, err
	}
	addrs := f.listen
	if len(addrs) == 0 && f.vhostUser == "" {
		addrs = []string{"127.0.0.1:10809"}
	}
	var ls []net.Listener
	for _, a := range addrs {
		l, err := listen(a)
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, err
		}
		ls = append(ls, l)
	}
	return ls, nil
}

func listen(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		// A socket left by an earlier run would make Listen fail.
		if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
			os.Remove(path)
		}
		return net.Listen("unix", path)
	}
	return net.Listen("tcp", addr)
}

// activationListeners returns the listening sockets systemd passed in
// (LISTEN_PID and LISTEN_FDS, first descriptor 3), or nil.
func activationListeners() ([]net.Listener, error) {
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return nil, nil
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n <= 0 {
		return nil, fmt.Errorf("socket activation: bad LISTEN_FDS %q", os.Getenv("LISTEN_FDS"))
	}
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	var ls []net.Listener
	for fd := 3; fd < 3+n; fd++ {
		file := os.NewFile(uintptr(fd), "LISTEN_FD_"+strconv.Itoa(fd))
		l, err := net.FileListener(file)
		file.Close() // FileListener made its own copy
		if err != nil {
			return nil, fmt.Errorf("socket activation: descriptor %d: %w", fd, err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// tlsConfig builds the TLS configuration from the flags, or nil without
// --tls-cert.
func (f *serveFlags) tlsConfig() (*tls.Config, nbd.TLSMode, error) {
	var mode nbd.TLSMode
	switch f.tlsMode {
	case "require":
		mode = nbd.TLSRequire
	case "allow":
		mode = nbd.TLSAllow
	default:
		return nil, 0, fmt.Errorf("--tls must be require or allow, not %q", f.tlsMode)
	}
	if f.tlsCert == "" {
		if f.tlsKey != "" || f.tlsCA != "" {
			return nil, 0, errors.New("--tls-key and --tls-ca need --tls-cert")
		}
		return nil, mode, nil
	}
	cert, err := tls.LoadX509KeyPair(f.tlsCert, f.tlsKey)
	if err != nil {
		return nil, 0, fmt.Errorf("TLS certificate: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if f.tlsCA != "" {
		pem, err := os.ReadFile(f.tlsCA)
		if err != nil {
			return nil, 0, fmt.Errorf("TLS CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, 0, fmt.Errorf("TLS CA %s: no PEM certificates", f.tlsCA)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, mode, nil
}
