package fio

import (
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A State is how an image file sits in the host's page cache when a
// server starts on it. Servers meet all of these: an image just copied in,
// one a VM has written for days, one nobody has read since boot.
type State string

// The states.
const (
	// Fresh: written sequentially just before, so cached in large folios.
	Fresh State = "fresh"
	// Settled: cached after a round of 4k random writes over all of it,
	// so in small folios, as a VM's disk is after a while.
	Settled State = "settled"
	// Cold: not in the page cache.
	Cold State = "cold"
	// Direct: cold, and every server bypasses the page cache (O_DIRECT,
	// or its cache=none).
	Direct State = "direct"
)

// States lists the states in the order the harnesses measure them.
var States = []State{Fresh, Settled, Cold, Direct}

// ParseState checks s as a state name.
func ParseState(s string) (State, error) {
	for _, st := range States {
		if string(st) == s {
			return st, nil
		}
	}
	return "", fmt.Errorf("unknown state %q: want fresh, settled, cold or direct", s)
}

// An Image is a file a harness puts into a state before each server's run,
// with its content kept in memory so that rewriting it changes no byte.
type Image struct {
	Path    string
	content []byte // nil for Cold and Direct, which write nothing
}

// NewImage remembers the content of the file at path for Prepare; state
// says whether it will be needed.
func NewImage(path string, state State) *Image {
	im := &Image{Path: path}
	if state == Fresh || state == Settled {
		b, err := os.ReadFile(path)
		if err != nil {
			log.Fatal(err)
		}
		im.content = b
	}
	return im
}

// Prepare puts the file into state: it writes back every dirty page (so
// that no server pays for the previous one's writes), drops the file from
// the page cache, and for Fresh writes it again in 1 MiB pieces, for
// Settled in 4 KiB pieces in random order, with the same bytes. It fails
// the benchmark if a cold file is still cached, and has the host back
// enough free memory for a cold run to read the whole file into the page
// cache (BackFreeMemory).
func (im *Image) Prepare(state State) {
	syscall.Sync()
	Evict(im.Path)
	switch state {
	case Fresh:
		im.rewrite(1<<20, false)
	case Settled:
		im.rewrite(4096, true)
	case Cold, Direct:
		if r := Resident(im.Path); r > 0.01 {
			log.Fatalf("%s: %.1f%% still in the page cache after POSIX_FADV_DONTNEED", im.Path, 100*r)
		}
		if state == Cold {
			var st unix.Stat_t
			if err := unix.Stat(im.Path, &st); err != nil {
				log.Fatal(err)
			}
			BackFreeMemory(st.Blocks*512 + 2<<30) // the file's data, not its holes
		}
	}
}

// rewrite writes the file's content over it in pieces of n bytes, in
// order or shuffled, then waits for the writeback: the page cache holds
// it, clean.
func (im *Image) rewrite(n int, shuffle bool) {
	f, err := os.OpenFile(im.Path, os.O_WRONLY, 0)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	pieces := make([]int, (len(im.content)+n-1)/n)
	for i := range pieces {
		pieces[i] = i
	}
	if shuffle {
		rand.New(rand.NewPCG(9, 9)).Shuffle(len(pieces), func(i, j int) { pieces[i], pieces[j] = pieces[j], pieces[i] })
	}
	for _, i := range pieces {
		off := i * n
		if _, err := f.WriteAt(im.content[off:min(off+n, len(im.content))], int64(off)); err != nil {
			log.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		log.Fatal(err)
	}
}

// Evict drops the file at path from the page cache (its dirty pages must
// have been written back: sync first).
func Evict(path string) {
	f, err := os.Open(path)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		log.Fatal(err)
	}
}

// Resident returns the fraction of the file at path that is in the page
// cache (mincore over a mapping of it).
func Resident(path string) float64 {
	f, err := os.Open(path)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Size() == 0 {
		return 0
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		log.Fatal(err)
	}
	defer unix.Munmap(m)
	page := os.Getpagesize()
	vec := make([]byte, (len(m)+page-1)/page)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		log.Fatal(errno)
	}
	cached := 0
	for _, v := range vec {
		cached += int(v & 1)
	}
	return float64(cached) / float64(len(vec))
}
