package testtool

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// BitmapFlags returns the flags of each persistent dirty bitmap of the
// qcow2 image img, by name, as qemu-img info lists them.
func BitmapFlags(t testing.TB, img string) map[string][]string {
	t.Helper()
	out := Run(t, "qemu-img", "info", "-U", "--output=json", img)
	var info struct {
		Specific struct {
			Data struct {
				Bitmaps []struct {
					Name  string
					Flags []string
				}
			}
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	m := map[string][]string{}
	for _, b := range info.Specific.Data.Bitmaps {
		m[b.Name] = b.Flags
	}
	return m
}

// DirtyRanges returns the ranges nbdinfo --map reads as dirty in the
// qemu:dirty-bitmap context of bitmap name of the export at uri.
func DirtyRanges(t testing.TB, uri, name string) []Range {
	t.Helper()
	var dirty []Range
	for _, e := range ContextMap(t, uri, "qemu:dirty-bitmap:"+name) {
		if e.Value == 1 {
			dirty = append(dirty, Range{e.Start, e.End})
		}
	}
	return dirty
}

// QemuDirtyRanges returns the ranges qemu reads as dirty in bitmap name of
// the qcow2 image img (qemu-nbd -B, read by nbdinfo --map), or the error
// qemu-nbd gives, as for a bitmap left inconsistent.
func QemuDirtyRanges(t testing.TB, img, name string) ([]Range, error) {
	t.Helper()
	Need(t, "nbdinfo")
	sock := filepath.Join(t.TempDir(), "qemu-nbd.sock")
	// --fork returns once the socket listens; the server exits after its
	// one client.
	out, err := exec.Command(Need(t, "qemu-nbd"), "--fork", "-r", "-f", "qcow2", "-B", name, "-k", sock, img).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("qemu-nbd -B %s: %v: %s", name, err, out)
	}
	return DirtyRanges(t, "nbd+unix:///?socket="+sock, name), nil
}

// A MapEntry is one extent of an NBD metadata context: a range and its
// value.
type MapEntry struct{ Start, End, Value int64 }

// ContextMap returns what nbdinfo --map reads of metadata context ctx of
// the export at uri, neighbours with the same value merged.
func ContextMap(t testing.TB, uri, ctx string) []MapEntry {
	t.Helper()
	out := Run(t, "nbdinfo", "--map="+ctx, uri)
	var m []MapEntry
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("nbdinfo --map line %q", line)
		}
		off, _ := strconv.ParseInt(f[0], 10, 64)
		n, _ := strconv.ParseInt(f[1], 10, 64)
		v, _ := strconv.ParseInt(f[2], 10, 64)
		if k := len(m); k > 0 && m[k-1].End == off && m[k-1].Value == v {
			m[k-1].End += n
			continue
		}
		m = append(m, MapEntry{off, off + n, v})
	}
	return m
}
