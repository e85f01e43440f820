package qcow2

import "container/list"

// metaCacheBytes bounds the memory of cached metadata clusters (L2 tables
// and refcount blocks): 32 MiB holds 512 L2 tables of 64 KiB, which map
// 256 GiB of guest space at the default cluster size.
const (
	metaCacheBytes     = 32 << 20
	metaCacheMinTables = 16
)

// metaCache is an LRU cache of metadata clusters by host offset. Entries
// changed in memory are dirty until Flush writes them; only clean entries
// are evicted, so the cache may hold more than max dirty ones until then.
//
// Preconditions: Disk.mu is held for every method.
type metaCache struct {
	max    int
	byOff  map[int64]*list.Element // of *metaTable
	recent list.List               // front: most recently used
	dirty  int
	gen    uint64 // changes whenever a table changes or is written back
}

type metaTable struct {
	off   int64
	kind  tableKind
	data  []byte
	dirty bool
}

type tableKind uint8

const (
	kindL2 tableKind = iota
	kindRefblock
)

func newMetaCache(clusterSize int64) *metaCache {
	return &metaCache{max: max(metaCacheMinTables, int(metaCacheBytes/clusterSize)), byOff: map[int64]*list.Element{}}
}

// get returns the table at off, loading it with load on a miss.
func (c *metaCache) get(off int64, kind tableKind, load func(int64) ([]byte, error)) (*metaTable, error) {
	if e, ok := c.byOff[off]; ok {
		c.recent.MoveToFront(e)
		return e.Value.(*metaTable), nil
	}
	data, err := load(off)
	if err != nil {
		return nil, err
	}
	return c.add(off, kind, data, false), nil
}

// has reports whether the table at off is in the cache.
func (c *metaCache) has(off int64) bool {
	_, ok := c.byOff[off]
	return ok
}

// add puts a table into the cache, in place of one at the same offset,
// evicting clean tables past max.
func (c *metaCache) add(off int64, kind tableKind, data []byte, dirty bool) *metaTable {
	if e, ok := c.byOff[off]; ok {
		c.markClean(e.Value.(*metaTable))
		c.recent.Remove(e)
	}
	t := &metaTable{off: off, kind: kind, data: data}
	c.byOff[off] = c.recent.PushFront(t)
	if dirty {
		c.markDirty(t)
	}
	for e := c.recent.Back(); c.recent.Len() > c.max && e != nil; {
		prev := e.Prev()
		if !e.Value.(*metaTable).dirty {
			c.recent.Remove(e)
			delete(c.byOff, e.Value.(*metaTable).off)
		}
		e = prev
	}
	return t
}

func (c *metaCache) markDirty(t *metaTable) {
	c.gen++
	if !t.dirty {
		t.dirty = true
		c.dirty++
	}
}

// dirtyTables returns the dirty tables of a kind, for Flush to write.
func (c *metaCache) dirtyTables(kind tableKind) []*metaTable {
	var ts []*metaTable
	for e := c.recent.Front(); e != nil; e = e.Next() {
		if t := e.Value.(*metaTable); t.dirty && t.kind == kind {
			ts = append(ts, t)
		}
	}
	return ts
}

func (c *metaCache) markClean(t *metaTable) {
	c.gen++
	if t.dirty {
		t.dirty = false
		c.dirty--
	}
}
