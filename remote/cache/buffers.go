package cache

import (
	"math/bits"
	"sync"

	"github.com/diskserve/diskserve/internal/aligned"
)

// runBuffers recycles the buffers GETs fill, in size classes of a power
// of two chunks. A fresh buffer per GET would cost zeroing and page
// faults for every byte fetched.
type runBuffers struct {
	chunk int64
	pools []sync.Pool // pools[k] holds *[]byte of chunk<<k bytes, aligned for O_DIRECT
}

func newRunBuffers(chunk, maxRun int64) runBuffers {
	return runBuffers{chunk: chunk, pools: make([]sync.Pool, class(maxRun)+1)}
}

// class is the size class of a run of n chunks.
func class(n int64) int { return bits.Len64(uint64(n - 1)) }

// get returns a buffer of n bytes, at most maxRun chunks.
func (r *runBuffers) get(n int64) []byte {
	k := class((n + r.chunk - 1) / r.chunk)
	if b, ok := r.pools[k].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return aligned.Bytes(int(r.chunk << k))[:n]
}

// put gives back a buffer get returned; nobody may use it any more.
func (r *runBuffers) put(b []byte) {
	b = b[:cap(b)]
	if poisonRecycled {
		for i := range b {
			b[i] = 0xa5
		}
	}
	r.pools[class(int64(len(b))/r.chunk)].Put(&b)
}
