package newimage

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
	"golang.org/x/sys/unix"
)

// directProbe is a source that looks, at each read, for a file of dir
// open in this process with O_DIRECT.
type directProbe struct {
	diskserve.DiskFile
	dir  string
	seen atomic.Bool
}

func (p *directProbe) ReadAt(b []byte, off int64) (int, error) {
	fds, _ := os.ReadDir("/proc/self/fd")
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name()))
		if err != nil || !strings.HasPrefix(target, p.dir+"/") {
			continue
		}
		info, err := os.ReadFile(filepath.Join("/proc/self/fdinfo", fd.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				if flags, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64); err == nil && flags&unix.O_DIRECT != 0 {
					p.seen.Store(true)
				}
			}
		}
	}
	return p.DiskFile.ReadAt(b, off)
}

// TestDirectFill converts into a new raw image with and without Direct:
// the new image's file is open with O_DIRECT while it is filled exactly
// when Direct is set, and reads as the source either way.
func TestDirectFill(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src.raw")
	want := make([]byte, 4<<20)
	for i := range want[:1<<20] {
		want[i] = byte(rand.IntN(256))
	}
	if err := os.WriteFile(src, want, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, direct := range []bool{false, true} {
		dir := t.TempDir()
		d, err := raw.OpenFile(src, true)
		if err != nil {
			t.Fatal(err)
		}
		probe := &directProbe{DiskFile: d, dir: dir}
		dst := filepath.Join(dir, "dst.raw")
		err = Convert(context.Background(), probe, dst, Target{Format: raw.Format, Direct: direct}, nil)
		d.Close()
		if err != nil {
			t.Fatal(err)
		}
		if probe.seen.Load() != direct {
			t.Errorf("Direct %v: the new image was filled with O_DIRECT: %v", direct, probe.seen.Load())
		}
		if got, err := os.ReadFile(dst); err != nil || !bytes.Equal(got, want) {
			t.Errorf("Direct %v: the new image does not read as the source (%v)", direct, err)
		}
	}
}
