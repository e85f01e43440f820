package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/remotetest"
	"github.com/diskserve/diskserve/internal/testtool"
)

// guestPrelude starts every test guest's /init: busybox's applets, the
// kernel's file systems, the virtio modules, and a wait for /dev/vda.
const guestPrelude = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
	insmod /modules/$m.ko
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
`

// guestInit is /init of the test guest: it mounts the NBD-backed disk,
// reads the host's file, writes its own and powers off.
const guestInit = guestPrelude + `mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt; then
	echo "GUEST-READ: $(cat /mnt/hello.txt)"
	echo "written by the guest" > /mnt/guest.txt
	dd if=/dev/urandom of=/mnt/noise bs=1M count=4 2>/dev/null
	sync
	umount /mnt && echo GUEST-DONE
fi
poweroff -f
`

// guestDir returns the directory with the guest kernel and modules made by
// testdata/guest/fetch-kernel.sh, or skips (fails under
// DISKSERVE_REQUIRE_INTEROP) when it has not been run.
func guestDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("DISKSERVE_GUEST_DIR")
	if dir == "" {
		home, _ := os.UserHomeDir()
		dir = filepath.Join(home, ".cache", "diskserve", "guest")
	}
	if _, err := os.Stat(filepath.Join(dir, "modules", "virtio_blk.ko")); err != nil {
		if os.Getenv(testtool.RequireEnv) == "1" {
			t.Fatalf("no guest kernel in %s: run testdata/guest/fetch-kernel.sh", dir)
		}
		t.Skipf("no guest kernel in %s: run testdata/guest/fetch-kernel.sh", dir)
	}
	return dir
}

// initramfs packs busybox, the modules and guestInit into a gzipped cpio
// archive.
func initramfs(t *testing.T, kernelDir string) string {
	return initramfsWith(t, kernelDir, guestInit)
}

// initramfsWith packs busybox, the modules, init as /init and the host's
// programs progs (with the shared libraries they need) into a gzipped
// cpio archive.
func initramfsWith(t *testing.T, kernelDir, init string, progs ...string) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "root")
	for _, d := range []string{"bin", "proc", "sys", "dev", "modules"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	testtool.Need(t, "busybox")
	testtool.Run(t, "cp", "/bin/busybox", filepath.Join(root, "bin", "busybox"))
	testtool.Run(t, "sh", "-c", `cp "$0"/modules/*.ko "$1"/modules/`, kernelDir, root)
	if err := os.WriteFile(filepath.Join(root, "init"), []byte(init), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range progs {
		path := testtool.Need(t, p)
		// The program and every library ldd names, at their own paths.
		testtool.Run(t, "sh", "-c", `for f in "$0" $(ldd "$0" | grep -o '/[^ ]*'); do mkdir -p "$1/$(dirname "$f")" && cp -L "$f" "$1/$f"; done`, path, root)
	}
	out := filepath.Join(t.TempDir(), "initrd.gz")
	testtool.Need(t, "cpio")
	testtool.Run(t, "sh", "-c", `cd "$0" && find . | cpio -o -H newc --quiet | gzip > "$1"`, root, out)
	return out
}

// TestGuestBoot boots a Linux guest under qemu (TCG) whose virtio disk is
// an ext4 image served by diskserve over NBD, raw and qcow2. The guest
// reads a file the test put there and writes one; afterwards the image
// holds the guest's file, e2fsck finds the file system clean and, for
// qcow2, qemu-img check finds the image clean.
func TestGuestBoot(t *testing.T) {
	kernelDir := guestDir(t)
	qemu := testtool.Need(t, "qemu-system-x86_64")
	initrd := initramfs(t, kernelDir)
	// s3-overlay: the guest boots from a local overlay whose backing
	// file is a qcow2 golden image in a bucket.
	for _, format := range []string{"raw", "qcow2", "s3-overlay"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			content := filepath.Join(dir, "content")
			os.Mkdir(content, 0o755)
			os.WriteFile(filepath.Join(content, "hello.txt"), []byte("hello from the host"), 0o644)
			img := filepath.Join(dir, "disk.raw")
			testtool.Run(t, "mkfs.ext4", "-q", "-F", "-d", content, img, "64M")
			if format != "raw" {
				testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, img+".qcow2")
				img += ".qcow2"
			}
			var golden []byte
			if format == "s3-overlay" {
				s3 := remotetest.StartS3(t)
				s3.CreateBucket(t, "golden")
				s3.PutFile(t, "golden", "disk.qcow2", img)
				remotetest.Env(t, s3.URL)
				golden, _ = os.ReadFile(img)
				img = filepath.Join(dir, "vm.qcow2")
				mustRun(t, "create", "--cache-dir", filepath.Join(dir, "cache"), "-f", "qcow2", "-b", "s3://golden/disk.qcow2", "-F", "qcow2", img)
				t.Cleanup(func() {
					if stored, err := os.ReadFile(filepath.Join(s3.Root, "golden", "disk.qcow2")); err != nil || !bytes.Equal(stored, golden) {
						t.Errorf("the golden image in the bucket changed (%v)", err)
					}
				})
			}

			sock := filepath.Join(dir, "nbd.sock")
			srv := startServe(t, exec.Command(diskserveBin, "serve", "-f", strings.TrimPrefix(format, "s3-overlay"), "--cache-dir", filepath.Join(dir, "cache"), "--listen", "unix:"+sock, img))
			ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
			defer cancel()
			guest := exec.CommandContext(ctx, qemu, "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
				"-kernel", filepath.Join(kernelDir, "vmlinuz"), "-initrd", initrd,
				"-append", "console=ttyS0 quiet panic=-1",
				"-drive", "file=nbd+unix:///?socket="+sock+",format=raw,if=virtio,cache=writeback")
			out, err := guest.CombinedOutput()
			console := string(out)
			if err != nil || !strings.Contains(console, "GUEST-READ: hello from the host") || !strings.Contains(console, "GUEST-DONE") {
				t.Fatalf("guest: %v\nconsole:\n%s\nserver log:\n%s", err, console, srv.stderr)
			}
			if code := srv.stop(t, syscall.SIGTERM); code != 0 {
				t.Fatalf("diskserve exit status %d:\n%s", code, srv.stderr)
			}
			fsImage := img
			switch format {
			case "qcow2":
				testtool.Run(t, "qemu-img", "check", img)
				fsImage = filepath.Join(dir, "back.raw")
				testtool.Run(t, "qemu-img", "convert", "-O", "raw", img, fsImage)
			case "s3-overlay": // qemu cannot read s3:// backing files
				mustRun(t, "check", "--cache-dir", filepath.Join(dir, "cache"), img)
				fsImage = filepath.Join(dir, "back.raw")
				mustRun(t, "convert", "--cache-dir", filepath.Join(dir, "cache"), "-O", "raw", img, fsImage)
			}
			if got := string(testtool.Run(t, "debugfs", "-R", "cat /guest.txt", fsImage)); strings.TrimSpace(got) != "written by the guest" {
				t.Fatalf("the guest's file holds %q", got)
			}
			testtool.Run(t, "e2fsck", "-fn", fsImage)
		})
	}
}
