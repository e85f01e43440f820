package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestAmendLikeQemuImg amends the same images, built twice, with qemu-img
// amend and diskserve amend: the same exit status, and where both
// succeed, qemu-img info agrees on everything but the file name and size,
// the images compare equal and pass qemu-img check.
func TestAmendLikeQemuImg(t *testing.T) {
	for _, c := range []struct {
		name   string
		create []string // qemu-img create options
		io     []string // qemu-io commands after the first write
		args   []string
		code   int
	}{
		{"lazy refcounts on", nil, nil, []string{"-o", "lazy_refcounts=on"}, 0},
		{"lazy refcounts off", []string{"-o", "lazy_refcounts=on"}, nil, []string{"-o", "lazy_refcounts=off"}, 0},
		{"grow", nil, nil, []string{"-o", "size=20M"}, 0},
		{"downgrade", nil, nil, []string{"-o", "compat=0.10"}, 0},
		{"downgrade with a backing file", []string{"-b", "base.qcow2", "-F", "qcow2"}, nil, []string{"-o", "compat=0.10"}, 0},
		{"downgrade with zero clusters", nil, []string{"write -z 3M 1M", "write -P 3 5M 64k", "write -z 5M 64k"}, []string{"-o", "compat=0.10"}, 0},
		{"downgrade with zero clusters over a backing file", []string{"-b", "base.qcow2", "-F", "qcow2"}, []string{"write -z 2M 1M", "write -P 3 5M 64k", "write -z 5M 64k"}, []string{"-o", "compat=0.10"}, 0},
		{"upgrade", []string{"-o", "compat=0.10"}, nil, []string{"-o", "compat=1.1"}, 0},
		{"upgrade with lazy refcounts", []string{"-o", "compat=0.10"}, nil, []string{"-o", "compat=1.1,lazy_refcounts=on"}, 0},
		{"64-bit refcounts", nil, nil, []string{"-o", "refcount_bits=64"}, 0},
		{"1-bit refcounts", nil, []string{"write -P 4 6M 3M"}, []string{"-o", "refcount_bits=1"}, 0},
		{"downgrade to 16-bit refcounts", []string{"-o", "refcount_bits=2"}, nil, []string{"-o", "compat=0.10,refcount_bits=16"}, 0},
		{"lazy refcounts on version 2", []string{"-o", "compat=0.10"}, nil, []string{"-o", "lazy_refcounts=on"}, 1},
		{"the cluster size", nil, nil, []string{"-o", "cluster_size=4k"}, 1},
		{"an unknown option", nil, nil, []string{"-o", "bogus=1"}, 1},
		{"no options", nil, nil, nil, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, p := range []string{"q-", "d-"} {
				in := func(n string) string { return filepath.Join(dir, p+n) }
				testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", in("base.qcow2"), "10M")
				testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 2 0 4M", in("base.qcow2"))
				args := []string{"create", "-q", "-f", "qcow2"}
				for _, a := range c.create {
					if a == "base.qcow2" {
						a = p + a
					}
					args = append(args, a)
				}
				testtool.Run(t, "qemu-img", append(args, in("img.qcow2"), "10M")...)
				ioArgs := []string{"-f", "qcow2", "-c", "write -P 1 1M 1M"}
				for _, cmd := range c.io {
					ioArgs = append(ioArgs, "-c", cmd)
				}
				testtool.Run(t, "qemu-io", append(ioArgs, in("img.qcow2"))...)
			}
			var codes [2]int
			for k, bin := range []string{"qemu-img", diskserveBin} {
				_, codes[k] = runTool(t, "", bin, append(append([]string{"amend"}, c.args...), filepath.Join(dir, []string{"q-", "d-"}[k]+"img.qcow2"))...)
			}
			if codes[0] != codes[1] || codes[1] != c.code {
				t.Fatalf("qemu-img exits %d, diskserve %d; want %d", codes[0], codes[1], c.code)
			}
			q, d := filepath.Join(dir, "q-img.qcow2"), filepath.Join(dir, "d-img.qcow2")
			if a, b := strings.ReplaceAll(infoLines(t, q), "q-", ""), strings.ReplaceAll(infoLines(t, d), "d-", ""); a != b {
				t.Fatalf("qemu-img info of qemu-img's:\n%s\nof diskserve's:\n%s", a, b)
			}
			testtool.Run(t, "qemu-img", "compare", q, d)
			testtool.QemuCheck(t, d)
		})
	}
}

// TestAmendDowngradesSnapshots: a downgrade expands the zero clusters of
// internal snapshots too, in L2 tables they share with the image, and
// every snapshot reads as before.
func TestAmendDowngradesSnapshots(t *testing.T) {
	img := filepath.Join(t.TempDir(), "snap.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "10M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", "-c", "write -z 1M 1M", img)
	testtool.Run(t, "qemu-img", "snapshot", "-c", "one", img)
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -z 3M 64k", "-c", "write -P 2 1M 64k", img)
	raw := func(args ...string) []byte {
		return testtool.QemuRaw(t, img, append([]string{"-f", "qcow2"}, args...)...)
	}
	now, one := raw(), raw("-l", "one")
	mustRun(t, "amend", "-o", "compat=0.10", img)
	if !strings.Contains(infoLines(t, img), "compat: 0.10") {
		t.Fatalf("not downgraded:\n%s", infoLines(t, img))
	}
	testtool.QemuCheck(t, img)
	if !bytes.Equal(raw(), now) || !bytes.Equal(raw("-l", "one"), one) {
		t.Fatal("the downgrade changed what the image or its snapshot reads")
	}
}

// TestAmendRefusesNarrowRefcounts: refcounts too wide for the new width
// (a snapshot's clusters count 2) are refused, as by qemu-img, and leave
// the image as it was.
func TestAmendRefusesNarrowRefcounts(t *testing.T) {
	img := filepath.Join(t.TempDir(), "snap.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "10M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", img)
	testtool.Run(t, "qemu-img", "snapshot", "-c", "one", img)
	before := infoLines(t, img)
	if _, errOut, code := run(t, nil, "amend", "-o", "refcount_bits=1", img); code != 1 || !strings.Contains(errOut, "references") {
		t.Fatalf("amend to 1-bit refcounts with a snapshot: exit %d: %s", code, errOut)
	}
	if after := infoLines(t, img); after != before {
		t.Fatalf("a refused amend changed the image:\n%s\nwas:\n%s", after, before)
	}
	testtool.QemuCheck(t, img)
}
