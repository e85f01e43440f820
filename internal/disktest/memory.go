package disktest

import (
	"bytes"
	"sync"

	"github.com/diskserve/diskserve"
)

// A Memory is a DiskFile held in memory, with no capability beyond the
// DiskFile methods and a Flush that has nothing to do: it is the bare disk
// on which tests check the fallbacks of package diskserve and of wrappers.
type Memory struct {
	mu       sync.RWMutex // for overlapping requests, which DiskFile allows
	data     []byte
	readOnly bool
}

// NewMemory returns a Memory disk holding data, which it uses without
// copying.
func NewMemory(data []byte, readOnly bool) *Memory {
	return &Memory{data: data, readOnly: readOnly}
}

// Size returns len(data).
func (m *Memory) Size() int64 { return int64(len(m.data)) }

// ReadOnly reports whether writes are refused.
func (m *Memory) ReadOnly() bool { return m.readOnly }

// ReadAt copies from data.
func (m *Memory) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(m.Size(), off, p)
	if len(p) == 0 {
		return 0, eof
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return copy(p, m.data[off:]), eof
}

// WriteAt copies into data.
func (m *Memory) WriteAt(p []byte, off int64) (int, error) {
	if err := diskserve.CheckWrite(m, off, int64(len(p))); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}

// Close does nothing.
func (m *Memory) Close() error { return nil }

// Flush does nothing: memory has no stable storage to reach.
func (m *Memory) Flush() error { return nil }

// Bytes returns a copy of the disk's content, safe to take while requests
// run.
func (m *Memory) Bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return bytes.Clone(m.data)
}
