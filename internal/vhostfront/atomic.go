package vhostfront

import (
	"sync/atomic"
	"unsafe"
)

// loadIdx and storeIdx access a ring index, 2-byte aligned, through the
// 4-byte aligned word that holds it: ordered, as the device's accesses
// are.
func loadIdx(b []byte) uint16 {
	p := unsafe.Pointer(&b[0])
	lead := uintptr(p) & 3
	w := (*uint32)(unsafe.Add(p, -int(lead)))
	return uint16(atomic.LoadUint32(w) >> (lead * 8))
}

func storeIdx(b []byte, v uint16) {
	p := unsafe.Pointer(&b[0])
	lead := uintptr(p) & 3
	w := (*uint32)(unsafe.Add(p, -int(lead)))
	shift := lead * 8
	for {
		old := atomic.LoadUint32(w)
		if atomic.CompareAndSwapUint32(w, old, old&^(0xffff<<shift)|uint32(v)<<shift) {
			return
		}
	}
}
