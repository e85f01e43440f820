package main

import (
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestKilledOutputsLeaveNothing kills convert, create, bundle save and
// bundle restore with SIGKILL at random moments, 20 times each: afterwards
// the directory holds what it held before and, if the command got that
// far, its whole output, which opens; never a partial output or a
// temporary file, but for one that was replacing a file left by an earlier
// kill (which the next run removes). A bundle is a directory, which cannot be made unnamed:
// a killed save may leave its temporary directory, which the next save to
// the same bundle removes, so that at most one is ever there and none
// after a save that was not killed.
func TestKilledOutputsLeaveNothing(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	rnd := rand.New(rand.NewPCG(21, 22))
	block := make([]byte, 1<<20)
	for off := int64(0); off < 48<<20; off += 2 << 20 {
		for i := range block {
			block[i] = byte(rnd.Uint32() % 7)
		}
		f.WriteAt(block, off)
	}
	f.Close()
	bundle := filepath.Join(dir, "kept.bundle")
	mustRun(t, "bundle", "save", src, bundle)

	for _, tc := range []struct {
		name    string
		out     string   // the output, in dir
		args    []string // the command, writing out
		check   []string // a command that must succeed on a whole output
		tempDir bool     // a killed run may leave one temporary directory
	}{
		{"convert", "out.qcow2", []string{"convert", "-c", "-O", "qcow2", src}, []string{"check"}, false},
		{"convert-composite", "out.cmp", []string{"convert", "-O", "composite", "-o", "components=3", src}, []string{"info"}, false},
		{"create", "new.qcow2", []string{"create", "-f", "qcow2", "-o", "cluster_size=512"}, []string{"check"}, false},
		{"bundle-save", "saved.bundle", []string{"bundle", "save", "-o", "compress", src}, []string{"bundle", "verify"}, true},
		{"bundle-restore", "restored.raw", []string{"bundle", "restore", bundle}, []string{"info"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := entries(t, dir)
			out := filepath.Join(dir, tc.out)
			args := append(slices.Clone(tc.args), out)
			if tc.name == "create" {
				args = append(args, "16G")
			}
			// A whole run, timed: the kills fall anywhere in as long.
			startAt := time.Now()
			mustRun(t, args...)
			full := time.Since(startAt)
			mustRun(t, append(slices.Clone(tc.check), out)...)
			removeOutput(t, dir, tc.out)
			whole := 0
			for i := range 20 {
				present := entries(t, dir)
				cmd := exec.Command(diskserveBin, args...)
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Duration(rnd.Int64N(int64(full))))
				cmd.Process.Kill()
				cmd.Wait()
				temps := 0
				for _, e := range entries(t, dir) {
					switch {
					case slices.Contains(before, e):
					case e == tc.out || strings.HasPrefix(e, tc.out+".") && !strings.Contains(e, ".diskserve-"):
					case tc.tempDir && strings.HasPrefix(e, "."+tc.out+".diskserve-") && temps == 0:
						temps++
					case replacing(e, present) && temps == 0:
						temps++
					default:
						t.Fatalf("kill %d: %s left %s", i, tc.name, e)
					}
				}
				if _, err := os.Stat(out); err == nil {
					whole++
					mustRun(t, append(slices.Clone(tc.check), out)...)
					removeOutput(t, dir, tc.out)
				}
			}
			if tc.tempDir { // a run that is not killed leaves nothing
				mustRun(t, args...)
				removeOutput(t, dir, tc.out)
				if now := entries(t, dir); !slices.Equal(now, before) {
					t.Errorf("after a whole run: %v, want %v", now, before)
				}
			}
			t.Logf("a whole run took %v; %d of 20 runs finished before the kill", full, whole)
			if whole == 20 {
				t.Errorf("every run finished before its kill: the test killed nothing")
			}
		})
	}
}

// replacing reports whether e is the temporary name (.NAME.diskserve-PID-N)
// of a file that replaces NAME, one of the names present before the run:
// the only moment a killed run may leave a temporary file is between
// linking a file under such a name and renaming it over NAME.
func replacing(e string, present []string) bool {
	name, _, ok := strings.Cut(strings.TrimPrefix(e, "."), ".diskserve-")
	return ok && strings.HasPrefix(e, ".") && slices.Contains(present, name)
}

// entries lists the names in dir.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// removeOutput removes the output name from dir, with the files beside it.
func removeOutput(t *testing.T, dir, name string) {
	t.Helper()
	for _, e := range entries(t, dir) {
		if e == name || strings.HasPrefix(e, name+".") {
			os.RemoveAll(filepath.Join(dir, e))
		}
	}
}
