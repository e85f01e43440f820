//go:build race

package cache

// poisonRecycled fills recycled GET buffers with garbage under the race
// detector, so that a read from a buffer after its release shows as a
// data race and as wrong bytes.
const poisonRecycled = true
