// Package fuse exposes a disk as a file through FUSE, so that tools that
// take files (mkfs, e2fsck, qemu-img, loop devices, VMMs) can use any image
// diskserve opens.
//
// It uses go-fuse's raw API, because the fs package cannot mount over a
// regular file. Mounted at a regular file, the disk appears at that path,
// as qemu's FUSE export does; mounted at a directory, it appears inside it
// as "disk", and each partition of a GPT or MBR partition table on it as
// "disk-p1", "disk-p2", ...: windows onto the same disk, writable when it
// is. Partitions are read when mounting.
//
// # Supported
//
//   - read, write, fsync (a [diskserve.Flush] of the image: data and
//     metadata reach stable storage), flush (on every close; cheap).
//   - fallocate: PUNCH_HOLE|KEEP_SIZE punches a hole that reads as zeroes,
//     ZERO_RANGE writes zeroes, preallocation inside the disk succeeds.
//   - lseek SEEK_DATA/SEEK_HOLE from the image's extents, and st_blocks
//     from its allocation, so cp --sparse, qemu-img and nbdcopy skip holes.
//   - Read-only disks refuse writes with EROFS.
//
// Files are opened with FOPEN_DIRECT_IO and FOPEN_PARALLEL_DIRECT_WRITES:
// no page cache of the disk in the kernel, parallel writes.
//
// # Not supported
//
//   - Truncate: the disk's size is fixed (EINVAL).
//   - Following changes to the partition table while mounted.
package fuse

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/window"
)

// Options configure [Mount].
type Options struct {
	// Name appears in /proc/mounts as the file system's source.
	Name string
	// Logger receives errors; nil discards them.
	Logger *slog.Logger
}

// A Server is a mounted disk.
type Server struct {
	srv        *gofuse.Server
	mountpoint string
	log        *slog.Logger
}

// Inode numbers: the mountpoint, and the disk when the mountpoint is a
// directory.
const (
	inoRoot = 1
	inoDisk = 2

	attrTimeout = time.Second
	maxWrite    = 1 << 20 // the largest request; the kernel caps it at max_pages
)

// Mount mounts d at mountpoint, a regular file or a directory, and serves
// it until [Server.Unmount]. The caller keeps d and closes it after
// [Server.Wait] returns.
func Mount(d diskserve.DiskFile, mountpoint string, opts Options) (*Server, error) {
	st, err := os.Stat(mountpoint)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return nil, errors.New("FUSE is not available: /dev/fuse is missing (load the fuse module; install fuse3)")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fs := &rawFS{RawFileSystem: gofuse.NewDefaultRawFileSystem(), dir: st.IsDir(), log: log, mtime: time.Now()}
	if fs.dir {
		fs.nodes = append(fs.nodes, &node{ino: inoDisk, name: "disk", d: d})
		for i, p := range readPartitions(d) {
			fs.nodes = append(fs.nodes, &node{ino: inoDisk + 1 + uint64(i), name: fmt.Sprintf("disk-p%d", i+1), d: window.New(d, p.off, p.n, false)})
		}
	} else {
		fs.nodes = []*node{{ino: inoRoot, d: d}}
	}
	mo := &gofuse.MountOptions{
		FsName:            opts.Name,
		Name:              "diskserve",
		MaxWrite:          maxWrite,
		MaxBackground:     64,
		ExtraCapabilities: gofuse.CAP_ASYNC_DIO,
		// Reads answer with bytes in memory, never a file descriptor, so
		// splicing has nothing to move: go-fuse would still stage each
		// reply header in a pipe before falling back, and log a failure
		// for every read larger than the 1 MiB pipe limit.
		DisableSplice: true,
	}
	if os.Geteuid() == 0 {
		mo.DirectMount, mo.DirectMountStrict = true, true // no fusermount3 race (go-fuse #506)
	}
	srv, err := gofuse.NewServer(fs, mountpoint, mo)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	go srv.Serve()
	if fs.dir {
		// The poll probe behind WaitMount needs a directory.
		if err := srv.WaitMount(); err != nil {
			srv.Unmount()
			return nil, err
		}
	}
	return &Server{srv: srv, mountpoint: mountpoint, log: log}, nil
}

// Unmount unmounts the disk. If the file is busy, it detaches the mount
// lazily: the path is gone at once, and open files keep working until they
// are closed; [Server.Wait] returns then.
func (s *Server) Unmount() error {
	err := s.srv.Unmount()
	if err == nil {
		return nil
	}
	s.log.Info("mount busy; detaching it until the last open file is closed", "err", err)
	if derr := unix.Unmount(s.mountpoint, unix.MNT_DETACH); derr != nil {
		return fmt.Errorf("unmount %s: %w (lazy detach: %v)", s.mountpoint, err, derr)
	}
	return nil
}

// Wait returns when the mount has gone and every request was answered.
func (s *Server) Wait() { s.srv.Wait() }

// rawFS serves the disk as inode 1 (mounted at a file), or as inode 2
// ("disk") under a directory, with its partitions beside it.
type rawFS struct {
	gofuse.RawFileSystem
	nodes  []*node
	dir    bool
	log    *slog.Logger
	mtime  time.Time
	writes atomic.Uint64 // counts writes, zeroes and punches; see allocation
}

// A node is a file of the mount: the disk, or a window onto a partition.
type node struct {
	ino   uint64
	name  string
	d     diskserve.DiskFile
	alloc allocation
}

// allocation is what a node's st_blocks counts: the bytes of its disk that
// are not holes. Counting walks the disk's extents, too costly for every
// GETATTR on a large image, so the count is kept and walked again only
// after the mount was written (any of its files: they share one disk),
// and then at most once per attrTimeout: as stale as the kernel's own
// attribute cache may be.
type allocation struct {
	mu     sync.Mutex
	bytes  int64
	walked time.Time // zero until the first walk
	gen    uint64    // the mount's write generation at the walk
}

// get returns the allocated bytes of d, walking its extents if the count
// is older than the write generation gen and than attrTimeout.
func (a *allocation) get(d diskserve.DiskFile, gen uint64) int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.walked.IsZero() || a.gen != gen && time.Since(a.walked) >= attrTimeout {
		a.bytes, a.walked, a.gen = allocated(d), time.Now(), gen
	}
	return a.bytes
}

func (f *rawFS) String() string { return "diskserve" }

func (f *rawFS) node(ino uint64) *node {
	for _, n := range f.nodes {
		if n.ino == ino {
			return n
		}
	}
	return nil
}

// fileAttr fills in a file's attributes: its size, and in st_blocks what
// the image has allocated, which is what tells cp to look for holes.
func (f *rawFS) fileAttr(n *node, a *gofuse.Attr) {
	size := n.d.Size()
	a.Ino = n.ino
	a.Size = uint64(size)
	a.Blocks = uint64(n.alloc.get(n.d, f.writes.Load())+511) / 512
	a.Blksize = 4096
	a.Mode = syscall.S_IFREG | 0o644
	if n.d.ReadOnly() {
		a.Mode = syscall.S_IFREG | 0o444
	}
	a.Nlink = 1
	a.Owner = gofuse.Owner{Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid())}
	a.SetTimes(nil, &f.mtime, &f.mtime)
}

// allocated returns the bytes of d that are not holes; all of them if the
// extents cannot be read.
func allocated(d diskserve.DiskFile) int64 {
	var n int64
	err := diskserve.WalkExtents(d, 0, d.Size(), func(e diskserve.Extent) bool {
		if !isHole(e) {
			n += e.Len
		}
		return true
	})
	if err != nil {
		return d.Size()
	}
	return n
}

// isHole reports whether an extent is a hole for lseek and st_blocks:
// unallocated and reading as zeroes (an unallocated qcow2 range over a
// backing file with data is data).
func isHole(e diskserve.Extent) bool {
	return e.Flags&(diskserve.ExtentHole|diskserve.ExtentZero) == diskserve.ExtentHole|diskserve.ExtentZero
}

func (f *rawFS) GetAttr(cancel <-chan struct{}, in *gofuse.GetAttrIn, out *gofuse.AttrOut) gofuse.Status {
	switch n := f.node(in.NodeId); {
	case n != nil:
		f.fileAttr(n, &out.Attr)
	case f.dir && in.NodeId == inoRoot:
		out.Ino, out.Mode, out.Nlink = inoRoot, syscall.S_IFDIR|0o755, 2
		out.Owner = gofuse.Owner{Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid())}
	default:
		return gofuse.ENOENT
	}
	out.SetTimeout(attrTimeout)
	return gofuse.OK
}

func (f *rawFS) Lookup(cancel <-chan struct{}, h *gofuse.InHeader, name string, out *gofuse.EntryOut) gofuse.Status {
	if !f.dir || h.NodeId != inoRoot {
		return gofuse.ENOENT
	}
	for _, n := range f.nodes {
		if n.name == name {
			out.NodeId = n.ino
			f.fileAttr(n, &out.Attr)
			out.SetEntryTimeout(attrTimeout)
			out.SetAttrTimeout(attrTimeout)
			return gofuse.OK
		}
	}
	return gofuse.ENOENT
}

func (f *rawFS) OpenDir(cancel <-chan struct{}, in *gofuse.OpenIn, out *gofuse.OpenOut) gofuse.Status {
	if !f.dir || in.NodeId != inoRoot {
		return gofuse.ENOTDIR
	}
	return gofuse.OK
}

func (f *rawFS) ReadDir(cancel <-chan struct{}, in *gofuse.ReadIn, out *gofuse.DirEntryList) gofuse.Status {
	for i := int(in.Offset); i < len(f.nodes); i++ {
		n := f.nodes[i]
		if !out.AddDirEntry(gofuse.DirEntry{Name: n.name, Mode: syscall.S_IFREG, Ino: n.ino, Off: uint64(i + 1)}) {
			break
		}
	}
	return gofuse.OK
}

// disk returns the disk of a file's node; the kernel sends file operations
// only for nodes it was given.
func (f *rawFS) disk(ino uint64) diskserve.DiskFile {
	if n := f.node(ino); n != nil {
		return n.d
	}
	return nil
}

func (f *rawFS) Open(cancel <-chan struct{}, in *gofuse.OpenIn, out *gofuse.OpenOut) gofuse.Status {
	d := f.disk(in.NodeId)
	if d == nil {
		return gofuse.EISDIR
	}
	if d.ReadOnly() && in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return gofuse.EROFS
	}
	out.OpenFlags = gofuse.FOPEN_DIRECT_IO | gofuse.FOPEN_PARALLEL_DIRECT_WRITES
	return gofuse.OK
}

func (f *rawFS) Read(cancel <-chan struct{}, in *gofuse.ReadIn, buf []byte) (gofuse.ReadResult, gofuse.Status) {
	d := f.disk(in.NodeId)
	if d == nil {
		return nil, gofuse.EBADF
	}
	n, err := d.ReadAt(buf[:min(len(buf), int(in.Size))], int64(in.Offset))
	if err != nil && err != io.EOF {
		return nil, f.errno("read", err)
	}
	return gofuse.ReadResultData(buf[:n]), gofuse.OK
}

func (f *rawFS) Write(cancel <-chan struct{}, in *gofuse.WriteIn, data []byte) (uint32, gofuse.Status) {
	d := f.disk(in.NodeId)
	if d == nil {
		return 0, gofuse.EBADF
	}
	n, err := d.WriteAt(data, int64(in.Offset))
	f.writes.Add(1) // after the write, so that a walk cannot miss it
	if err != nil {
		return uint32(n), f.errno("write", err)
	}
	return uint32(n), gofuse.OK
}

// Fsync makes every completed write durable. It must never answer ENOSYS:
// the kernel would stop sending it and report every later fsync as done.
func (f *rawFS) Fsync(cancel <-chan struct{}, in *gofuse.FsyncIn) gofuse.Status {
	d := f.disk(in.NodeId)
	if d == nil {
		return gofuse.EBADF
	}
	if err := diskserve.Flush(d); err != nil {
		return f.errno("fsync", err)
	}
	return gofuse.OK
}

func (f *rawFS) Flush(cancel <-chan struct{}, in *gofuse.FlushIn) gofuse.Status { return gofuse.OK }

func (f *rawFS) Release(cancel <-chan struct{}, in *gofuse.ReleaseIn) {}

// Fallocate maps PUNCH_HOLE|KEEP_SIZE to a punch and ZERO_RANGE to write
// zeroes; preallocation inside the disk is a no-op. It never answers ENOSYS,
// which would disable fallocate for the whole mount.
func (f *rawFS) Fallocate(cancel <-chan struct{}, in *gofuse.FallocateIn) gofuse.Status {
	d := f.disk(in.NodeId)
	if d == nil {
		return gofuse.EBADF
	}
	defer f.writes.Add(1) // after the change, so that a walk cannot miss it
	off, n := int64(in.Offset), int64(in.Length)
	if err := diskserve.CheckRange(d.Size(), off, n); err != nil {
		return gofuse.Status(syscall.ENOSPC) // the disk cannot grow
	}
	var err error
	switch in.Mode &^ unix.FALLOC_FL_KEEP_SIZE {
	case 0:
		if d.ReadOnly() {
			return gofuse.EROFS
		}
		return gofuse.OK
	case unix.FALLOC_FL_PUNCH_HOLE:
		err = diskserve.PunchHole(d, off, n)
	case unix.FALLOC_FL_ZERO_RANGE:
		err = diskserve.WriteZeroes(d, off, n, 0)
	default:
		return gofuse.Status(syscall.EOPNOTSUPP)
	}
	if err != nil {
		return f.errno("fallocate", err)
	}
	return gofuse.OK
}

// Lseek answers SEEK_DATA and SEEK_HOLE from the extents.
func (f *rawFS) Lseek(cancel <-chan struct{}, in *gofuse.LseekIn, out *gofuse.LseekOut) gofuse.Status {
	d := f.disk(in.NodeId)
	if d == nil {
		return gofuse.EBADF
	}
	size := d.Size()
	off := int64(in.Offset)
	if off >= size {
		return gofuse.Status(syscall.ENXIO)
	}
	wantHole := in.Whence == unix.SEEK_HOLE
	if !wantHole && in.Whence != unix.SEEK_DATA {
		return gofuse.EINVAL
	}
	found := false
	err := diskserve.WalkExtents(d, off, size-off, func(e diskserve.Extent) bool {
		if isHole(e) == wantHole {
			out.Offset, found = uint64(max(e.Off, off)), true
		}
		return !found
	})
	switch {
	case err != nil:
		return f.errno("lseek", err)
	case found:
		return gofuse.OK
	case wantHole:
		out.Offset = uint64(size) // the implicit hole at the end
		return gofuse.OK
	}
	return gofuse.Status(syscall.ENXIO)
}

func (f *rawFS) SetAttr(cancel <-chan struct{}, in *gofuse.SetAttrIn, out *gofuse.AttrOut) gofuse.Status {
	if d := f.disk(in.NodeId); d == nil {
		return gofuse.EPERM
	} else if size, ok := in.GetSize(); ok && int64(size) != d.Size() {
		return gofuse.EINVAL // the disk's size is fixed
	}
	return f.GetAttr(cancel, &gofuse.GetAttrIn{InHeader: in.InHeader}, out)
}

func (f *rawFS) StatFs(cancel <-chan struct{}, in *gofuse.InHeader, out *gofuse.StatfsOut) gofuse.Status {
	size := uint64(f.nodes[0].d.Size())
	out.Bsize, out.Frsize, out.NameLen = 4096, 4096, 255
	out.Blocks = (size + 4095) / 4096
	out.Files = 1
	return gofuse.OK
}

// errno maps an error from the disk to what the kernel is told, by
// [diskserve.Errno], and logs what is not the caller's doing.
func (f *rawFS) errno(op string, err error) gofuse.Status {
	errno := diskserve.Errno(err)
	switch errno {
	case syscall.EROFS, syscall.ENOSPC, syscall.EOPNOTSUPP:
	default:
		f.log.Warn(op+" failed", "err", err)
	}
	return gofuse.Status(errno)
}
