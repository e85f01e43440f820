package zstd

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"

	"github.com/cespare/xxhash/v2"
	kzstd "github.com/klauspost/compress/zstd"

	"github.com/diskserve/diskserve"
)

// WriteOptions control [Write]. The zero value of each field means its
// default.
type WriteOptions struct {
	FrameSize  int64 // decompressed bytes per frame; default 256 KiB
	Level      int   // zstd level, 1 to 22; default 3
	NoChecksum bool  // leave the per-frame checksums out of the seek table
	Workers    int   // frames compressed at once; default GOMAXPROCS
}

// DefaultFrameSize is the frame size Write uses by default: small enough
// that a 4 KiB random read decompresses little, large enough to compress
// well.
const DefaultFrameSize = 256 << 10

// Write writes the content of src to out as a seekable zstd image,
// compressing frames on several goroutines and writing them in order,
// then the seek table. progress, if not nil, is told how many bytes of src
// each frame covered.
func Write(ctx context.Context, out io.Writer, src diskserve.DiskFile, o WriteOptions, progress func(int64)) error {
	if o.FrameSize == 0 {
		o.FrameSize = DefaultFrameSize
	}
	if o.Level == 0 {
		o.Level = 3
	}
	if o.Workers == 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	size := src.Size()
	frames := (size + o.FrameSize - 1) / o.FrameSize
	switch {
	case o.FrameSize < 1 || o.FrameSize > MaxFrameSize:
		return fmt.Errorf("frame size %d outside 1..%d", o.FrameSize, MaxFrameSize)
	case o.Level < 1 || o.Level > 22:
		return fmt.Errorf("level %d outside 1..22", o.Level)
	case frames > maxFrames:
		return fmt.Errorf("%d frames of %d bytes is more than %d: use larger frames", frames, o.FrameSize, maxFrames)
	}
	enc, err := kzstd.NewWriter(nil, kzstd.WithEncoderLevel(kzstd.EncoderLevelFromZstd(o.Level)), kzstd.WithEncoderConcurrency(o.Workers))
	if err != nil {
		return err
	}
	defer enc.Close()

	outBufs := sync.Pool{New: func() any { return new([]byte) }} // compressed frames, reused once written
	type result struct {
		data     *[]byte
		n        int64 // decompressed bytes
		checksum uint32
		err      error
	}
	type job struct {
		i   int64
		res chan result
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan job, o.Workers)
	queue := make(chan job, 2*o.Workers) // in frame order, for the writer
	go func() {
		defer close(work)
		defer close(queue)
		for i := range frames {
			j := job{i, make(chan result, 1)}
			select {
			case queue <- j:
				work <- j
			case <-ctx.Done():
				return
			}
		}
	}()
	for range o.Workers {
		go func() {
			var ext []diskserve.Extent
			frame := make([]byte, o.FrameSize)
			for j := range work {
				off := j.i * o.FrameSize
				buf := frame[:min(o.FrameSize, size-off)]
				clear(buf)
				var err error
				ext, err = diskserve.Extents(src, ext[:0], off, int64(len(buf)))
				for _, e := range ext {
					if err != nil || e.Flags&diskserve.ExtentZero != 0 {
						continue
					}
					if got, rerr := src.ReadAt(buf[e.Off-off:e.Off-off+e.Len], e.Off); int64(got) != e.Len {
						err = fmt.Errorf("read %d bytes at %d: %w", e.Len, e.Off, rerr)
					}
				}
				out := outBufs.Get().(*[]byte)
				*out = enc.EncodeAll(buf, (*out)[:0])
				j.res <- result{out, int64(len(buf)), uint32(xxhash.Sum64(buf)), err}
			}
		}()
	}
	entry := 12
	if o.NoChecksum {
		entry = 8
	}
	table := le.AppendUint32(nil, skippableMagic)
	table = le.AppendUint32(table, uint32(frames*int64(entry)+footerLen))
	for j := range queue {
		r := <-j.res
		if r.err != nil {
			return r.err
		}
		if _, err := out.Write(*r.data); err != nil {
			return err
		}
		table = le.AppendUint32(table, uint32(len(*r.data)))
		outBufs.Put(r.data)
		table = le.AppendUint32(table, uint32(r.n))
		if !o.NoChecksum {
			table = le.AppendUint32(table, r.checksum)
		}
		if progress != nil {
			progress(r.n)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	table = le.AppendUint32(table, uint32(frames))
	desc := byte(0)
	if !o.NoChecksum {
		desc = checksumFlag
	}
	table = append(table, desc)
	table = le.AppendUint32(table, seekableMagic)
	_, err = out.Write(table)
	return err
}

// creator writes images for `diskserve convert`, with the options of -o.
var creator = &diskserve.Creator{
	Options: []diskserve.CreateOption{
		{Name: "frame_size", Default: "256K", Help: "uncompressed bytes per frame: what a random read decompresses"},
		{Name: "level", Default: "3", Help: "zstd level, 1 to 22"},
		{Name: "checksum", Default: "on", Help: "on or off: a checksum of each frame in the seek table"},
	},
	Write: func(ctx context.Context, out *os.File, _ string, src diskserve.DiskFile, o diskserve.CreateOptions, progress func(int64)) error {
		var wo WriteOptions
		var err error
		if wo.FrameSize, err = o.Size("frame_size", DefaultFrameSize); err != nil {
			return err
		}
		if wo.Level, err = o.Int("level", 3); err != nil {
			return err
		}
		checksum, err := o.Bool("checksum", true)
		if err != nil {
			return err
		}
		wo.NoChecksum = !checksum
		return Write(ctx, out, src, wo, progress)
	},
}
