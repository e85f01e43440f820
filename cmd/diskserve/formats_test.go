package main

import (
	"bytes"
	"encoding/json"
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

// TestMapFormatsLikeQemuImg: map prints what qemu-img map prints of an
// image of each subformat that qemu-img converted from a raw file with
// data, zeroes and holes: byte for byte, or for dynamic VHDs the same
// records and host offsets with zeroes found inside stored blocks where
// the image file has holes (qemu does not look). qemu's VHDX driver
// reports every byte as data without offsets; diskserve reports the
// block table, so VHDX is left out.
func TestMapFormatsLikeQemuImg(t *testing.T) {
	dir := t.TempDir()
	src := image(t, dir, "src.raw", "40M")
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 3M", "-c", "write -P 2 5M 64k", "-c", "write -P 3 9M 2M",
		"-c", "write -P 4 20M 100k", "-c", "write -P 5 39M 1M", src)
	for _, tc := range []struct{ format, opts string }{
		{"vdi", ""}, {"vdi", "static=on"},
		{"vpc", ""}, {"vpc", "subformat=fixed,force_size=on"},
		{"vmdk", ""}, {"vmdk", "subformat=streamOptimized"}, {"vmdk", "subformat=monolithicFlat"}, {"vmdk", "subformat=twoGbMaxExtentSparse"},
	} {
		t.Run(tc.format+" "+tc.opts, func(t *testing.T) {
			out := tc.format + strings.NewReplacer("=", "-", ",", "-").Replace(tc.opts) + ".img"
			args := []string{"convert", "-O", tc.format}
			if tc.opts != "" {
				args = append(args, "-o", tc.opts)
			}
			testtool.Run(t, "qemu-img", append(args, src, filepath.Join(dir, out))...)
			if tc.format == "vpc" && tc.opts == "" {
				theirs := mapRecords(t, testtool.Run(t, "qemu-img", "map", "-f", "vpc", "--output=json", filepath.Join(dir, out)))
				ours := mapRecords(t, []byte(mustRun(t, "map", "-f", "vpc", "--output=json", filepath.Join(dir, out))))
				sameBlockMaps(t, theirs, ours)
				return
			}
			likeQemuImg(t, dir, "map", "-f", tc.format, "--output=json", out)
			if !strings.Contains(tc.opts, "streamOptimized") { // compressed: qemu-img stops
				likeQemuImg(t, dir, "map", "-f", tc.format, out)
			}
		})
	}
}

// A mapRec is a record of map's JSON output.
type mapRec struct {
	Start, Length       int64
	Depth               int
	Present, Zero, Data bool
	Offset              *int64
}

func mapRecords(t *testing.T, out []byte) []mapRec {
	t.Helper()
	var recs []mapRec
	if err := json.Unmarshal(out, &recs); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	return recs
}

// sameBlockMaps checks that ours says of every byte what theirs says,
// host offset included, but that ours may find zeroes in data.
func sameBlockMaps(t *testing.T, theirs, ours []mapRec) {
	t.Helper()
	i := 0
	for _, r := range ours {
		for pos := r.Start; pos < r.Start+r.Length; {
			for i < len(theirs) && theirs[i].Start+theirs[i].Length <= pos {
				i++
			}
			if i == len(theirs) {
				t.Fatalf("diskserve maps %+v past qemu's records", r)
			}
			q := theirs[i]
			atOffset := func(m mapRec, p int64) int64 {
				if m.Offset == nil {
					return -1
				}
				return *m.Offset + p - m.Start
			}
			zeroOK := r.Zero == q.Zero || r.Zero && r.Data
			if r.Depth != q.Depth || r.Present != q.Present || r.Data != q.Data || !zeroOK || atOffset(r, pos) != atOffset(q, pos) {
				t.Fatalf("at %d diskserve maps %+v, qemu-img %+v", pos, r, q)
			}
			pos = min(r.Start+r.Length, q.Start+q.Length)
		}
	}
}
