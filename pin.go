package diskserve

// A Pinner is a container that caches what it holds somewhere slower (a
// remote image's block cache) and can keep ranges resident. Formats pin
// their metadata (headers, tables, indexes), so that a cache bounded in
// size evicts data before it evicts what every read needs. Pinner is a
// hint to containers, not a capability of disks: wrappers do not forward
// it.
type Pinner interface {
	Pin(off, n int64)
}

// Pin asks c to keep [off, off+n) resident, if c is a [Pinner].
func Pin(c DiskFile, off, n int64) {
	if p, ok := c.(Pinner); ok {
		p.Pin(off, n)
	}
}
