package main

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestConfineUntrustedVMDK: a VMDK descriptor from an untrusted source
// that names a host file as its extent is refused by info, check, map and
// convert under --confine (the Glance CVE-2024-32498 class), while the
// same commands read a well-formed disk in the directory.
func TestConfineUntrustedVMDK(t *testing.T) {
	dir := t.TempDir()
	evil := filepath.Join(dir, "evil.vmdk")
	desc := "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/passwd\" 0\n"
	if err := os.WriteFile(evil, []byte(desc), 0o644); err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(dir, "good.vmdk")
	mustRun(t, "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", good, "1M")
	for _, args := range [][]string{
		{"info", "--confine", dir},
		{"check", "--confine", dir},
		{"map", "--confine", dir},
		{"convert", "--confine", dir, "-O", "raw"},
	} {
		a := append(append([]string{}, args...), evil)
		if args[0] == "convert" {
			a = append(a, filepath.Join(dir, "out.raw"))
		}
		_, stderr, code := run(t, nil, a...)
		if code == 0 || !strings.Contains(stderr, "outside the confinement directory") {
			t.Errorf("%v: exit %d, %q", a, code, stderr)
		}
		a = append(append([]string{}, args...), good)
		if args[0] == "convert" {
			a = append(a, filepath.Join(dir, "out.raw"))
		}
		mustRun(t, a...)
	}
}

// TestServeFormatsOverNBD serves a disk of each writable subformat of
// the hypervisor formats and runs a random workload of writes, zero
// writes and discards through qemu-io over NBD; the same workload on a raw
// file is the model. After SIGTERM, qemu-img reads the model's bytes from
// the disk and, where it checks the format, finds it clean.
func TestServeFormatsOverNBD(t *testing.T) {
	const size = 24 << 20
	rnd := rand.New(rand.NewPCG(3, 4))
	var ops []string
	for i := range 120 {
		off := rnd.Int64N(size - 1)
		n := min(1+rnd.Int64N(300<<10), size-off)
		switch rnd.IntN(4) {
		case 0, 1:
			ops = append(ops, "-c", fmt.Sprintf("write -P %d %d %d", 1+i%250, off, n))
		case 2:
			ops = append(ops, "-c", fmt.Sprintf("write -z %d %d", off&^511, n&^511|512))
		default:
			ops = append(ops, "-c", fmt.Sprintf("discard %d %d", off&^511, n&^511|512))
		}
	}
	dir := t.TempDir()
	model := image(t, dir, "model.raw", fmt.Sprint(size))
	testtool.Run(t, "qemu-io", append(append([]string{"-f", "raw"}, ops...), model)...)
	want, err := os.ReadFile(model)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		format, opts string
		checks       bool
	}{
		{"vdi", "", true}, {"vdi", "static=on", true},
		{"vpc", "force_size=on", false}, {"vpc", "subformat=fixed,force_size=on", false},
		{"vhdx", "block_size=1M", true}, {"vhdx", "subformat=fixed", true},
		{"vmdk", "", true}, {"vmdk", "subformat=monolithicFlat", true}, {"vmdk", "subformat=twoGbMaxExtentSparse", true},
	} {
		t.Run(tc.format+" "+tc.opts, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "disk."+tc.format)
			args := []string{"create", "-f", tc.format}
			if tc.opts != "" {
				args = append(args, "-o", tc.opts)
			}
			mustRun(t, append(args, img, fmt.Sprint(size))...)
			sock := filepath.Join(t.TempDir(), "s")
			s := startServe(t, exec.Command(diskserveBin, "serve", "--listen", "unix:"+sock, img))
			testtool.Run(t, "qemu-io", append(append([]string{"-f", "raw"}, ops...), "nbd+unix:///?socket="+sock)...)
			if code := s.stop(t, syscall.SIGTERM); code != 0 {
				t.Fatalf("exit %d:\n%s", code, s.stderr)
			}
			if tc.checks {
				testtool.QemuCheck(t, img)
			}
			if got := testtool.QemuRaw(t, img, "-f", tc.format); !bytes.Equal(got, want) {
				t.Fatalf("qemu-img reads %d bytes that differ from the model's %d", len(got), len(want))
			}
		})
	}
}
