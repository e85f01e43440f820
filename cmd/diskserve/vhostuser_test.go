package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/testtool"
	"github.com/diskserve/diskserve/internal/vhostfront"
)

// vhostGuestInit is /init of the vhost-user-blk guest: it checks the
// host's file, writes its own (printing their sums), trims the file
// system, zeroes the scratch range behind it with BLKZEROOUT (util-linux
// blkdiscard -z, which the kernel sends as WRITE_ZEROES) and powers off.
const vhostGuestInit = guestPrelude + `echo "GUEST-QUEUES: $(ls /sys/block/vda/mq | wc -l)"
echo "GUEST-WCE: $(cat /sys/block/vda/queue/write_cache)"
mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt; then
	echo "GUEST-READ: $(cat /mnt/hello.txt)"
	echo "GUEST-HOSTSUM: $(sha256sum /mnt/host-noise | cut -d' ' -f1)"
	echo "written by the guest" > /mnt/guest.txt
	dd if=/dev/urandom of=/mnt/noise bs=64k count=64 2>/dev/null
	sync
	echo "GUEST-SUM: $(sha256sum /mnt/noise | cut -d' ' -f1)"
	rm /mnt/host-noise
	fstrim /mnt && echo GUEST-TRIMMED
	umount /mnt && /usr/sbin/blkdiscard -f -z -o 67108864 -l 16777216 /dev/vda && echo GUEST-DONE
fi
poweroff -f
`

// TestVhostUserBlkGuest boots a Linux guest under qemu (TCG) whose disk is
// diskserve's vhost-user-blk device, with two queues, raw and qcow2, the
// image also served over NBD. The
// guest reads what the host wrote, writes files, trims, zeroes a range
// with WRITE_ZEROES and powers off; afterwards e2fsck finds the file
// system clean, qemu-img check the qcow2 image, the guest's bytes are in
// the image, the zeroed range reads as zeroes and the range past it is
// untouched.
func TestVhostUserBlkGuest(t *testing.T) {
	kernelDir := guestDir(t)
	qemu := testtool.Need(t, "qemu-system-x86_64")
	initrd := initramfsWith(t, kernelDir, vhostGuestInit, "blkdiscard")
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			content := filepath.Join(dir, "content")
			os.Mkdir(content, 0o755)
			os.WriteFile(filepath.Join(content, "hello.txt"), []byte("hello from the host"), 0o644)
			noise := bytes.Repeat([]byte("diskserve vhost-user-blk "), 100000)
			os.WriteFile(filepath.Join(content, "host-noise"), noise, 0o644)
			img := filepath.Join(dir, "disk.raw")
			testtool.Run(t, "mkfs.ext4", "-q", "-F", "-d", content, img, "64M")
			// 32 MiB of 0xaa behind the file system: the guest zeroes the
			// first half.
			f, err := os.OpenFile(img, os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.Write(bytes.Repeat([]byte{0xaa}, 32<<20))
			f.Close()
			if format == "qcow2" {
				testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, img+".qcow2")
				img += ".qcow2"
			}
			sock, nbdSock := filepath.Join(dir, "vhost.sock"), filepath.Join(dir, "nbd.sock")
			srv := startDaemon(t, exec.Command(diskserveBin, "serve", "-f", format, "--vhost-user-blk", sock, "--queues", "2", "--listen", "unix:"+nbdSock, img), "msg=listening")
			console := bootVhostGuest(t, qemu, kernelDir, initrd, sock, "")
			// The same image over NBD at the same time, as a backup tool
			// reads it.
			if got := strings.TrimSpace(string(testtool.Run(t, "nbdinfo", "--size", "nbd+unix:///?socket="+nbdSock))); got != "100663296" {
				t.Errorf("nbdinfo --size over the NBD listener: %s", got)
			}
			for _, want := range []string{"GUEST-QUEUES: 2", "GUEST-WCE: write back", "GUEST-READ: hello from the host", "GUEST-TRIMMED", "GUEST-DONE"} {
				if !strings.Contains(console, want) {
					t.Fatalf("the console lacks %q:\n%s\nserver log:\n%s", want, console, srv.stderr)
				}
			}
			hostSum := sha256.Sum256(noise)
			if got := field(console, "GUEST-HOSTSUM"); got != hex.EncodeToString(hostSum[:]) {
				t.Errorf("the guest read the host's file with sum %s", got)
			}
			if code := srv.stop(t, syscall.SIGTERM); code != 0 {
				t.Fatalf("diskserve exit status %d:\n%s", code, srv.stderr)
			}
			fsImage := img
			if format == "qcow2" {
				testtool.Run(t, "qemu-img", "check", img)
				fsImage = filepath.Join(dir, "back.raw")
				testtool.Run(t, "qemu-img", "convert", "-O", "raw", img, fsImage)
			}
			testtool.Run(t, "e2fsck", "-fn", fsImage)
			if got := string(testtool.Run(t, "debugfs", "-R", "cat /guest.txt", fsImage)); strings.TrimSpace(got) != "written by the guest" {
				t.Errorf("the guest's file holds %q", got)
			}
			sum := sha256.Sum256(testtool.Run(t, "debugfs", "-R", "cat /noise", fsImage))
			if got := field(console, "GUEST-SUM"); got != hex.EncodeToString(sum[:]) {
				t.Errorf("the guest's random file: the guest's sum %s, the image's %x", got, sum)
			}
			raw, err := os.ReadFile(fsImage)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(raw[64<<20:80<<20], make([]byte, 16<<20)) {
				t.Errorf("the range the guest zeroed does not read as zeroes")
			}
			if !bytes.Equal(raw[80<<20:96<<20], bytes.Repeat([]byte{0xaa}, 16<<20)) {
				t.Errorf("the range past the one the guest zeroed changed")
			}
		})
	}
}

// bootVhostGuest boots the test guest on the vhost-user-blk socket sock
// and returns its console; extra is appended to the chardev's options.
func bootVhostGuest(t *testing.T, qemu, kernelDir, initrd, sock, extra string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	guest := exec.CommandContext(ctx, qemu, "-accel", "tcg", "-m", "256", "-smp", "2", "-nographic", "-no-reboot",
		"-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
		"-chardev", "socket,id=c0,path="+sock+extra,
		"-device", "vhost-user-blk-pci,chardev=c0,num-queues=2",
		"-kernel", filepath.Join(kernelDir, "vmlinuz"), "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1")
	out, err := guest.CombinedOutput()
	if err != nil {
		t.Fatalf("guest: %v\nconsole:\n%s", err, out)
	}
	return string(out)
}

// field returns the value the console prints after "NAME: ".
func field(console, name string) string {
	m := regexp.MustCompile(regexp.QuoteMeta(name) + `: (\S+)`).FindStringSubmatch(console)
	if m == nil {
		return ""
	}
	return m[1]
}

// reconnectGuestInit is /init of the reconnect test's guest: a loop of
// file writes, each synced and summed, then a check of every file read
// back from the disk.
const reconnectGuestInit = guestPrelude + `mkdir -p /mnt
if mount -t ext4 /dev/vda /mnt; then
	i=0
	while [ $i -lt 24 ]; do
		dd if=/dev/urandom of=/mnt/f$i bs=64k count=16 2>/dev/null && sync && sha256sum /mnt/f$i >> /sums || echo GUEST-FAILED
		echo "GUEST-WROTE $i"
		i=$((i+1))
	done
	echo 3 > /proc/sys/vm/drop_caches
	sha256sum -c /sums >/dev/null && echo GUEST-VERIFIED
	umount /mnt && echo GUEST-DONE
fi
poweroff -f
`

// TestVhostUserBlkReconnect runs a guest that writes and syncs files in a
// loop while diskserve is killed (SIGKILL) and, later, stopped (SIGTERM)
// and started again on the same socket each time: qemu reconnects, the
// requests in flight are finished from the inflight region, the loop sees
// no error, and every file reads back as written.
func TestVhostUserBlkReconnect(t *testing.T) {
	kernelDir := guestDir(t)
	qemu := testtool.Need(t, "qemu-system-x86_64")
	initrd := initramfsWith(t, kernelDir, reconnectGuestInit)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	raw := filepath.Join(dir, "disk.raw")
	testtool.Run(t, "mkfs.ext4", "-q", "-F", raw, "64M")
	testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
	sock := filepath.Join(dir, "vhost.sock")
	serve := func() *server {
		return startDaemon(t, exec.Command(diskserveBin, "serve", "--vhost-user-blk", sock, "--queues", "2", img), "msg=vhost-user-blk")
	}
	srv := serve()
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	guest := exec.CommandContext(ctx, qemu, "-accel", "tcg", "-m", "256", "-smp", "2", "-nographic", "-no-reboot",
		"-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
		"-chardev", "socket,id=c0,path="+sock+",reconnect=1",
		"-device", "vhost-user-blk-pci,chardev=c0,num-queues=2",
		"-kernel", filepath.Join(kernelDir, "vmlinuz"), "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1")
	out, err := guest.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	guest.Stderr = guest.Stdout
	if err := guest.Start(); err != nil {
		t.Fatal(err)
	}
	var console strings.Builder
	var logs []string
	restarts := map[string]os.Signal{"GUEST-WROTE 4": syscall.SIGKILL, "GUEST-WROTE 12": syscall.SIGTERM}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		console.WriteString(line + "\n")
		for mark, sig := range restarts {
			if strings.Contains(line, mark) {
				srv.cmd.Process.Signal(sig)
				<-srv.done
				srv.done <- nil
				logs = append(logs, srv.stderr.String())
				srv = serve()
			}
		}
	}
	err = guest.Wait()
	c := console.String()
	if err != nil || !strings.Contains(c, "GUEST-VERIFIED") || !strings.Contains(c, "GUEST-DONE") || strings.Contains(c, "GUEST-FAILED") || strings.Contains(c, "I/O error") {
		t.Fatalf("guest: %v\nconsole:\n%s\nserver logs:\n%s\n%s", err, c, strings.Join(logs, "\n"), srv.stderr)
	}
	if code := srv.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("diskserve exit status %d:\n%s", code, srv.stderr)
	}
	testtool.Run(t, "qemu-img", "check", img)
	testtool.Run(t, "qemu-img", "convert", "-O", "raw", img, raw)
	testtool.Run(t, "e2fsck", "-fn", raw)
}

// TestVhostUserBlkFlags checks the features `serve --vhost-user-blk`
// offers under -r and the cache modes, asked through the protocol: a
// volatile write cache (FLUSH, CONFIG_WCE) unless the cache mode makes
// every write durable, and RO without DISCARD and WRITE_ZEROES under -r.
func TestVhostUserBlkFlags(t *testing.T) {
	const fRO, fFlush, fConfigWCE, fDiscard, fWriteZeroes = 1 << 5, 1 << 9, 1 << 11, 1 << 13, 1 << 14
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		flags     []string
		set, nset uint64
	}{
		{nil, fFlush | fConfigWCE | fDiscard | fWriteZeroes, fRO},
		{[]string{"--cache=none"}, fFlush | fConfigWCE, fRO},
		{[]string{"--cache=writethrough"}, fDiscard | fWriteZeroes, fFlush | fConfigWCE | fRO},
		{[]string{"--cache=directsync"}, 0, fFlush | fConfigWCE | fRO},
		{[]string{"-r"}, fRO, fDiscard | fWriteZeroes},
	} {
		name := strings.Join(tc.flags, " ")
		if name == "" {
			name = "default"
		}
		t.Run(name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "vhost.sock")
			args := append(append([]string{"serve", "--vhost-user-blk", sock}, tc.flags...), img)
			startDaemon(t, exec.Command(diskserveBin, args...), "msg=vhost-user-blk")
			f, err := vhostfront.Dial(sock, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			p, err := f.Call(vhostfront.ReqGetFeatures, nil)
			if err != nil || len(p) != 8 {
				t.Fatalf("GET_FEATURES: %x %v", p, err)
			}
			got := binary.LittleEndian.Uint64(p)
			if got&tc.set != tc.set || got&tc.nset != 0 {
				t.Errorf("features %#x: want %#x set and %#x clear", got, tc.set, tc.nset)
			}
		})
	}
}
