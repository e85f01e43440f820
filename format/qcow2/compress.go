package qcow2

import (
	"bytes"
	"compress/flate"
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/semaphore"
)

// An image keeps its most recently decompressed clusters, so that reading
// a compressed cluster in pieces (4 KiB at a time, as guests do)
// decompresses it once: up to compressedClustersCached of them, and no
// more than clusterCacheBytes, whatever the cluster size.
const (
	compressedClustersCached = 16
	clusterCacheBytes        = 4 << 20
)

// decompressing is the process's budget of memory for compressed clusters
// outside the images' caches: a read of a compressed cluster holds twice
// the cluster size of it (the compressed input and the cluster) while it
// decompresses and copies, so that readers in any number hold at most
// decompressBytes of clusters at once.
var decompressing = semaphore.NewWeighted(decompressBytes)

const decompressBytes = 64 << 20

// zstdMaxMemory bounds what one zstd frame may make the decoder allocate;
// a cluster is at most 2 MiB, so no valid image comes near it.
const zstdMaxMemory = 64 << 20

var (
	flatePool = sync.Pool{New: func() any { return flate.NewReader(nil) }}
	zstdPool  = sync.Pool{New: func() any {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(zstdMaxMemory))
		if err != nil {
			panic(err) // only for invalid options, which these are not
		}
		return d
	}}
)

// readCompressed copies into p the bytes from in onwards of the compressed
// cluster that L2 entry e describes.
func (d *Disk) readCompressed(p []byte, e uint64, in int64) error {
	cost := 2 * d.cs
	if err := decompressing.Acquire(context.Background(), cost); err != nil {
		return err
	}
	defer decompressing.Release(cost)
	cluster, err := d.clust.get(e, d.decompress)
	if err != nil {
		return err
	}
	copy(p, cluster[in:])
	return nil
}

// compressedRange returns where the compressed data of L2 entry e lies in
// the image file, with qemu's arithmetic: the offset takes the low bits, the
// number of additional 512-byte sectors the rest, and the data runs to the
// end of the last sector.
func (d *Disk) compressedRange(e uint64) (off, n int64) {
	shift := 62 - (d.bits - 8)
	off = int64(e & (1<<shift - 1))
	sectors := int64((e>>shift)&(1<<(d.bits-8)-1)) + 1
	return off, sectors*512 - off&511
}

// decompress reads and inflates the compressed cluster of L2 entry e.
func (d *Disk) decompress(e uint64) ([]byte, error) {
	off, n := d.compressedRange(e)
	if off == 0 || off > maxHostOffset {
		return nil, corrupt(-1, "compressed cluster at host offset %#x", off)
	}
	in := make([]byte, n)
	got, err := d.c.ReadAt(in, off)
	if got == 0 {
		return nil, fmt.Errorf("read compressed cluster at %#x: %w", off, err)
	}
	in = in[:got] // the last sectors may lie past the end of the file
	out := make([]byte, d.cs)
	if d.h.CompressionType == compressionZstd {
		dec := zstdPool.Get().(*zstd.Decoder)
		defer zstdPool.Put(dec)
		if err = dec.Reset(bytes.NewReader(in)); err == nil {
			_, err = io.ReadFull(dec, out)
		}
	} else {
		r := flatePool.Get().(io.ReadCloser)
		defer flatePool.Put(r)
		if err = r.(flate.Resetter).Reset(bytes.NewReader(in), nil); err == nil {
			_, err = io.ReadFull(r, out) // a full cluster is success; the input has trailing bytes
		}
	}
	if err != nil {
		return nil, corrupt(off, "compressed cluster does not decompress to %d bytes: %v", d.cs, err)
	}
	return out, nil
}

// clusterCache keeps the most recently decompressed clusters by L2 entry.
type clusterCache struct {
	mu    sync.Mutex
	slots []struct {
		entry uint64
		data  []byte
		used  uint64
	}
	clock uint64
}

// newClusterCache makes the cache of an image of clusterSize clusters.
func newClusterCache(clusterSize int64) *clusterCache {
	n := min(compressedClustersCached, max(1, clusterCacheBytes/clusterSize))
	c := &clusterCache{}
	c.slots = make([]struct {
		entry uint64
		data  []byte
		used  uint64
	}, n)
	return c
}

func (c *clusterCache) get(e uint64, load func(uint64) ([]byte, error)) ([]byte, error) {
	c.mu.Lock()
	for i := range c.slots {
		if s := &c.slots[i]; s.data != nil && s.entry == e {
			c.clock++
			s.used = c.clock
			data := s.data // the slot may be reused once the lock is dropped
			c.mu.Unlock()
			return data, nil
		}
	}
	c.mu.Unlock()
	data, err := load(e)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	oldest := 0
	for i := range c.slots {
		if c.slots[i].used < c.slots[oldest].used {
			oldest = i
		}
	}
	c.clock++
	c.slots[oldest].entry, c.slots[oldest].data, c.slots[oldest].used = e, data, c.clock
	return data, nil
}
