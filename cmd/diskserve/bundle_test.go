package main

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/bundle"
	"github.com/diskserve/diskserve/internal/testtool"
)

// TestBundles saves a qcow2 chain, a compressed copy and a raw
// image (as a hard link), verifies and restores each byte for byte, and
// catches damage: a changed guest byte, a changed manifest field, a size
// that does not match, an existing target.
func TestBundles(t *testing.T) {
	dir := t.TempDir()
	src := convertSource(t, dir) // an overlay over a compressed qcow2
	ref := filepath.Join(dir, "ref.raw")
	testtool.Run(t, "qemu-img", "convert", "-O", "raw", src, ref)
	want, _ := os.ReadFile(ref)

	for _, tc := range []struct {
		name, image, how string
		args             []string
	}{
		{"qcow2", src, "qcow2", nil},
		{"compressed", src, "qcow2-compressed", []string{"-o", "compress"}},
		{"raw", ref, "hardlink", []string{"-f", "raw"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := filepath.Join(t.TempDir(), "bundle")
			mustRun(t, append(append([]string{"bundle", "save"}, tc.args...), tc.image, b)...)
			m, err := bundle.Read(b)
			if err != nil {
				t.Fatal(err)
			}
			if m.Data.How != tc.how || m.Source.VirtualSize != int64(len(want)) {
				t.Fatalf("manifest %+v", m)
			}
			if tc.how == "hardlink" {
				a, _ := os.Stat(ref)
				l, _ := os.Stat(filepath.Join(b, m.Data.File))
				if !os.SameFile(a, l) {
					t.Fatal("the raw image was copied, not linked")
				}
			}
			if tc.name == "qcow2" && (len(m.Source.Chain) != 2 || m.Source.Chain[1].Format != "qcow2") {
				t.Errorf("chain %+v", m.Source.Chain)
			}
			mustRun(t, "bundle", "verify", b)
			out := filepath.Join(t.TempDir(), "restored.img")
			mustRun(t, "bundle", "restore", "-O", "raw", "--expect-size", "30001K", b, out)
			if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
				t.Fatal("the restored image differs from the source")
			}
			if _, stderr, code := run(t, nil, "bundle", "restore", b, out); code == 0 || !strings.Contains(stderr, "exists") {
				t.Errorf("restore over an existing image: exit %d, %s", code, stderr)
			}
			mustRun(t, "bundle", "restore", "--force", b, out)
			if _, stderr, code := run(t, nil, "bundle", "restore", "--expect-size", "1G", b, filepath.Join(t.TempDir(), "x")); code == 0 || !strings.Contains(stderr, "--expect-size says 1073741824") {
				t.Errorf("restore with the wrong --expect-size: exit %d, %s", code, stderr)
			}
		})
	}

	t.Run("damage", func(t *testing.T) {
		b := filepath.Join(t.TempDir(), "bundle")
		mustRun(t, "bundle", "save", src, b)
		// A guest byte in the fifth chunk changes.
		testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x99 17000000 1", filepath.Join(b, "disk.qcow2"))
		for _, args := range [][]string{{"bundle", "verify", b}, {"bundle", "restore", b, filepath.Join(t.TempDir(), "x")}} {
			if _, stderr, code := run(t, nil, args...); code == 0 || !strings.Contains(stderr, "chunk 4 (bytes 16777216 to 20971520) does not match") {
				t.Errorf("%s of a damaged bundle: exit %d, %s", args[1], code, stderr)
			}
		}
		// Manifest fields, each changed in turn.
		raw, _ := os.ReadFile(filepath.Join(b, bundle.ManifestName))
		for _, tc := range []struct{ from, to, want string }{
			{`"manifest_version": 1`, `"manifest_version": 2`, "manifest_version is 2"},
			{`"chunk_size": 4194304`, `"chunk_size": 2`, "chunk_size is 2"},
			{`"format": "qcow2",` + "\n" + `    "how"`, `"format": "vmdk",` + "\n" + `    "how"`, `data.format is "vmdk"`},
		} {
			bad := strings.Replace(string(raw), tc.from, tc.to, 1)
			if bad == string(raw) {
				t.Fatalf("%s is not in the manifest:\n%s", tc.from, raw)
			}
			os.WriteFile(filepath.Join(b, bundle.ManifestName), []byte(bad), 0o644)
			if _, stderr, code := run(t, nil, "bundle", "verify", b); code == 0 || !strings.Contains(stderr, tc.want) {
				t.Errorf("manifest with %s: exit %d, %s", tc.to, code, stderr)
			}
		}
		var m map[string]any
		json.Unmarshal(raw, &m)
		m["source"].(map[string]any)["virtual_size"] = 12345
		bad, _ := json.Marshal(m)
		os.WriteFile(filepath.Join(b, bundle.ManifestName), bad, 0o644)
		if _, stderr, code := run(t, nil, "bundle", "restore", b, filepath.Join(t.TempDir(), "x")); code == 0 || !strings.Contains(stderr, "chunk digests for 12345 bytes") {
			t.Errorf("manifest with another size: exit %d, %s", code, stderr)
		}
	})

	t.Run("killed", func(t *testing.T) {
		big := filepath.Join(t.TempDir(), "big.raw")
		data := make([]byte, 256<<20)
		rand.NewChaCha8([32]byte{3}).Read(data)
		os.WriteFile(big, data, 0o644)
		parent := t.TempDir()
		b := filepath.Join(parent, "bundle")
		cmd := exec.Command(diskserveBin, "bundle", "save", "-o", "compress", big, b)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		if cmd.ProcessState.Exited() {
			t.Fatal("the save finished before the kill: the test proves nothing")
		}
		if _, err := os.Stat(b); err == nil {
			t.Fatal("a save killed midway left its bundle directory")
		}
		// And a save interrupted by SIGINT removes its temporary directory.
		cmd = exec.Command(diskserveBin, "bundle", "save", "-o", "compress", big, b)
		cmd.Start()
		time.Sleep(300 * time.Millisecond)
		cmd.Process.Signal(syscall.SIGINT)
		cmd.Wait()
		if cmd.ProcessState.ExitCode() == 0 {
			t.Fatal("the save finished before SIGINT: the test proves nothing")
		}
		entries, _ := os.ReadDir(parent)
		for _, e := range entries {
			if strings.HasSuffix(e.Name(), "-"+strconv.Itoa(cmd.Process.Pid)) || e.Name() == "bundle" {
				t.Errorf("an interrupted save left %s", e.Name())
			}
		}
	})
}
