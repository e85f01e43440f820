package formattest

import (
	"bytes"
	"errors"
	"io"
	"sync"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// maxFuzzFile bounds how far a fuzzed image file may grow by writes.
const maxFuzzFile = 64 << 20

// FuzzImage opens image as format f from memory, read-only and then
// read-write (where it opens), and drives it: reads at the start and at
// the end that must agree with each other and with the extents, a check,
// and on the writable open a write at the start and the end that must
// read back. Nothing may panic, whatever image holds; errors are fine.
func FuzzImage(t *testing.T, f diskserve.Format, image []byte) {
	for _, readOnly := range []bool{true, false} {
		file := &memFile{data: bytes.Clone(image), readOnly: readOnly}
		top := "fuzz." + f.Name
		d, err := diskserve.Open(top, diskserve.Options{
			Formats:  []diskserve.Format{f},
			Format:   f.Name,
			ReadOnly: readOnly,
			OpenFile: func(name string, _ bool) (diskserve.DiskFile, error) {
				if name != top {
					return nil, errors.New("a fuzzed image names no other file")
				}
				return file, nil
			},
		})
		if err != nil {
			continue
		}
		n := min(d.Size(), 1<<20)
		whole := make([]byte, n)
		if got, err := d.ReadAt(whole, 0); int64(got) != n {
			if err == nil {
				t.Fatalf("read %d of %d with no error", got, n)
			}
			d.Close()
			continue
		}
		piece := make([]byte, 777)
		for off := int64(0); off < n; off += int64(len(piece)) {
			k, _ := d.ReadAt(piece, off)
			if !bytes.Equal(piece[:min(int64(k), n-off)], whole[off:min(off+int64(k), n)]) {
				t.Fatalf("piece at %d differs", off)
			}
		}
		if ext, err := diskserve.Extents(d, nil, 0, n); err == nil {
			disktest.CheckExtents(t, ext, whole, 0, n)
		}
		diskserve.Check(d, diskserve.RepairNone)
		diskserve.Describe(d)
		if !readOnly && d.Size() > 0 {
			p := bytes.Repeat([]byte{0xA5}, 4096)
			for _, off := range []int64{0, max(0, d.Size()-int64(len(p)))} {
				k := min(int64(len(p)), d.Size()-off)
				if _, err := d.WriteAt(p[:k], off); err != nil {
					break
				}
				got := make([]byte, k)
				if _, err := d.ReadAt(got, off); err != nil && err != io.EOF {
					t.Fatalf("read back at %d: %v", off, err)
				}
				if !bytes.Equal(got, p[:k]) {
					t.Fatalf("write at %d does not read back", off)
				}
			}
		}
		d.Close()
	}
}

// memFile is a growable image file in memory, for fuzzing writable
// formats.
type memFile struct {
	mu       sync.RWMutex
	data     []byte
	readOnly bool
}

func (m *memFile) Size() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return int64(len(m.data))
}

func (m *memFile) ReadOnly() bool { return m.readOnly }
func (m *memFile) Close() error   { return nil }
func (m *memFile) Flush() error   { return nil }

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	p, eof := diskserve.ClipRead(int64(len(m.data)), off, p)
	if len(p) == 0 {
		return 0, eof
	}
	return copy(p, m.data[off:]), eof
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.readOnly {
		return 0, diskserve.ErrReadOnly
	}
	if err := diskserve.CheckRange(int64(len(m.data)), off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(m.data[off:], p), nil
}

func (m *memFile) Resize(size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if size > maxFuzzFile {
		return errors.New("fuzzed image file would grow past 64 MiB")
	}
	if size <= int64(len(m.data)) {
		m.data = m.data[:size]
		return nil
	}
	m.data = append(m.data, make([]byte, size-int64(len(m.data)))...)
	return nil
}
