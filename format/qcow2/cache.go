package qcow2

import (
	"container/list"
	"sync"
)

// l2CacheBytes bounds the memory of cached L2 tables: 32 MiB holds 512
// tables of 64 KiB, which map 256 GiB of guest space at the default cluster
// size.
const (
	l2CacheBytes     = 32 << 20
	l2CacheMinTables = 16
)

// l2Cache is an LRU cache of L2 tables by host offset. Tables are never
// changed once loaded (the image is read-only), so a table can be used
// after it has been evicted.
type l2Cache struct {
	mu     sync.Mutex
	max    int
	byOff  map[uint64]*list.Element // of *l2Table
	recent list.List                // front: most recently used
}

type l2Table struct {
	off  uint64
	data []byte
}

func newL2Cache(clusterSize int64) *l2Cache {
	return &l2Cache{max: max(l2CacheMinTables, int(l2CacheBytes/clusterSize)), byOff: map[uint64]*list.Element{}}
}

// get returns the table at off, loading it with load on a miss. Two
// goroutines that miss at once both load it; the second copy is dropped.
func (c *l2Cache) get(off uint64, load func(uint64) ([]byte, error)) ([]byte, error) {
	c.mu.Lock()
	if e, ok := c.byOff[off]; ok {
		c.recent.MoveToFront(e)
		c.mu.Unlock()
		return e.Value.(*l2Table).data, nil
	}
	c.mu.Unlock()
	data, err := load(off)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.byOff[off]; ok {
		return e.Value.(*l2Table).data, nil
	}
	c.byOff[off] = c.recent.PushFront(&l2Table{off: off, data: data})
	if c.recent.Len() > c.max {
		last := c.recent.Back()
		c.recent.Remove(last)
		delete(c.byOff, last.Value.(*l2Table).off)
	}
	return data, nil
}
