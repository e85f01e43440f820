package newimage

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
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
