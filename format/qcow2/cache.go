package qcow2

import "container/list"

// defaultMetaCache bounds the memory of cached metadata clusters (L2
// tables and refcount blocks) unless [diskserve.Options.MetadataCache]
// says otherwise: 16 MiB holds 256 L2 tables of 64 KiB, which map 128 GiB
// of guest space at the default cluster size. qemu's default is 32 MiB,
// but a miss costs a read of one table from the image file, which is
// cheaper than the memory: serving a 1 TiB sparse image, 16 MiB took as
// many random reads as 32 MiB and a third less memory
// (docs/performance.md).
const (
	defaultMetaCache   = 16 << 20
	metaCacheMinTables = 16
)

// metaCache is an LRU cache of metadata clusters by host offset. Entries
// changed in memory are dirty until Flush writes them; only clean entries
// are evicted, so the cache may hold more than max dirty ones until then.
//
// Preconditions: Disk.mu is held for every method.
type metaCache struct {
	slab   *tableSlab
	max    int
	byOff  map[int64]*list.Element // of *metaTable
	recent list.List               // front: most recently used
	dirty  int
	// writebacks counts the tables counted clean to be written back: a
	// table read from the file without Disk.mu is current only if it did
	// not change (see Disk.cacheTable).
	writebacks uint64
}

type metaTable struct {
	off   int64
	kind  tableKind
	data  []byte
	dirty bool
	held  int // holds by walks and by flushes writing a copy of it (see hold)
}

type tableKind uint8

const (
	kindL2 tableKind = iota
	kindRefblock
)

// newMetaCache returns a cache of bytes of tables of clusterSize (the
// default size if bytes is 0).
func newMetaCache(clusterSize, bytes int64) *metaCache {
	if bytes <= 0 {
		bytes = defaultMetaCache
	}
	n := int(max(metaCacheMinTables, min(bytes/clusterSize, 1<<30)))
	return &metaCache{slab: newTableSlab(n, clusterSize), max: n, byOff: map[int64]*list.Element{}}
}

// buffer returns a table's worth of memory, zeroed, to put a table in. It
// may be called without Disk.mu.
func (c *metaCache) buffer() []byte { return c.slab.get() }

// close releases the cache's memory; no table may be used after it.
func (c *metaCache) close() {
	c.byOff = nil
	c.recent.Init()
	c.slab.close()
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
		if t := e.Value.(*metaTable); !t.dirty && t.held == 0 {
			c.recent.Remove(e)
			delete(c.byOff, t.off)
			c.slab.put(t.data) // no one holds an evicted table: every use is under Disk.mu, and it was least recent
		}
		e = prev
	}
	return t
}

// hold keeps t from being evicted until the returned function is called:
// for a walk over t's entries that looks up refcount blocks as it goes,
// which could otherwise push t out and its memory to another table.
func (c *metaCache) hold(t *metaTable) (release func()) {
	t.held++
	return func() { t.held-- }
}

func (c *metaCache) markDirty(t *metaTable) {
	if !t.dirty {
		t.dirty = true
		c.dirty++
	}
}

// dirtyTables returns the dirty tables, for a flush to write.
func (c *metaCache) dirtyTables() []*metaTable {
	var ts []*metaTable
	for e := c.recent.Front(); e != nil; e = e.Next() {
		if t := e.Value.(*metaTable); t.dirty {
			ts = append(ts, t)
		}
	}
	return ts
}

func (c *metaCache) markClean(t *metaTable) {
	c.writebacks++
	if t.dirty {
		t.dirty = false
		c.dirty--
	}
}
