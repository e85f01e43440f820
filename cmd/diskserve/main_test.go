package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
	"go.uber.org/goleak"
)

// diskserveBin is the diskserve command built for these tests, in a directory
// that any user can read, so that it can also run unprivileged.
var diskserveBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "diskserve-cli")
	if err != nil {
		panic(err)
	}
	os.Chmod(dir, 0o755)
	diskserveBin = filepath.Join(dir, "diskserve")
	if out, err := exec.Command("go", "build", "-o", diskserveBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		// No goroutine of an in-process test may outlive it.
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// run runs diskserve and returns its output and exit code.
func run(t *testing.T, cred *syscall.Credential, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(diskserveBin, args...)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run diskserve: %v", err)
	}
	return o.String(), e.String(), code
}

// mustRun runs diskserve and fails the test unless it succeeds.
func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code := run(t, nil, args...)
	if code != 0 {
		t.Fatalf("diskserve %s: exit %d\n%s", strings.Join(args, " "), code, errOut)
	}
	return out
}

func TestInfoMatchesQemuImg(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []string{"0", "512", "1000000", "1023488", "1047552", "10M", "1G", "3T"} {
		t.Run(size, func(t *testing.T) {
			img := filepath.Join(dir, size+".img")
			testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", img, size)
			if size == "10M" {
				testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 7 1M 300k", img)
			}
			var want, got map[string]any
			if err := json.Unmarshal(testtool.Run(t, "qemu-img", "info", "--output=json", img), &want); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal([]byte(mustRun(t, "info", "--output=json", img)), &got); err != nil {
				t.Fatal(err)
			}
			for _, key := range []string{"virtual-size", "format", "actual-size", "filename", "dirty-flag"} {
				if fmt.Sprint(got[key]) != fmt.Sprint(want[key]) {
					t.Errorf("%s: diskserve says %v, qemu-img says %v", key, got[key], want[key])
				}
			}
			for _, output := range []string{"json", "human"} {
				if q, d := string(testtool.Run(t, "qemu-img", "info", "--output="+output, img)), mustRun(t, "info", "--output="+output, img); q != d {
					t.Errorf("--output=%s: diskserve prints\n%s\nqemu-img prints\n%s", output, d, q)
				}
			}
		})
	}
}

// TestInfoMatchesQemuImgOnQcow2: qemu-img info and diskserve info print
// the same bytes, JSON and human, for qcow2 images of both versions, one
// with an internal snapshot and a persistent bitmap, and an overlay with
// and without --backing-chain: the same keys in the same (QDict) order,
// the same sizes and snapshot table.
func TestInfoMatchesQemuImgOnQcow2(t *testing.T) {
	dir := t.TempDir()
	base, v2, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "v2.qcow2"), filepath.Join(dir, "top&<1>.qcow2") // JSON escapes: none but qemu's
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "1G")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 7 1M 300k", base)
	testtool.Run(t, "qemu-img", "snapshot", "-c", "first", base)
	testtool.Run(t, "qemu-img", "bitmap", "--add", base, "b0")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "10M")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	for _, args := range [][]string{{base}, {v2}, {top}, {"--backing-chain", top}} {
		for _, output := range []string{"json", "human"} {
			a := append([]string{"info", "--output=" + output}, args...)
			if q, d := string(testtool.Run(t, "qemu-img", a...)), mustRun(t, a...); q != d {
				t.Errorf("%v: diskserve prints\n%s\nqemu-img prints\n%s", a, d, q)
			}
		}
	}
	q, d := string(testtool.Run(t, "qemu-img", "snapshot", "-l", base)), mustRun(t, "snapshot", "list", base)
	if q != d {
		t.Errorf("snapshot list: diskserve prints\n%s\nqemu-img prints\n%s", d, q)
	}
}

// TestInfoMatchesQemuImgOnVMDK: for VMDK disks of one file and of a
// descriptor with extent files, diskserve's info agrees with qemu-img's
// on the size on disk (the extents counted) and on each extent's name.
func TestInfoMatchesQemuImgOnVMDK(t *testing.T) {
	dir := t.TempDir()
	for _, sub := range []string{"monolithicSparse", "monolithicFlat", "twoGbMaxExtentFlat", "streamOptimized"} {
		t.Run(sub, func(t *testing.T) {
			img := filepath.Join(dir, sub+".vmdk")
			testtool.Run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sub, img, "3G")
			if sub != "streamOptimized" { // written whole, by convert only
				testtool.Run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 7 1M 300k", img)
			}
			type info struct {
				ActualSize int64 `json:"actual-size"`
				Specific   struct {
					Data struct {
						Extents []struct{ Filename string }
					}
				} `json:"format-specific"`
			}
			var want, got info
			if err := json.Unmarshal(testtool.Run(t, "qemu-img", "info", "--output=json", img), &want); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal([]byte(mustRun(t, "info", "--output=json", img)), &got); err != nil {
				t.Fatal(err)
			}
			if got.ActualSize != want.ActualSize || fmt.Sprint(got.Specific) != fmt.Sprint(want.Specific) {
				t.Errorf("diskserve says %+v, qemu-img says %+v", got, want)
			}
			// Whole outputs, but for the adapter type, which diskserve
			// adds (see info --help).
			withoutAdapter := func(s string) string {
				lines := strings.Split(s, "\n")
				return strings.Join(slices.DeleteFunc(lines, func(l string) bool { return strings.Contains(l, "adapter") }), "\n")
			}
			for _, output := range []string{"json", "human"} {
				q, d := string(testtool.Run(t, "qemu-img", "info", "--output="+output, img)), mustRun(t, "info", "--output="+output, img)
				if withoutAdapter(q) != withoutAdapter(d) {
					t.Errorf("--output=%s: diskserve prints\n%s\nqemu-img prints\n%s", output, d, q)
				}
			}
		})
	}
}

func TestMapMatchesQemuImg(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "sparse.img")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", img, "64M")
	testtool.Run(t, "qemu-io", "-f", "raw",
		"-c", "write -P 1 0 512",
		"-c", "write -P 2 1M 64k",
		"-c", "write -P 3 5000 3000",
		"-c", "write -P 4 32M 4M",
		"-c", "write -P 5 63M 1M", img)
	want := testtool.DataRanges(t, testtool.Run(t, "qemu-img", "map", "-f", "raw", "--output=json", img))
	if len(want) < 4 {
		t.Fatalf("qemu-img found only %v: the image is not sparse enough to test anything", want)
	}
	likeQemuImg(t, dir, "map", "-f", "raw", "--output=json", "sparse.img")
	likeQemuImg(t, dir, "map", "-f", "raw", "sparse.img")
	image(t, dir, "empty.img", "0")
	likeQemuImg(t, dir, "map", "-f", "raw", "--output=json", "empty.img")
	likeQemuImg(t, dir, "map", "-f", "raw", "empty.img")
}

func TestMapTilesTheDisk(t *testing.T) {
	img := filepath.Join(t.TempDir(), "a.img")
	if err := os.WriteFile(img, bytes.Repeat([]byte{1}, 100000), 0o644); err != nil {
		t.Fatal(err)
	}
	out := mustRun(t, "map", "--output=json", img)
	if strings.TrimSpace(out) != `[{ "start": 0, "length": 100000, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0}]` {
		t.Fatalf("map of a full file: %s", out)
	}
	if human := mustRun(t, "map", img); !strings.Contains(human, "0x186a0") {
		t.Fatalf("human map does not show the length: %s", human)
	}
}

// TestBadInput checks that bad input gives one clear line naming the file,
// exit status 1, and no Go panic.
func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	unreadable := filepath.Join(dir, "unreadable.img")
	os.WriteFile(unreadable, make([]byte, 4096), 0o000)
	truncated := filepath.Join(dir, "truncated.qcow2")
	os.WriteFile(truncated, []byte("QFI\xfb\x00\x00"), 0o644)
	var nobody *syscall.Credential
	if os.Geteuid() == 0 { // root reads anything: drop to nobody
		nobody = &syscall.Credential{Uid: 65534, Gid: 65534}
	}
	for _, tc := range []struct {
		name string
		cred *syscall.Credential
		args []string
		want string
	}{
		{"missing file", nil, []string{"info", filepath.Join(dir, "missing.img")}, "missing.img: no such file or directory"},
		{"directory", nil, []string{"info", dir}, dir + ": is a directory"},
		{"unreadable file", nobody, []string{"info", unreadable}, unreadable + ": permission denied"},
		{"truncated header", nil, []string{"info", truncated}, truncated + ": qcow2: "},
		{"map of missing file", nil, []string{"map", filepath.Join(dir, "missing.img")}, "no such file or directory"},
		{"unknown format", nil, []string{"info", "-f", "qed", truncated}, `unknown disk format "qed"`},
		{"bad output", nil, []string{"info", "--output=xml", truncated}, "--output must be human or json"},
		{"no image", nil, []string{"info"}, "info takes one image"},
		{"unknown flag", nil, []string{"map", "--frobnicate", truncated}, "unknown flag: --frobnicate"},
		{"unknown command", nil, []string{"frobnicate"}, `unknown command "frobnicate"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, code := run(t, tc.cred, tc.args...)
			if code != 1 {
				t.Errorf("exit status %d, want 1", code)
			}
			if out != "" {
				t.Errorf("wrote to stdout: %q", out)
			}
			if strings.Count(errOut, "\n") != 1 || !strings.HasPrefix(errOut, "diskserve: ") || !strings.Contains(errOut, tc.want) {
				t.Errorf("stderr = %q, want one line containing %q", errOut, tc.want)
			}
		})
	}
}

func TestHelpAndVersion(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"info", "--help"}, {"map", "--help"}} {
		if out := mustRun(t, args...); !strings.Contains(out, "Usage:") {
			t.Errorf("diskserve %s: no usage in %q", strings.Join(args, " "), out)
		}
	}
	if out := mustRun(t, "--version"); !strings.Contains(out, version) {
		t.Errorf("--version printed %q", out)
	}
}

// TestHumanSize: sizes as qemu-img 7.2's info printed them (its
// "virtual size" of raw images of these sizes).
func TestHumanSize(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 512: "512 B", 1024: "1 KiB", 69632: "68 KiB", 1079296: "1.03 MiB", 10 << 20: "10 MiB",
		3 << 29: "1.5 GiB", 1100585369600: "1 TiB", 1022976: "999 KiB", 1047552: "0.999 MiB", 1023488: "1e+03 KiB", 1048064: "1 MiB"} {
		if got := humanSize(n); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", n, got, want)
		}
	}
}
