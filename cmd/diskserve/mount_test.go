package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/internal/testtool"
)

// mount runs diskserve mount of image at mountpoint and returns the path
// of the disk file; it is unmounted when the test ends, if still up.
func mount(t *testing.T, image, mountpoint string, args ...string) (*server, string) {
	t.Helper()
	testtool.Need(t, "fusermount3")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if os.Getenv(testtool.RequireEnv) == "1" {
			t.Fatal("no /dev/fuse")
		}
		t.Skip("no /dev/fuse")
	}
	cmd := exec.Command(diskserveBin, append(append([]string{"mount"}, args...), image, mountpoint)...)
	s := startDaemon(t, cmd, "msg=mounted")
	t.Cleanup(func() { exec.Command("umount", "-l", mountpoint).Run() })
	file := mountpoint
	if st, err := os.Stat(mountpoint); err == nil && st.IsDir() {
		file = filepath.Join(mountpoint, "disk")
	}
	return s, file
}

func unmount(t *testing.T, s *server) {
	t.Helper()
	if code := s.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("diskserve mount exit status %d:\n%s", code, s.stderr)
	}
}

func mountFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "mnt")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestMountFormats mounts images of every readable format and compares
// the file with qemu-img's (or the source's) bytes.
func TestMountFormats(t *testing.T) {
	dir := t.TempDir()
	src := convertSource(t, dir) // a qcow2 overlay over a compressed qcow2
	ref := filepath.Join(dir, "ref.raw")
	testtool.Run(t, "qemu-img", "convert", "-O", "raw", src, ref)
	want, _ := os.ReadFile(ref)
	simg := filepath.Join(dir, "img.simg")
	mustRun(t, "convert", "-O", "android-sparse", src, simg)
	zst := filepath.Join(dir, "img.zst")
	mustRun(t, "convert", "-O", "zstd", src, zst)
	// A composite of the qcow2 and the raw conversion, one after the other.
	comp := filepath.Join(dir, "img.composite")
	n := int64(len(want))
	spec := &composite.Spec{Version: 2, Length: 2 * n, Components: []composite.Component{
		{Path: "top.qcow2"}, {Path: "ref.raw", Offset: n},
	}}
	if err := os.WriteFile(comp, spec.Marshal(), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, image string
		args        []string
		want        []byte
	}{
		{"raw", ref, nil, want},
		{"raw-uring", ref, []string{"--aio=uring"}, want},
		{"composite-uring", comp, []string{"-r", "--aio=uring"}, append(bytes.Clone(want), want...)},
		{"qcow2", src, []string{"-r"}, want},
		{"android-sparse", simg, []string{"-r"}, append(bytes.Clone(want), make([]byte, 4096-len(want)%4096)...)},
		{"zstd", zst, []string{"-r"}, want},
		{"composite", comp, []string{"-r"}, append(bytes.Clone(want), want...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, file := mount(t, tc.image, mountFile(t), tc.args...)
			got, err := os.ReadFile(file)
			if err != nil || !bytes.Equal(got, tc.want) {
				t.Fatalf("read %d bytes (%v), want %d; equal %v", len(got), err, len(tc.want), bytes.Equal(got, tc.want))
			}
			unmount(t, s)
		})
	}
}

// TestMountWrites writes through a mounted qcow2 overlay, fsyncs, punches
// and zeroes ranges, and checks the image afterwards with qemu-img and
// diskserve map.
func TestMountWrites(t *testing.T) {
	dir := t.TempDir()
	src := convertSource(t, dir)
	s, file := mount(t, src, mountFile(t))
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("written through FUSE "), 10000)
	if _, err := f.WriteAt(data, 12345); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// Both ranges hold data from the backing chain (convertSource).
	testtool.Run(t, "fallocate", "--punch-hole", "--offset", "1M", "--length", "2M", file)
	testtool.Run(t, "fallocate", "--zero-range", "--offset", "8M", "--length", "1M", file)
	// A mostly empty image copies quickly and sparsely.
	cp := filepath.Join(dir, "copy.raw")
	start := time.Now()
	testtool.Run(t, "cp", "--sparse=always", file, cp)
	if b := blocks(t, cp) * 512; b > 8<<20 {
		t.Errorf("cp --sparse copy allocates %d bytes", b)
	}
	t.Logf("cp --sparse=always of the mounted file took %v", time.Since(start))
	unmount(t, s)

	testtool.Run(t, "qemu-img", "check", src)
	out := filepath.Join(dir, "after.raw")
	testtool.Run(t, "qemu-img", "convert", "-O", "raw", src, out)
	after, _ := os.ReadFile(out)
	if !bytes.Equal(after[12345:12345+len(data)], data) {
		t.Fatal("the write through the mount is not in the image")
	}
	if !bytes.Equal(after[1<<20:3<<20], make([]byte, 2<<20)) || !bytes.Equal(after[8<<20:9<<20], make([]byte, 1<<20)) {
		t.Fatal("punched or zeroed ranges do not read as zeroes")
	}
	for _, r := range testtool.DataRanges(t, []byte(mustRun(t, "map", "--output=json", src))) {
		if r.Start < 3<<20 && r.End > 1<<20 || r.Start < 9<<20 && r.End > 8<<20 {
			t.Errorf("data range %v overlaps the punched [1M, 3M) or zeroed [8M, 9M)", r)
		}
	}
}

// TestMountReadOnly refuses writes with EROFS.
func TestMountReadOnly(t *testing.T) {
	img := filepath.Join(t.TempDir(), "ro.qcow2")
	mustRun(t, "create", "-f", "qcow2", img, "8M")
	s, file := mount(t, img, t.TempDir(), "-r") // directory mode: the disk is dir/disk
	if _, err := os.OpenFile(file, os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("open for writing: %v, want EROFS", err)
	}
	if st, err := os.Stat(file); err != nil || st.Size() != 8<<20 {
		t.Fatalf("stat of dir/disk: %v %v", st, err)
	}
	unmount(t, s)
}

// TestMountMkfs makes an ext4 file system on a mounted empty qcow2,
// populated by mke2fs -d, checks it with e2fsck on the mounted file, and
// reads the same bytes back through diskserve serve and nbdcopy.
func TestMountMkfs(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.qcow2")
	mustRun(t, "create", "-f", "qcow2", img, "64M")
	content := filepath.Join(dir, "content")
	os.Mkdir(content, 0o755)
	os.WriteFile(filepath.Join(content, "hello.txt"), bytes.Repeat([]byte("hello "), 50000), 0o644)
	s, file := mount(t, img, mountFile(t))
	testtool.Run(t, "mkfs.ext4", "-q", "-F", "-d", content, file)
	testtool.Run(t, "e2fsck", "-fn", file)
	mounted, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	unmount(t, s)
	testtool.Run(t, "qemu-img", "check", img)

	sock := filepath.Join(dir, "s.sock")
	startServe(t, exec.Command(diskserveBin, "serve", "-r", "--listen", "unix:"+sock, img))
	out := filepath.Join(dir, "out.raw")
	testtool.Run(t, "nbdcopy", "nbd+unix:///?socket="+sock, out)
	served, _ := os.ReadFile(out)
	if !bytes.Equal(served, mounted) {
		t.Fatal("the bytes served over NBD differ from those read through the mount")
	}
	if got := string(testtool.Run(t, "debugfs", "-R", "cat /hello.txt", out)); len(got) != 300000 {
		t.Fatalf("hello.txt has %d bytes", len(got))
	}
}
