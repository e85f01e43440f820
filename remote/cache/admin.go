package cache

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/diskserve/diskserve"
	"golang.org/x/sys/unix"
)

// An Entry is one object's cache directory, as [List] finds it.
type Entry struct {
	Dir  string
	Meta Meta
	State
	Used  time.Time // when a process last fetched into it
	InUse bool      // a process has it open
}

// List returns the cache directories under root. Directories that are not
// caches (no meta.json) are left out.
func List(root string) ([]Entry, error) {
	dirs, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Entry
	for _, de := range dirs {
		if !de.IsDir() {
			continue
		}
		e, err := Inspect(filepath.Join(root, de.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return out, err
		}
		out = append(out, e)
	}
	return out, nil
}

// Inspect describes the cache directory dir.
func Inspect(dir string) (Entry, error) {
	e := Entry{Dir: dir}
	var err error
	if e.Meta, err = ReadMeta(dir); err != nil {
		return e, err
	}
	if fi, err := os.Stat(filepath.Join(dir, stateFile)); err == nil {
		e.Used = fi.ModTime()
	}
	e.InUse = !tryExclusive(dir, func() {})
	s, err := openReadOnly(dir, e.Meta)
	if err != nil {
		return e, err
	}
	defer s.closeReadOnly()
	e.State = countState(s, chunks(e.Meta.Size, e.Meta.ChunkSize), func(i int64) int64 {
		return min(e.Meta.ChunkSize, e.Meta.Size-i*e.Meta.ChunkSize)
	})
	return e, nil
}

// Verify reads every present chunk of the cache directory dir and checks
// it against the CRC-32C recorded when it was fetched, and that chunks
// recorded as zero read as zeroes. It returns the indexes of the chunks
// that fail.
func Verify(dir string) (bad []int64, err error) {
	meta, err := ReadMeta(dir)
	if err != nil {
		return nil, err
	}
	s, err := openReadOnly(dir, meta)
	if err != nil {
		return nil, err
	}
	defer s.closeReadOnly()
	buf := make([]byte, meta.ChunkSize)
	for i := range chunks(meta.Size, meta.ChunkSize) {
		k := s.state(i) & kindMask
		if k == absent {
			continue
		}
		b := buf[:min(meta.ChunkSize, meta.Size-i*meta.ChunkSize)]
		if _, err := s.data.ReadAt(b, i*meta.ChunkSize); err != nil && err != io.EOF {
			return bad, fmt.Errorf("%s: chunk %d: %w", dir, i, err)
		}
		if k == zero && !diskserve.IsZero(b) || crc32.Checksum(b, castagnoli) != s.sum(i) {
			bad = append(bad, i)
		}
	}
	return bad, nil
}

// Remove deletes the cache directory dir unless a process has it open,
// and reports whether it did.
func Remove(dir string) (bool, error) {
	var err error
	removed := tryExclusive(dir, func() { err = os.RemoveAll(dir) })
	return removed && err == nil, err
}

// tryExclusive runs fn while holding dir's lock exclusively, if no process
// holds it, and reports whether it ran.
func tryExclusive(dir string, fn func()) bool {
	f, err := os.Open(filepath.Join(dir, lockFile))
	if err != nil {
		fn() // nobody can hold a lock that does not exist
		return true
	}
	defer f.Close()
	if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		return false
	}
	fn()
	return true
}

// openReadOnly maps a cache directory's states and sums for reading, for
// tools that inspect it while servers may use it.
func openReadOnly(dir string, meta Meta) (*store, error) {
	s := &store{dir: dir, meta: meta}
	n := chunks(meta.Size, meta.ChunkSize)
	var err error
	if s.data, err = os.Open(filepath.Join(dir, dataFile)); err != nil {
		return nil, err
	}
	for _, m := range []struct {
		name string
		dst  *[]byte
	}{{stateFile, &s.states}, {sumsFile, &s.sums}} {
		f, err := os.Open(filepath.Join(dir, m.name))
		if err != nil {
			s.closeReadOnly()
			return nil, err
		}
		fi, err := f.Stat()
		if err == nil && fi.Size() != 4*n {
			err = fmt.Errorf("%s is %d bytes long, not %d", m.name, fi.Size(), 4*n)
		}
		if err == nil && n > 0 {
			*m.dst, err = unix.Mmap(int(f.Fd()), 0, int(4*n), unix.PROT_READ, unix.MAP_SHARED)
		}
		f.Close()
		if err != nil {
			s.closeReadOnly()
			return nil, fmt.Errorf("%s: %w", dir, err)
		}
	}
	return s, nil
}

func (s *store) closeReadOnly() {
	for _, m := range [][]byte{s.states, s.sums} {
		if m != nil {
			unix.Munmap(m)
		}
	}
	if s.data != nil {
		s.data.Close()
	}
}
