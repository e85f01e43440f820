package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestCreateComposite builds a GPT composite of a read-only raw partition
// whose size is not a multiple of 4 KiB, a read-write qcow2 and an EFI
// partition, exports it over NBD, and checks the disk with sgdisk and
// sfdisk and each partition's bytes against its source.
func TestCreateComposite(t *testing.T) {
	dir := t.TempDir()
	sys := filepath.Join(dir, "system.raw")
	sysData := bytes.Repeat([]byte("system "), 1000000/7+1)[:1000000]
	os.WriteFile(sys, sysData, 0o644)
	data := filepath.Join(dir, "data.qcow2")
	mustRun(t, "create", "-f", "qcow2", data, "4M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5d 0 1M", data)
	efi := filepath.Join(dir, "efi.raw")
	os.WriteFile(efi, bytes.Repeat([]byte{0xef}, 1<<20), 0o644)
	os.Mkdir(filepath.Join(dir, "out"), 0o755)
	img := filepath.Join(dir, "out", "disk.img")
	mustRun(t, "create", "-f", "composite",
		"--partition", "system="+sys,
		"--partition", "data="+data+":rw",
		"--partition", "boot="+efi+":type=efi", img)

	sock := filepath.Join(dir, "c.sock")
	srv := startServe(t, exec.Command(diskserveBin, "serve", "--listen", "unix:"+sock, img))
	whole := filepath.Join(dir, "whole.raw")
	testtool.Run(t, "nbdcopy", "nbd+unix:///?socket="+sock, whole)
	srv.stop(t, os.Interrupt)

	verify := string(testtool.Run(t, "sgdisk", "-v", whole))
	if !strings.Contains(verify, "No problems found") {
		t.Errorf("sgdisk -v:\n%s", verify)
	}
	dump := string(testtool.Run(t, "sfdisk", "--dump", whole))
	// system: 1000000 bytes from sector 40, rounded up to 4 KiB (248 sectors... 1961 sectors)
	for _, want := range []string{
		"label: gpt",
		"whole.raw1 : start=          40, size=        1960, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4",
		`name="system"`,
		"whole.raw2 : start=        2000, size=        8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4",
		`name="data"`,
		"whole.raw3 : start=       10192, size=        2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
		`name="boot"`,
	} {
		if !strings.Contains(dump, want) {
			t.Errorf("sfdisk --dump lacks %q:\n%s", want, dump)
		}
	}
	// sgdisk notes the gap between the entry array (ending at sector 33)
	// and the first usable sector, 40: crosvm's layout, kept for
	// compatibility. Any other warning, and any about the backup header,
	// is a failure.
	rest := strings.ReplaceAll(verify, "Warning: There is a gap between the main partition table", "")
	if strings.Contains(strings.ToLower(rest+dump), "warning") || strings.Contains(strings.ToLower(verify), "backup") {
		t.Errorf("warnings:\n%s\n%s", verify, dump)
	}
	b, _ := os.ReadFile(whole)
	if !bytes.Equal(b[40*512:40*512+1000000], sysData) {
		t.Error("the system partition's bytes differ from its source")
	}
	if !bytes.Equal(b[2000*512:2000*512+1<<20], bytes.Repeat([]byte{0x5d}, 1<<20)) {
		t.Error("the data partition's bytes differ from its source")
	}
	if !bytes.Equal(b[10192*512:10192*512+1<<20], bytes.Repeat([]byte{0xef}, 1<<20)) {
		t.Error("the EFI partition's bytes differ from its source")
	}
	// Component names are relative to the composite.
	spec, _ := os.ReadFile(img)
	if !bytes.Contains(spec, []byte("../system.raw")) || bytes.Contains(spec, []byte(dir)) {
		t.Errorf("component paths are not relative to the composite: %q", spec)
	}
	// Mounted at a directory, the partitions appear beside the disk.
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	m, _ := mount(t, img, mnt)
	p1, _ := os.ReadFile(filepath.Join(mnt, "disk-p1"))
	p3, _ := os.ReadFile(filepath.Join(mnt, "disk-p3"))
	if !bytes.Equal(p1[:1000000], sysData) || len(p1) != 1960*512 || !bytes.Equal(p3, bytes.Repeat([]byte{0xef}, 1<<20)) {
		t.Errorf("partition files: disk-p1 %d bytes, disk-p3 %d bytes, content equal %v %v", len(p1), len(p3), bytes.Equal(p1[:1000000], sysData), bytes.Equal(p3, bytes.Repeat([]byte{0xef}, 1<<20)))
	}
	f, err := os.OpenFile(filepath.Join(mnt, "disk-p2"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("THROUGHTHEPARTITIONFILE123"), 4096); err != nil {
		t.Fatal(err)
	}
	f.Sync()
	f.Close()
	if f, err := os.OpenFile(filepath.Join(mnt, "disk-p1"), os.O_WRONLY, 0); err == nil {
		if _, err := f.WriteAt([]byte("x"), 0); !errors.Is(err, syscall.EROFS) {
			t.Errorf("write to the read-only partition: %v, want EROFS", err)
		}
		f.Close()
	}
	unmount(t, m)
	if out := testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0x5d 0 4096", "-c", "read -v 4096 26", data); !bytes.Contains(out, []byte("THROUGHTHEPARTIT")) {
		t.Errorf("the write through disk-p2 is not in data.qcow2:\n%s", out)
	}
	testtool.Run(t, "qemu-img", "check", data)

	if _, errOut, code := run(t, nil, "create", "-f", "composite", "--partition", "a="+efi, "--partition", "a="+sys, filepath.Join(dir, "dup.img")); code != 1 || !strings.Contains(errOut, `two partitions are labelled "a"`) {
		t.Errorf("duplicate labels: exit %d, %q", code, errOut)
	}
}
