package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestInternalSnapshots lists the internal snapshots qemu-img made and
// serves one of them read-only over NBD, with the data of its moment; the
// current state serves the later data; other formats and unknown names
// are refused with clear errors.
func TestInternalSnapshots(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "snap.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", img)
	testtool.Run(t, "qemu-img", "snapshot", "-c", "first", img)
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 2 512k 1M", img)
	testtool.Run(t, "qemu-img", "snapshot", "-c", "second", img)
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 3 0 64k", img)

	list := mustRun(t, "snapshot", "list", img)
	for _, want := range []string{"Snapshot list:", "first", "second"} {
		if !strings.Contains(list, want) {
			t.Errorf("snapshot list lacks %q:\n%s", want, list)
		}
	}
	var snaps []struct{ ID, Name string }
	json.Unmarshal([]byte(mustRun(t, "snapshot", "list", "--output=json", img)), &snaps)
	if len(snaps) != 2 || snaps[0].Name != "first" || snaps[1].ID != "2" {
		t.Errorf("snapshot list --output=json: %+v", snaps)
	}

	sock := filepath.Join(dir, "s.sock")
	uri := "nbd+unix:///?socket=" + sock
	for _, tc := range []struct {
		snapshot string
		reads    []string
	}{
		{"first", []string{"read -P 1 0 1M", "read -P 0 1M 1M"}},
		{"2", []string{"read -P 1 0 512k", "read -P 2 512k 1M"}},
		{"", []string{"read -P 3 0 64k", "read -P 1 64k 448k", "read -P 2 512k 1M"}},
	} {
		args := []string{"serve", "-r", "--listen", "unix:" + sock, img}
		if tc.snapshot != "" {
			args = append([]string{"serve", "--snapshot", tc.snapshot}, args[1:]...)
		}
		s := startServe(t, exec.Command(diskserveBin, args...))
		out := string(testtool.Run(t, "qemu-io", append(append([]string{"-r", "-f", "raw"}, qemuIOArgs(tc.reads)...), uri)...))
		if strings.Contains(out, "Pattern verification failed") {
			t.Errorf("snapshot %q:\n%s", tc.snapshot, out)
		}
		s.stop(t, syscall.SIGTERM)
	}
	// convert -l and mount --snapshot reach the same data.
	out := filepath.Join(dir, "first.raw")
	mustRun(t, "convert", "-l", "first", "-O", "raw", img, out)
	if b, _ := os.ReadFile(out); len(b) != 16<<20 || !bytes.Equal(b[:1<<20], bytes.Repeat([]byte{1}, 1<<20)) || !bytes.Equal(b[1<<20:2<<20], make([]byte, 1<<20)) {
		t.Error("convert -l first does not give the data of the first snapshot")
	}
	if _, stderr, code := run(t, nil, "serve", "--snapshot", "third", "--listen", "unix:"+sock, img); code == 0 || !strings.Contains(stderr, `no snapshot "third" (snapshots: first, second)`) {
		t.Errorf("an unknown snapshot: exit %d, %s", code, stderr)
	}
	raw := image(t, dir, "plain.raw", "1M")
	if _, stderr, code := run(t, nil, "serve", "--snapshot", "first", "--listen", "unix:"+sock, raw); code == 0 || !strings.Contains(stderr, "raw images have no internal snapshots") {
		t.Errorf("a snapshot of a raw image: exit %d, %s", code, stderr)
	}
	testtool.Run(t, "qemu-img", "check", img)

	// Last, as mount skips (or, under DISKSERVE_REQUIRE_INTEROP, fails)
	// the test where FUSE is missing.
	ms, file := mount(t, img, mountFile(t), "--snapshot", "second")
	b, err := os.ReadFile(file)
	if err != nil || !bytes.Equal(b[512<<10:(512+1024)<<10], bytes.Repeat([]byte{2}, 1<<20)) || b[0] != 1 {
		t.Errorf("mount --snapshot second: %v", err)
	}
	unmount(t, ms)
}

// TestInternalSnapshotsBothWays creates, applies and deletes internal
// snapshots with diskserve and with qemu-img on the same image, and serves
// it read-write over NBD while it has snapshots: each tool applies the
// other's snapshots with the data of their moment, writes through NBD
// leave every snapshot as it was, and qemu-img check stays clean
// throughout.
func TestInternalSnapshotsBothWays(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "both.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
	qemuIO := func(reads ...string) {
		t.Helper()
		out := string(testtool.Run(t, "qemu-io", append(append([]string{"-f", "qcow2"}, qemuIOArgs(reads)...), img)...))
		if strings.Contains(out, "Pattern verification failed") {
			t.Fatalf("qemu-io %q:\n%s", reads, out)
		}
	}
	qemuIO("write -P 1 0 2M")
	mustRun(t, "snapshot", "create", img, "by-diskserve")
	qemuIO("write -P 2 1M 2M")
	testtool.Run(t, "qemu-img", "snapshot", "-c", "by-qemu", img)
	testtool.Run(t, "qemu-img", "check", img)

	// Written over NBD while both snapshots exist.
	sock := filepath.Join(dir, "s.sock")
	s := startServe(t, exec.Command(diskserveBin, "serve", "--listen", "unix:"+sock, img))
	out := string(testtool.Run(t, "qemu-io", append([]string{"-f", "raw"}, append(qemuIOArgs([]string{"write -P 3 512k 1M", "write -z 2M 64k", "discard 2560k 512k", "read -P 3 512k 1M"}), "nbd+unix:///?socket="+sock)...)...))
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io over NBD:\n%s", out)
	}
	s.stop(t, syscall.SIGTERM)
	testtool.Run(t, "qemu-img", "check", img)
	list := string(testtool.Run(t, "qemu-img", "snapshot", "-l", img))
	if !strings.Contains(list, "by-diskserve") || !strings.Contains(list, "by-qemu") {
		t.Fatalf("qemu-img snapshot -l:\n%s", list)
	}

	// diskserve applies qemu's snapshot; qemu applies diskserve's.
	mustRun(t, "snapshot", "apply", img, "by-qemu")
	testtool.Run(t, "qemu-img", "check", img)
	qemuIO("read -P 1 0 1M", "read -P 2 1M 2M", "read -P 0 3M 1M")
	testtool.Run(t, "qemu-img", "snapshot", "-a", "by-diskserve", img)
	testtool.Run(t, "qemu-img", "check", img)
	qemuIO("read -P 1 0 2M", "read -P 0 2M 2M")
	mustRun(t, "snapshot", "apply", img, "2") // by ID
	qemuIO("read -P 2 1M 2M")

	// Each deletes the other's; then the image checks clean with no
	// snapshot, and its data is the last applied.
	mustRun(t, "snapshot", "delete", img, "by-qemu")
	testtool.Run(t, "qemu-img", "check", img)
	testtool.Run(t, "qemu-img", "snapshot", "-d", "by-diskserve", img)
	testtool.Run(t, "qemu-img", "check", img)
	if out := mustRun(t, "snapshot", "list", "--output=json", img); strings.TrimSpace(out) != "[]" {
		t.Errorf("snapshots left: %s", out)
	}
	qemuIO("read -P 1 0 1M", "read -P 2 1M 2M")

	// Refusals name the image and the reason.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"snapshot", "apply", img, "gone"}, `no snapshot "gone": the image has no internal snapshots`},
		{[]string{"snapshot", "create", image(t, dir, "plain.raw", "1M"), "x"}, "the disk has no internal snapshots"},
	} {
		if _, stderr, code := run(t, nil, tc.args...); code == 0 || !strings.Contains(stderr, tc.want) || !strings.Contains(stderr, tc.args[2]) {
			t.Errorf("%q: exit %d, %s", tc.args, code, stderr)
		}
	}
}
