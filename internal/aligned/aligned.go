// Package aligned makes buffers for direct I/O (O_DIRECT), which takes
// only buffers whose address is a multiple of the device's alignment.
package aligned

import "unsafe"

// Align is the memory alignment of the buffers [Bytes] returns: a page,
// which is at least every direct-I/O memory alignment of common devices.
const Align = 4096

// Bytes returns n bytes starting at a multiple of Align.
func Bytes(n int) []byte {
	b := make([]byte, n+Align)
	skip := (Align - int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))%Align)) % Align
	return b[skip : skip+n : skip+n]
}
