package qcow2

import (
	"bytes"
	"fmt"
	"sync"

	kflate "github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"

	"github.com/diskserve/diskserve"
)

var (
	deflatePool = sync.Pool{New: func() any {
		w, err := kflate.NewWriter(nil, kflate.DefaultCompression)
		if err != nil {
			panic(err) // only for an invalid level
		}
		return w
	}}
	zstdEncoder = sync.OnceValue(func() *zstd.Encoder {
		e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithZeroFrames(true))
		if err != nil {
			panic(err) // only for invalid options
		}
		return e
	})
)

// WriteCompressed writes the guest cluster at off compressed, as qemu-img
// convert -c does: p is the whole cluster, or the rest of the disk for its
// last partial cluster, and off is cluster aligned. Compressed clusters are
// packed one after another into host clusters, each of which counts one
// reference per compressed cluster it holds a part of. A cluster that does
// not compress to less than its size is written as an ordinary one.
// Compression runs before the metadata lock is taken, so callers compress
// on as many goroutines as they like.
func (d *Disk) WriteCompressed(p []byte, off int64) error {
	if err := diskserve.CheckWrite(d, off, int64(len(p))); err != nil {
		return fmt.Errorf("write compressed: %w", err)
	}
	if off%d.cs != 0 || int64(len(p)) != min(d.cs, d.Size()-off) {
		return fmt.Errorf("write compressed: %d bytes at %d is not one whole %d-byte cluster: %w", len(p), off, d.cs, diskserve.ErrOutOfRange)
	}
	cluster := p
	if int64(len(p)) < d.cs { // the stream always inflates to a whole cluster
		cluster = make([]byte, d.cs)
		copy(cluster, p)
	}
	blob, err := d.compress(cluster)
	if err != nil {
		return err
	}
	if int64(len(blob)) >= d.cs {
		_, err := d.WriteAt(p, off)
		return err
	}
	// The blob goes to the file without d.mu, as a copy-on-write does
	// (see prepareWrite).
	ci := off >> d.bits
	if err := d.lockWithL2(ci); err != nil {
		return err
	}
	host, err := d.allocCompressed(int64(len(blob)))
	if err != nil {
		d.mu.Unlock()
		return err
	}
	done := make(chan struct{})
	d.inflight[ci] = done
	d.mu.Unlock()
	_, err = d.c.WriteAt(blob, host)
	d.mu.Lock()
	delete(d.inflight, ci)
	close(done)
	var t *metaTable
	if err == nil {
		t, err = d.l2ForWrite(ci)
	}
	if err == nil {
		old, _ := d.entryIn(t, ci)
		sectors := (host&511 + int64(len(blob)) + 511) / 512
		shift := 62 - (d.bits - 8)
		d.setEntry(t, ci, entryCompressed|uint64(sectors-1)<<shift|uint64(host), 0)
		d.free(old)
	}
	d.mu.Unlock()
	if err != nil {
		return err
	}
	return d.flushIfFull()
}

// compress compresses a whole cluster with the image's compression type:
// raw deflate (qemu's zlib type) or one zstd frame.
func (d *Disk) compress(cluster []byte) ([]byte, error) {
	if d.h.CompressionType == compressionZstd {
		return zstdEncoder().EncodeAll(cluster, make([]byte, 0, len(cluster))), nil
	}
	var out bytes.Buffer
	out.Grow(len(cluster))
	w := deflatePool.Get().(*kflate.Writer)
	defer deflatePool.Put(w)
	w.Reset(&out)
	if _, err := w.Write(cluster); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// allocCompressed finds room for n bytes of compressed data: right after
// the previous compressed cluster if it fits there, reaching into the next
// host cluster only if that is the next one to be allocated anyway, else
// at the start of a new cluster (also when the previous one ended on a
// cluster boundary: the cluster after it may belong to something else, and
// when the previous cluster's refcount cannot count one more). Every host
// cluster the range touches gains one reference.
//
// Preconditions: d.mu is held; n < d.cs.
func (d *Disk) allocCompressed(n int64) (int64, error) {
	pos := d.w.compressedNext
	end := pos&^(d.cs-1) + d.cs
	full := false
	if pos&(d.cs-1) != 0 && d.w.bits < 64 {
		rc, err := d.refcount(pos &^ (d.cs - 1))
		if err != nil {
			return 0, err
		}
		full = rc+1 >= 1<<d.w.bits
	}
	if full || pos&(d.cs-1) == 0 || pos+n > end && d.w.end != end {
		pos = d.reserve(1)
	}
	for c := pos &^ (d.cs - 1); c < pos+n; c += d.cs {
		if c == d.w.end {
			d.reserve(1)
		}
		rc, err := d.refcount(c)
		if err != nil {
			return 0, err
		}
		if err := d.setRefcount(c, rc+1); err != nil {
			return 0, err
		}
	}
	d.w.compressedNext = pos + n
	return pos, d.growFile()
}
