package newimage

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRemoveStale leaves in a directory what runs killed on a file system
// without unnamed files would leave (temporary files and directories of a
// dead process, for the destination and for files beside it), with those
// of a live process and of another destination: starting an output for
// the destination removes exactly the first.
func TestRemoveStale(t *testing.T) {
	dir := t.TempDir()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	gone, live := strconv.Itoa(dead.Process.Pid), strconv.Itoa(os.Getppid())
	for _, name := range []string{
		".disk.img.diskserve-" + gone + "-0", ".disk.img.0.diskserve-" + gone + "-1", ".disk.img.diskserve-" + gone,
		".disk.img.diskserve-" + live + "-0", ".other.img.diskserve-" + gone + "-0", "disk.img.0",
	} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	newOutput(filepath.Join(dir, "disk.img"))
	var left []string
	es, _ := os.ReadDir(dir)
	for _, e := range es {
		left = append(left, e.Name())
	}
	want := []string{".disk.img.diskserve-" + live + "-0", ".other.img.diskserve-" + gone + "-0", "disk.img.0"}
	slices.Sort(want)
	if !slices.Equal(left, want) {
		t.Errorf("left %v, want %v", left, want)
	}
}

// TestKeepsDevices refuses to write a new image over something that is
// not a regular file (here a pipe; /dev/null alike), which the rename of
// the finished image would replace.
func TestKeepsDevices(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "pipe")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := newOutput(fifo); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("an output over a pipe: %v", err)
	}
	if st, err := os.Lstat(fifo); err != nil || st.Mode().Type() != os.ModeNamedPipe {
		t.Fatalf("the pipe is now %v (%v)", st.Mode(), err)
	}
}
