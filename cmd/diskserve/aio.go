package main

import (
	"log/slog"

	"github.com/spf13/pflag"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/async"
)

// aioFlag is the --aio flag of the exporting commands.
type aioFlag struct{ mode string }

func (f *aioFlag) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.mode, "aio", string(async.Auto), "I/O engine: auto (the faster by measurement: io_uring for images open with O_DIRECT, --cache=none or directsync, else the pool), uring (io_uring; the pool where the kernel refuses it) or pool")
}

// wrap serves d through the engine the flag asks for; closing the result
// closes d. On error d is closed.
func (f *aioFlag) wrap(d diskserve.DiskFile, log *slog.Logger) (diskserve.DiskFile, error) {
	mode, err := async.ParseMode(f.mode)
	if err == nil {
		var w *async.Disk
		if w, err = async.Wrap(d, async.Options{Mode: mode, Logger: log}); err == nil {
			return w, nil
		}
	}
	d.Close()
	return nil, err
}

// engineName names the engine a disk from wrap uses, for the log.
func engineName(d diskserve.DiskFile) string {
	if w, ok := d.(*async.Disk); ok {
		return w.Engine().Name()
	}
	return "none"
}
