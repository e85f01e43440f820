package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/testtool"
)

// syncBuffer is a bytes.Buffer safe to read while a process writes to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// server is a running `diskserve serve`.
type server struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	done   chan error
}

// startServe runs diskserve serve and waits until the log says it is
// listening. The process is killed when the test ends, if still up.
func startServe(t *testing.T, cmd *exec.Cmd) *server {
	t.Helper()
	return startDaemon(t, cmd, "msg=listening")
}

// startDaemon runs a long-lived diskserve command and waits until its log
// shows ready.
func startDaemon(t *testing.T, cmd *exec.Cmd, ready string) *server {
	t.Helper()
	s := &server{cmd: cmd, stderr: &syncBuffer{}, done: make(chan error, 1)}
	cmd.Stderr = s.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-s.done
	})
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(s.stderr.String(), ready); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not start:\n%s", strings.Join(cmd.Args, " "), s.stderr)
		}
	}
	return s
}

// stop sends sig and returns the exit code.
func (s *server) stop(t *testing.T, sig os.Signal) int {
	t.Helper()
	s.cmd.Process.Signal(sig)
	select {
	case err := <-s.done:
		s.done <- err // for the cleanup
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(20 * time.Second):
		t.Fatalf("diskserve serve did not exit after %v:\n%s", sig, s.stderr)
		return -1
	}
}

func image(t *testing.T, dir, name, size string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", path, size)
	return path
}

func TestServeSeveralExportsAndSIGTERM(t *testing.T) {
	dir := t.TempDir()
	a, b := image(t, dir, "a.img", "8M"), image(t, dir, "b.img", "16M")
	sock := filepath.Join(dir, "s.sock")
	s := startServe(t, exec.Command(diskserveBin, "serve", "--listen", "unix:"+sock, "first="+a, "second="+b))
	list := string(testtool.Run(t, "nbdinfo", "--list", "nbd+unix:///?socket="+sock))
	for _, want := range []string{`export="first"`, `export="second"`, "export-size: 8388608", "export-size: 16777216"} {
		if !strings.Contains(list, want) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", want, list)
		}
	}
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x42 1M 64k", "nbd+unix:///second?socket="+sock)
	if code := s.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("exit status %d after SIGTERM:\n%s", code, s.stderr)
	}
	data, _ := os.ReadFile(b)
	if !bytes.Equal(data[1<<20:1<<20+64<<10], bytes.Repeat([]byte{0x42}, 64<<10)) {
		t.Fatal("the write did not reach the second image")
	}
	if !strings.Contains(s.stderr.String(), "shutting down") {
		t.Errorf("no shutdown in the log:\n%s", s.stderr)
	}
}

func TestServeDefaultAndNamedExport(t *testing.T) {
	dir := t.TempDir()
	img := image(t, dir, "disk.img", "4M")
	sock := filepath.Join(dir, "s.sock")
	s := startServe(t, exec.Command(diskserveBin, "serve", "-r", "-x", "named", "--listen", "unix:"+sock, img))
	for _, export := range []string{"", "named"} {
		out := string(testtool.Run(t, "nbdinfo", "nbd+unix:///"+export+"?socket="+sock))
		if !strings.Contains(out, "is_read_only: true") || !strings.Contains(out, "export-size: 4194304") {
			t.Errorf("export %q:\n%s", export, out)
		}
	}
	if code := s.stop(t, os.Interrupt); code != 0 {
		t.Fatalf("exit status %d after SIGINT", code)
	}
}

// TestServeAIO serves a raw image through each I/O engine: qemu-io's
// writes land in the file and read back, and the log names the engine.
func TestServeAIO(t *testing.T) {
	for _, engine := range []string{"pool", "uring"} {
		t.Run(engine, func(t *testing.T) {
			dir := t.TempDir()
			img := image(t, dir, "disk.img", "8M")
			sock := filepath.Join(dir, "s.sock")
			s := startServe(t, exec.Command(diskserveBin, "serve", "--aio="+engine, "--listen", "unix:"+sock, img))
			uri := "nbd+unix:///?socket=" + sock
			testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x37 4k 256k", "-c", "write -z 64k 8k", "-c", "flush", uri)
			testtool.Run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x37 4k 60k", "-c", "read -P 0 64k 8k", "-c", "read -P 0x37 72k 188k", uri)
			if code := s.stop(t, syscall.SIGTERM); code != 0 {
				t.Fatalf("exit status %d:\n%s", code, s.stderr)
			}
			data, _ := os.ReadFile(img)
			want := bytes.Repeat([]byte{0x37}, 256<<10)
			clear(want[60<<10 : 68<<10])
			if !bytes.Equal(data[4<<10:260<<10], want) {
				t.Fatal("the writes did not reach the image")
			}
			if !strings.Contains(s.stderr.String(), "engine="+engine) {
				t.Errorf("the log does not name the %s engine:\n%s", engine, s.stderr)
			}
		})
	}
	if _, stderr, code := run(t, nil, "serve", "--aio=threads", image(t, t.TempDir(), "x.img", "1M")); code == 0 || !strings.Contains(stderr, `unknown I/O engine "threads"`) {
		t.Errorf("--aio=threads: exit %d, %s", code, stderr)
	}
}

// TestServeCacheModes serves a qcow2 overlay of a raw image in each cache
// mode and writes to it with qemu-io, unaligned too: the data lands,
// qemu-img check is clean, none and directsync open both files with
// O_DIRECT, and unsafe warns.
func TestServeCacheModes(t *testing.T) {
	for _, mode := range []string{"writeback", "none", "writethrough", "directsync", "unsafe"} {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			base := image(t, dir, "base.raw", "8M")
			img := filepath.Join(dir, "top.qcow2")
			testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img)
			sock := filepath.Join(dir, "s.sock")
			s := startServe(t, exec.Command(diskserveBin, "serve", "--cache="+mode, "--listen", "unix:"+sock, img))
			uri := "nbd+unix:///?socket=" + sock
			testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x37 4k 256k", "-c", "write -P 0x38 1000 3333", "-c", "write -z 64k 8k", "-c", "flush", uri)
			direct := map[string]bool{}
			fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid))
			for _, fd := range fds {
				target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", s.cmd.Process.Pid, fd.Name()))
				info, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", s.cmd.Process.Pid, fd.Name()))
				var flags int64
				for line := range strings.Lines(string(info)) {
					if v, ok := strings.CutPrefix(line, "flags:"); ok {
						flags, _ = strconv.ParseInt(strings.TrimSpace(v), 8, 64)
					}
				}
				if target == base || target == img {
					direct[target] = direct[target] || flags&syscall.O_DIRECT != 0
				}
			}
			wantDirect := mode == "none" || mode == "directsync"
			if len(direct) != 2 || direct[base] != wantDirect || direct[img] != wantDirect {
				t.Errorf("O_DIRECT on the image's files: %v, want %v on both", direct, wantDirect)
			}
			if code := s.stop(t, syscall.SIGTERM); code != 0 {
				t.Fatalf("exit status %d:\n%s", code, s.stderr)
			}
			if warned := strings.Contains(s.stderr.String(), "--cache=unsafe"); warned != (mode == "unsafe") {
				t.Errorf("warned of unsafe: %v; log:\n%s", warned, s.stderr)
			}
			testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0 0 1000", "-c", "read -P 0x38 1000 3333", "-c", "read -P 0x37 4333 61203", "-c", "read -P 0 64k 8k", "-c", "read -P 0x37 72k 188k", "-c", "read -P 0 260k 1M", img)
			testtool.Run(t, "qemu-img", "check", img)
		})
	}
	if _, stderr, code := run(t, nil, "serve", "--cache=directio", image(t, t.TempDir(), "x.img", "1M")); code == 0 || !strings.Contains(stderr, `unknown cache mode "directio"`) {
		t.Errorf("--cache=directio: exit %d, %s", code, stderr)
	}
}

// TestServeProbedRaw: a client cannot turn an image served without -f
// into a qcow2 by writing a header into its first sector; with -f raw it
// may.
func TestServeProbedRaw(t *testing.T) {
	for _, named := range []bool{false, true} {
		dir := t.TempDir()
		img := image(t, dir, "disk.img", "8M")
		sock := filepath.Join(dir, "s.sock")
		args := []string{"serve", "--listen", "unix:" + sock, img}
		if named {
			args = append([]string{"serve", "-f", "raw"}, args[1:]...)
		}
		s := startServe(t, exec.Command(diskserveBin, args...))
		header := filepath.Join(dir, "header.qcow2")
		testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", header, "1M")
		out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -s "+header+" 0 512", "nbd+unix:///?socket="+sock).CombinedOutput()
		if named && err != nil {
			t.Fatalf("with -f raw: %v\n%s", err, out)
		}
		s.stop(t, syscall.SIGTERM)
		data, _ := os.ReadFile(img)
		if got := string(data[:4]) == "QFI\xfb"; got != named {
			t.Errorf("-f raw given %v: the image starts %q", named, data[:4])
		}
		if !named && !strings.Contains(s.stderr.String(), "look like qcow2") {
			t.Errorf("the refusal is not logged:\n%s", s.stderr)
		}
	}
}

// TestServeConfine refuses an overlay whose backing file lies outside
// --confine, and serves one whose backing file lies inside.
func TestServeConfine(t *testing.T) {
	root := t.TempDir()
	jail := filepath.Join(root, "jail")
	os.Mkdir(jail, 0o755)
	image(t, root, "secret.img", "1M")
	image(t, jail, "base.img", "1M")
	bad, good := filepath.Join(jail, "bad.qcow2"), filepath.Join(jail, "good.qcow2")
	mustRun(t, "create", "-f", "qcow2", "-b", "../secret.img", "-F", "raw", bad, "1M")
	mustRun(t, "create", "-f", "qcow2", "-b", "base.img", "-F", "raw", good, "1M")
	_, stderr, code := run(t, nil, "serve", "--confine", jail, "--listen", "unix:"+filepath.Join(root, "s.sock"), bad)
	if code == 0 || !strings.Contains(stderr, "outside the confinement directory") {
		t.Fatalf("serve --confine of an overlay over ../secret.img: exit %d, %s", code, stderr)
	}
	sock := filepath.Join(root, "g.sock")
	s := startServe(t, exec.Command(diskserveBin, "serve", "-r", "--confine", jail, "--listen", "unix:"+sock, good))
	testtool.Run(t, "nbdinfo", "nbd+unix:///?socket="+sock)
	s.stop(t, syscall.SIGTERM)
}

func TestServeTCP(t *testing.T) {
	img := image(t, t.TempDir(), "disk.img", "1M")
	s := startServe(t, exec.Command(diskserveBin, "serve", "--listen", "127.0.0.1:0", img))
	m := regexp.MustCompile(`addr=tcp:(127\.0\.0\.1:\d+)`).FindStringSubmatch(s.stderr.String())
	if m == nil {
		t.Fatalf("no TCP address in the log:\n%s", s.stderr)
	}
	if out := string(testtool.Run(t, "nbdinfo", "nbd://"+m[1])); !strings.Contains(out, "export-size: 1048576") {
		t.Fatalf("nbdinfo over TCP:\n%s", out)
	}
}

// TestServeSocketActivation passes a listening socket the way systemd
// does: as descriptor 3, with LISTEN_PID and LISTEN_FDS set.
func TestServeSocketActivation(t *testing.T) {
	dir := t.TempDir()
	img := image(t, dir, "disk.img", "2M")
	sock := filepath.Join(dir, "activated.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ul := l.(*net.UnixListener)
	f, err := ul.File()
	if err != nil {
		t.Fatal(err)
	}
	ul.SetUnlinkOnClose(false) // the socket lives on in the server
	ul.Close()
	// LISTEN_PID must be the server's own pid: the shell's, kept by exec.
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve "$1"`, diskserveBin, img)
	cmd.ExtraFiles = []*os.File{f}
	startServe(t, cmd)
	f.Close()
	if out := string(testtool.Run(t, "nbdinfo", "nbd+unix:///?socket="+sock)); !strings.Contains(out, "export-size: 2097152") {
		t.Fatalf("nbdinfo over the activated socket:\n%s", out)
	}
}

func TestServeBadArguments(t *testing.T) {
	dir := t.TempDir()
	img := image(t, dir, "disk.img", "1M")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", filepath.Join(dir, "missing.img")}, "missing.img: no such file or directory"},
		{[]string{"serve", "--tls", "maybe", img}, "--tls must be require or allow"},
		{[]string{"serve", "--tls-key", "k.pem", img}, "need --tls-cert"},
		{[]string{"serve", "-x", "n", "a=" + img, "b=" + img}, "-x names the export of a single IMAGE"},
		{[]string{"serve", "--listen", "unix:" + filepath.Join(dir, "no", "such", "dir", "s"), img}, "no such file or directory"},
		{[]string{"serve"}, "requires at least 1 arg"},
	} {
		out, errOut, code := run(t, nil, tc.args...)
		if code != 1 || out != "" || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("diskserve %s: exit %d, stderr %q; want one line containing %q", strings.Join(tc.args, " "), code, errOut, tc.want)
		}
	}
}
