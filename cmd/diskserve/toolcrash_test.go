package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestToolsSurviveKill kills rebase, commit and resize with SIGKILL at
// random moments of their run, and requires the image left as before or
// as after: reading the same (rebase, commit) or the same up to the
// smaller size (resize), at the old or the new size and backing file,
// with no corruption qemu-img check can find (leaked clusters allowed).
func TestToolsSurviveKill(t *testing.T) {
	testtool.Need(t, "qemu-io")
	for _, op := range []struct {
		name  string
		setup func(t *testing.T, dir string)
		args  []string
		// checked after each kill, given what the top image read before
		check func(t *testing.T, dir string, before []byte)
	}{
		{
			name: "rebase",
			setup: func(t *testing.T, dir string) {
				qemuImgIn(t, dir, "create", "-q", "-f", "qcow2", "base.qcow2", "64M")
				qemuIOIn(t, dir, "base.qcow2", "write -P 1 0 64M")
				qemuImgIn(t, dir, "create", "-q", "-f", "qcow2", "other.qcow2", "64M")
				qemuIOIn(t, dir, "other.qcow2", "write -P 2 0 64M")
				qemuImgIn(t, dir, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
				qemuIOIn(t, dir, "top.qcow2", "write -P 3 1M 1M")
			},
			args: []string{"rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"},
			check: func(t *testing.T, dir string, before []byte) {
				sameContent(t, dir, "top.qcow2", before)
				noCorruption(t, filepath.Join(dir, "top.qcow2"))
				if b := backingFile(t, filepath.Join(dir, "top.qcow2")); b != "base.qcow2" && b != "other.qcow2" {
					t.Fatalf("the backing file is %q", b)
				}
			},
		},
		{
			name: "commit",
			setup: func(t *testing.T, dir string) {
				qemuImgIn(t, dir, "create", "-q", "-f", "qcow2", "base.qcow2", "64M")
				qemuIOIn(t, dir, "base.qcow2", "write -P 1 0 32M")
				qemuImgIn(t, dir, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
				qemuIOIn(t, dir, "top.qcow2", "write -P 3 16M 48M", "write -z 40M 1M")
			},
			args: []string{"commit", "top.qcow2"},
			check: func(t *testing.T, dir string, before []byte) {
				sameContent(t, dir, "top.qcow2", before)
				noCorruption(t, filepath.Join(dir, "top.qcow2"))
				noCorruption(t, filepath.Join(dir, "base.qcow2"))
			},
		},
		{
			name: "resize",
			setup: func(t *testing.T, dir string) {
				qemuImgIn(t, dir, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "top.qcow2", "256M")
				qemuIOIn(t, dir, "top.qcow2", "write -P 1 0 256M")
			},
			args: []string{"resize", "--shrink", "top.qcow2", "1M"},
			check: func(t *testing.T, dir string, before []byte) {
				img := filepath.Join(dir, "top.qcow2")
				noCorruption(t, img)
				got := testtool.QemuRaw(t, img, "-f", "qcow2")
				if len(got) != len(before) && len(got) != 1<<20 || !bytes.Equal(got, before[:len(got)]) {
					t.Fatalf("after the kill the image reads %d bytes, not the first %d or all %d it read before", len(got), 1<<20, len(before))
				}
			},
		},
	} {
		t.Run(op.name, func(t *testing.T) {
			rnd := rand.New(rand.NewPCG(5, uint64(len(op.name))))
			// One run to the end, to learn how long one takes.
			dir := t.TempDir()
			op.setup(t, dir)
			before := testtool.QemuRaw(t, filepath.Join(dir, "top.qcow2"), "-f", "qcow2")
			start := time.Now()
			cmd := exec.Command(diskserveBin, op.args...)
			cmd.Dir = dir
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%v: %v\n%s", op.args, err, out)
			}
			took := time.Since(start)
			op.check(t, dir, before)

			const rounds = 8
			interrupted := 0
			for round := range rounds {
				dir := t.TempDir()
				op.setup(t, dir)
				cmd := exec.Command(diskserveBin, op.args...)
				cmd.Dir = dir
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Duration(rnd.Int64N(int64(took))))
				cmd.Process.Signal(syscall.SIGKILL)
				if err := cmd.Wait(); err != nil && strings.Contains(err.Error(), "killed") {
					interrupted++
				}
				t.Run(fmt.Sprint(round), func(t *testing.T) { op.check(t, dir, before) })
			}
			// A test that never cut a run short would prove nothing.
			if interrupted < rounds/4 {
				t.Fatalf("only %d of %d runs were cut short (one run takes %v)", interrupted, rounds, took)
			}
			t.Logf("%d of %d runs cut short; one run takes %v", interrupted, rounds, took)
		})
	}
}

func qemuImgIn(t *testing.T, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command(testtool.Need(t, "qemu-img"), args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
}

func qemuIOIn(t *testing.T, dir, img string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	testtool.Run(t, "qemu-io", append(args, filepath.Join(dir, img))...)
}

// sameContent requires img to read as before.
func sameContent(t *testing.T, dir, img string, before []byte) {
	t.Helper()
	if got := testtool.QemuRaw(t, filepath.Join(dir, img), "-f", "qcow2"); !bytes.Equal(got, before) {
		t.Fatalf("%s reads differently after the kill", img)
	}
}

// noCorruption requires qemu-img check to find no corruption in img;
// leaked clusters are allowed.
func noCorruption(t *testing.T, img string) {
	t.Helper()
	out, _ := exec.Command("qemu-img", "check", "--output=json", img).Output()
	var res struct{ Corruptions, CheckErrors int }
	if err := json.Unmarshal(out, &res); err != nil || res.Corruptions != 0 || res.CheckErrors != 0 {
		human, _ := exec.Command("qemu-img", "check", img).CombinedOutput()
		t.Fatalf("qemu-img check %s after the kill (%v):\n%s", img, err, human)
	}
}

// backingFile returns the backing file qemu-img info gives img.
func backingFile(t *testing.T, img string) string {
	var info struct {
		BackingFilename string `json:"backing-filename"`
	}
	if err := json.Unmarshal(testtool.Run(t, "qemu-img", "info", "--output=json", img), &info); err != nil {
		t.Fatal(err)
	}
	return info.BackingFilename
}
