//go:build !race

package cache

const poisonRecycled = false
