package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"

	"github.com/diskserve/diskserve/async"
	"github.com/diskserve/diskserve/export/nbd"
	"github.com/diskserve/diskserve/export/vhostblk"
	"github.com/diskserve/diskserve/export/vhostuser"
)

// vhostServer is a vhost-user-blk device served on its socket.
type vhostServer struct {
	srv *vhostuser.Server
	l   *net.UnixListener
}

// serveVhostUser serves the single image of exports as a vhost-user-blk
// device on --vhost-user-blk's socket; Serve's end goes to errc.
func (f *serveFlags) serveVhostUser(exports []nbd.Export, log *slog.Logger, errc chan<- error) (*vhostServer, error) {
	if len(exports) == 0 || exports[len(exports)-1].Disk != exports[0].Disk {
		return nil, errors.New("--vhost-user-blk serves one IMAGE, not NAME=IMAGE arguments")
	}
	if f.queues < 1 || f.queues > 64 {
		return nil, fmt.Errorf("--queues %d: want 1 to 64", f.queues)
	}
	d := exports[0].Disk
	ad, ok := d.(*async.Disk)
	if !ok {
		return nil, fmt.Errorf("--vhost-user-blk: the image is not served through an I/O engine")
	}
	dev, err := vhostblk.New(d, ad.Engine(), vhostblk.Options{
		Queues:  f.queues,
		Serial:  f.serial,
		Durable: f.open.cacheMode.WriteThrough(),
		Logger:  log,
	})
	if err != nil {
		return nil, err
	}
	// A socket left by an earlier run would make Listen fail.
	if st, err := os.Lstat(f.vhostUser); err == nil && st.Mode()&os.ModeSocket != 0 {
		os.Remove(f.vhostUser)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: f.vhostUser, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("--vhost-user-blk: %w", err)
	}
	vs := &vhostServer{srv: vhostuser.NewServer(dev, log), l: l}
	log.Info("vhost-user-blk", "socket", f.vhostUser, "queues", f.queues)
	go func() { errc <- vs.srv.Serve(l) }()
	return vs, nil
}

// Shutdown stops accepting front-ends and ends the session under way once
// its requests in flight are complete.
func (vs *vhostServer) Shutdown(ctx context.Context) error {
	err := vs.srv.Shutdown(ctx)
	vs.l.Close()
	return err
}
