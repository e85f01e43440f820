package cache

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/diskserve/diskserve/internal/aligned"
	"golang.org/x/sys/unix"
)

// The files of one object's cache directory.
const (
	metaFile  = "meta.json"
	dataFile  = "data"  // the object's bytes at their own offsets; absent chunks are holes
	stateFile = "state" // one little-endian uint32 per chunk: its state and generation
	sumsFile  = "sums"  // one CRC-32C per chunk, written before the chunk is marked present
	lockFile  = "lock"  // flock: shared by users, exclusive to set up or prune; byte i: chunk i is being fetched
)

// layoutVersion changes when the files of a cache directory change meaning.
const layoutVersion = 1

// Chunk states, in the low bits of a state word; the rest is a generation
// that changes whenever the chunk becomes present, so that a reader can
// tell that a chunk was evicted and fetched again while it read it.
const (
	absent   = 0
	present  = 1 // bytes in the data file
	zero     = 2 // all zeroes, a hole in the data file
	kindMask = 3
	genStep  = 4
)

// Meta is what a cache directory records about its object, in meta.json.
// It holds no credentials: URLs are stored as [diskserve.DisplayName]
// gives them.
type Meta struct {
	Version   int       `json:"version"`
	Name      string    `json:"name"`
	Key       string    `json:"key"`
	Validator string    `json:"validator"`
	Size      int64     `json:"size"`
	ChunkSize int64     `json:"chunk_size"`
	Created   time.Time `json:"created"`
}

// dirName is the directory under the cache root that holds the object
// with this identity and size.
func dirName(id Identity, size int64) string {
	h := sha256.Sum256([]byte(id.Key + "\x00" + id.Validator + "\x00" + strconv.FormatInt(size, 10)))
	return hex.EncodeToString(h[:16])
}

// store is an open cache directory: the files and the shared mappings of
// the chunk states and sums.
type store struct {
	dir    string
	meta   Meta
	data   *os.File
	direct *os.File // the data file opened O_DIRECT, for writing chunks; nil where the file system refuses it
	lock   *os.File
	states []byte // mmap of stateFile, MAP_SHARED with every process using it
	sums   []byte // mmap of sumsFile
}

// openStore opens, or sets up, the cache directory of an object. An
// existing directory keeps its chunk size; one that does not match meta
// (a crash while setting up) is set up again when no other process uses
// it.
func openStore(dir string, meta Meta) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	s := &store{dir: dir, lock: lock}
	if err := s.setUp(meta); err != nil {
		s.close()
		return nil, fmt.Errorf("cache %s: %w", dir, err)
	}
	return s, nil
}

// setUp checks the files under a shared lock, which it keeps while the
// store is open so that prune leaves it alone; when they do not match
// want, it creates them under an exclusive lock.
func (s *store) setUp(want Meta) error {
	fd := int(s.lock.Fd())
	if err := unix.Flock(fd, unix.LOCK_SH); err != nil {
		return err
	}
	if got, err := ReadMeta(s.dir); err == nil && got.matches(want) {
		s.meta = got
		return s.open()
	}
	// Not set up, or left half set up by a crash. A process that uses
	// the directory found it set up, so waiting for the exclusive lock
	// waits only for others setting it up.
	if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
		return err
	}
	got, err := ReadMeta(s.dir) // another process may have set it up meanwhile
	if err != nil || !got.matches(want) {
		if err := s.create(want); err != nil {
			return err
		}
		got = want
	}
	s.meta = got
	if err := unix.Flock(fd, unix.LOCK_SH); err != nil {
		return err
	}
	return s.open()
}

// matches reports whether a directory holding m can serve the object of
// want.
func (m Meta) matches(want Meta) bool {
	return m.Version == layoutVersion && m.Key == want.Key && m.Validator == want.Validator && m.Size == want.Size && ValidChunkSize(m.ChunkSize)
}

// create makes empty files for meta, writing meta.json last: a directory
// without it is not a cache yet.
func (s *store) create(meta Meta) error {
	os.Remove(filepath.Join(s.dir, metaFile))
	n := chunks(meta.Size, meta.ChunkSize)
	for _, f := range []struct {
		name string
		size int64
	}{{dataFile, meta.Size}, {stateFile, 4 * n}, {sumsFile, 4 * n}} {
		file, err := os.OpenFile(filepath.Join(s.dir, f.name), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		err = file.Truncate(f.size)
		if err == nil {
			err = file.Sync()
		}
		file.Close()
		if err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(meta, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(s.dir, metaFile+".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	if f, err := os.Open(tmp); err == nil {
		f.Sync()
		f.Close()
	}
	if err := os.Rename(tmp, filepath.Join(s.dir, metaFile)); err != nil {
		return err
	}
	return syncDir(s.dir)
}

// open opens the data file and maps the states and sums.
func (s *store) open() error {
	n := chunks(s.meta.Size, s.meta.ChunkSize)
	var err error
	if s.data, err = os.OpenFile(filepath.Join(s.dir, dataFile), os.O_RDWR, 0); err != nil {
		return err
	}
	if fi, err := s.data.Stat(); err != nil || fi.Size() != s.meta.Size {
		return fmt.Errorf("%s is not %d bytes long", dataFile, s.meta.Size)
	}
	// Chunks are written around the page cache: filling it costs more
	// CPU than the network transfer does, and the chunks a client reads
	// next come from the fetch, not the file.
	s.direct, _ = os.OpenFile(filepath.Join(s.dir, dataFile), os.O_WRONLY|unix.O_DIRECT, 0)
	if s.states, err = mapFile(filepath.Join(s.dir, stateFile), 4*n); err != nil {
		return err
	}
	s.sums, err = mapFile(filepath.Join(s.dir, sumsFile), 4*n)
	return err
}

// mapFile maps the file at path, which must be size bytes long, shared
// and writable.
func mapFile(path string, size int64) ([]byte, error) {
	if size == 0 {
		return nil, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || fi.Size() != size {
		return nil, fmt.Errorf("%s is not %d bytes long", filepath.Base(path), size)
	}
	return unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
}

// word returns chunk i's state word, shared with other processes.
func (s *store) word(i int64) *uint32 {
	return (*uint32)(unsafe.Pointer(&s.states[4*i]))
}

func (s *store) state(i int64) uint32 { return atomic.LoadUint32(s.word(i)) }

// setState gives chunk i the kind k and a new generation.
func (s *store) setState(i int64, k uint32) {
	w := s.word(i)
	old := atomic.LoadUint32(w)
	atomic.StoreUint32(w, (old&^kindMask)+genStep|k)
}

func (s *store) setSum(i int64, sum uint32) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&s.sums[4*i])), sum)
}

func (s *store) sum(i int64) uint32 {
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&s.sums[4*i])))
}

// syncStates writes the state and sum pages to the file.
func (s *store) syncStates() error {
	for _, m := range [][]byte{s.sums, s.states} {
		if len(m) > 0 {
			if err := unix.Msync(m, unix.MS_SYNC); err != nil {
				return err
			}
		}
	}
	return nil
}

// lockChunks takes the fetch lock of chunks [first, end), waiting while
// another process holds any of them.
func (s *store) lockChunks(first, end int64) error {
	return s.fcntlLock(unix.F_WRLCK, unix.F_OFD_SETLKW, first, end)
}

// tryLockChunks takes the fetch lock of chunks [first, end) if no other
// process holds any of them.
func (s *store) tryLockChunks(first, end int64) bool {
	return s.fcntlLock(unix.F_WRLCK, unix.F_OFD_SETLK, first, end) == nil
}

func (s *store) unlockChunks(first, end int64) {
	s.fcntlLock(unix.F_UNLCK, unix.F_OFD_SETLK, first, end)
}

// fcntlLock applies an open-file-description lock to bytes [first, end)
// of the lock file; such locks belong to the file, not the thread, so any
// goroutine may release them.
func (s *store) fcntlLock(typ int16, cmd int, first, end int64) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: first, Len: end - first}
	for {
		err := unix.FcntlFlock(s.lock.Fd(), cmd, &lk)
		if err != unix.EINTR {
			return err
		}
	}
}

func (s *store) close() error {
	var errs []error
	if s.states != nil {
		errs = append(errs, s.syncStates(), unix.Munmap(s.states))
	}
	if s.sums != nil {
		errs = append(errs, unix.Munmap(s.sums))
	}
	if s.data != nil {
		errs = append(errs, s.data.Close())
	}
	if s.direct != nil {
		errs = append(errs, s.direct.Close())
	}
	errs = append(errs, s.lock.Close()) // drops the flock
	return errors.Join(errs...)
}

// chunks is the number of chunks of an object of size bytes.
func chunks(size, chunk int64) int64 { return (size + chunk - 1) / chunk }

// ValidChunkSize reports whether n may be a cache's chunk size: a power of
// two from 64 KiB to 64 MiB.
func ValidChunkSize(n int64) bool {
	return n >= 64<<10 && n <= 64<<20 && n&(n-1) == 0
}

// ReadMeta reads the meta.json of the cache directory dir.
func ReadMeta(dir string) (Meta, error) {
	var m Meta
	b, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("%s: %w", filepath.Join(dir, metaFile), err)
	}
	return m, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// directAlign is the alignment of O_DIRECT writes: of buffers, offsets and
// lengths.
const directAlign = aligned.Align

// writeChunk writes b at off: its whole aligned blocks with O_DIRECT where
// the file system takes it and b and off are aligned, the rest (the
// object's last bytes) through the page cache.
func (s *store) writeChunk(b []byte, off int64) error {
	if s.direct != nil && off%directAlign == 0 && uintptr(unsafe.Pointer(unsafe.SliceData(b)))%directAlign == 0 {
		n := len(b) &^ (directAlign - 1)
		if n > 0 {
			if _, err := s.direct.WriteAt(b[:n], off); err != nil {
				return err
			}
		}
		b, off = b[n:], off+int64(n)
		if len(b) == 0 {
			return nil
		}
	}
	_, err := s.data.WriteAt(b, off)
	return err
}

// punch makes [off, off+n) of the data file a hole.
func (s *store) punch(off, n int64) error {
	return unix.Fallocate(int(s.data.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
