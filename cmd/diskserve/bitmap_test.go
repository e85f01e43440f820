package main

import (
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/diskserve/diskserve/internal/testtool"
)

// bitmapFlags returns the flags qemu-img info lists for bitmap name.
func bitmapFlags(t *testing.T, img, name string) []string {
	t.Helper()
	flags, ok := testtool.BitmapFlags(t, img)[name]
	if !ok {
		t.Fatalf("qemu-img info lists no bitmap %q", name)
	}
	return flags
}

// qemuDirty returns the ranges qemu-nbd -B reads as dirty in bitmap name
// of img.
func qemuDirty(t *testing.T, img, name string) []testtool.Range {
	t.Helper()
	r, err := testtool.QemuDirtyRanges(t, img, name)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestServeDirtyBitmap is libvirt's incremental backup flow: qemu-img adds
// a bitmap; diskserve serves the image read-write with -B; qemu-io writes
// (across a granule boundary), zeroes and discards over NBD; nbdinfo reads
// exactly those clusters as dirty, before and (through qemu-nbd -B) after
// a SIGTERM; what qemu then writes and merges, diskserve reads. After a
// SIGKILL qemu takes the bitmap for inconsistent, and so does diskserve.
func TestServeDirtyBitmap(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "vm.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	testtool.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	sock, s := serveAt(t, dir, "-B", "b0", img)
	uri := "nbd+unix:///?socket=" + sock
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1114012 4096", "-c", "write -z 8M 128k", "-c", "discard 16M 64k", uri)
	r := func(start, end int64) testtool.Range { return testtool.Range{Start: start, End: end} }
	want := []testtool.Range{r(1<<20, 1<<20+128<<10), r(8<<20, 8<<20+128<<10), r(16<<20, 16<<20+64<<10)}
	if got := testtool.DirtyRanges(t, uri, "b0"); !slices.Equal(got, want) {
		t.Errorf("while served: dirty %v, want %v", got, want)
	}
	if code := s.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("serve exited %d:\n%s", code, s.stderr)
	}
	if flags := bitmapFlags(t, img, "b0"); !slices.Equal(flags, []string{"auto"}) {
		t.Errorf("after SIGTERM, qemu-img info lists flags %v, want [auto]", flags)
	}
	if got := qemuDirty(t, img, "b0"); !slices.Equal(got, want) {
		t.Errorf("qemu-nbd -B after SIGTERM: dirty %v, want %v", got, want)
	}

	// What qemu writes, and a bitmap it merges, diskserve reads as qemu
	// does.
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write 40M 4k", img)
	testtool.Run(t, "qemu-img", "bitmap", "--add", "--disable", img, "b1")
	testtool.Run(t, "qemu-img", "bitmap", "--merge", "b0", img, "b1")
	want = append(want, r(40<<20, 40<<20+64<<10))
	sock, s = serveAt(t, dir, "-r", "-B", "b0", "-B", "b1", img)
	for _, b := range []string{"b0", "b1"} {
		if got := testtool.DirtyRanges(t, "nbd+unix:///?socket="+sock, b); !slices.Equal(got, want) {
			t.Errorf("bitmap %s after qemu's write and merge: dirty %v, want %v", b, got, want)
		}
	}
	// qemu's own NBD client, as backup tools drive it (x-dirty-bitmap
	// selects base:allocation and the bitmap together), maps diskserve's
	// export as it maps qemu-nbd's.
	xmap := func(sock string) string {
		return string(testtool.Run(t, "qemu-img", "map", "--output=json", "--image-opts",
			"driver=nbd,server.type=unix,server.path="+sock+",x-dirty-bitmap=qemu:dirty-bitmap:b1"))
	}
	qsock := filepath.Join(dir, "qemu.sock")
	if out, err := exec.Command(testtool.Need(t, "qemu-nbd"), "--fork", "-r", "-f", "qcow2", "-B", "b1", "-k", qsock, img).CombinedOutput(); err != nil {
		t.Fatalf("qemu-nbd: %v\n%s", err, out)
	}
	if got, want := xmap(sock), xmap(qsock); got != want {
		t.Errorf("qemu-img map with x-dirty-bitmap of diskserve's export:\n%s\nof qemu-nbd's:\n%s", got, want)
	}
	s.stop(t, syscall.SIGTERM)

	sock, s = serveAt(t, dir, "-B", "b0", img)
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write 32M 4k", "nbd+unix:///?socket="+sock)
	s.stop(t, syscall.SIGKILL)
	if flags := bitmapFlags(t, img, "b0"); !slices.Contains(flags, "in-use") {
		t.Errorf("after SIGKILL, qemu-img info lists flags %v, want in-use", flags)
	}
	if _, _, code := run(t, nil, "serve", "-B", "b0", "--listen", "unix:"+sock, img); code == 0 {
		t.Errorf("serve -B of a bitmap left in use by a crash did not fail")
	}
}

// TestBitmapCommand edits bitmaps with diskserve bitmap and checks every
// step with qemu: qemu-img info lists them, qemu-nbd -B reads their bits,
// qemu-img check finds no error or leak, and qemu-img bitmap edits what
// diskserve made. The image has a backing file, whose name the first
// --add moves to make room for the bitmaps extension.
func TestBitmapCommand(t *testing.T) {
	dir := t.TempDir()
	base, img := filepath.Join(dir, "base.raw"), filepath.Join(dir, "vm.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", base, "64M")
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64M", base)
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img)
	check := func(step string) {
		t.Helper()
		if out, err := exec.Command(testtool.Need(t, "qemu-img"), "check", img).CombinedOutput(); err != nil {
			t.Fatalf("after %s, qemu-img check: %v\n%s", step, err, out)
		}
	}
	r := func(start, end int64) testtool.Range { return testtool.Range{Start: start, End: end} }

	mustRun(t, "bitmap", "--add", img, "b0")
	mustRun(t, "bitmap", "--add", "--disable", "-g", "4096", img, "b1")
	check("--add")
	if f := bitmapFlags(t, img, "b0"); !slices.Equal(f, []string{"auto"}) {
		t.Errorf("b0 flags %v, want [auto]", f)
	}
	if f := bitmapFlags(t, img, "b1"); len(f) != 0 {
		t.Errorf("b1 flags %v, want none", f)
	}
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 4k", img) // qemu records it in b0
	if got := qemuDirty(t, img, "b0"); !slices.Equal(got, []testtool.Range{r(1<<20, 1<<20+64<<10)}) {
		t.Errorf("b0 after qemu's write: %v", got)
	}
	mustRun(t, "bitmap", "--merge", "b0", img, "b1")
	check("--merge")
	if got := qemuDirty(t, img, "b1"); !slices.Equal(got, []testtool.Range{r(1<<20, 1<<20+64<<10)}) {
		t.Errorf("b1 after merging b0 into it: %v", got)
	}
	mustRun(t, "bitmap", "--clear", "--disable", img, "b0")
	mustRun(t, "bitmap", "--enable", img, "b1")
	check("--clear, --enable, --disable")
	if got := qemuDirty(t, img, "b0"); len(got) != 0 {
		t.Errorf("b0 after --clear: %v", got)
	}
	if f0, f1 := bitmapFlags(t, img, "b0"), bitmapFlags(t, img, "b1"); len(f0) != 0 || !slices.Equal(f1, []string{"auto"}) {
		t.Errorf("after --disable b0 and --enable b1: flags %v and %v", f0, f1)
	}
	testtool.Run(t, "qemu-img", "bitmap", "--remove", img, "b1") // qemu edits what diskserve made
	mustRun(t, "bitmap", "--remove", img, "b0")
	check("--remove")
	out := testtool.Run(t, "qemu-img", "info", "--output=json", img)
	if strings.Contains(string(out), `"bitmaps"`) || !strings.Contains(string(out), "base.raw") {
		t.Errorf("after removing both bitmaps, qemu-img info:\n%s", out)
	}
	if out := testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 4k", "-c", "read -P 0x11 2M 62M", img); strings.Contains(string(out), "verification failed") {
		t.Errorf("the image's content changed:\n%s", out)
	}
	if _, stderr, code := run(t, nil, "bitmap", "--remove", img, "b0"); code == 0 || !strings.Contains(stderr, "b0") {
		t.Errorf("removing a bitmap that is not there: exit %d, %s", code, stderr)
	}
}

// TestConvertBitmaps copies an image with two bitmaps, one qemu dirtied,
// with convert --bitmaps: qemu reads the copy's bitmaps as the original's.
func TestConvertBitmaps(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src.qcow2"), filepath.Join(dir, "dst.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", src, "32M")
	testtool.Run(t, "qemu-img", "bitmap", "--add", src, "b0")
	testtool.Run(t, "qemu-img", "bitmap", "--add", "--disable", "-g", "8192", src, "b1")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x33 3M 100k", src)
	mustRun(t, "convert", "--bitmaps", "-O", "qcow2", src, dst)
	testtool.Run(t, "qemu-img", "check", dst)
	if f0, f1 := bitmapFlags(t, dst, "b0"), bitmapFlags(t, dst, "b1"); !slices.Equal(f0, []string{"auto"}) || len(f1) != 0 {
		t.Errorf("the copy's bitmaps have flags %v and %v", f0, f1)
	}
	if got, want := qemuDirty(t, dst, "b0"), []testtool.Range{{Start: 3 << 20, End: 3<<20 + 128<<10}}; !slices.Equal(got, want) {
		t.Errorf("the copy's b0: dirty %v, want %v", got, want)
	}
	if _, stderr, code := run(t, nil, "convert", "--bitmaps", "-O", "raw", src, filepath.Join(dir, "out.raw")); code == 0 || !strings.Contains(stderr, "bitmaps") {
		t.Errorf("convert --bitmaps to raw: exit %d, %s", code, stderr)
	}
}

// TestServeAllocationDepth serves the top of a three-layer chain (raw base,
// qcow2 middle, qcow2 top, each written somewhere, the top zeroing some of
// the base) with -A, and reads qemu:allocation-depth as qemu-nbd -A
// reports it for the same image.
func TestServeAllocationDepth(t *testing.T) {
	dir := t.TempDir()
	base, mid, top := filepath.Join(dir, "base.raw"), filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "top.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", base, "24M")
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write 0 4M", base)
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid, "32M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write 2M 4M", "-c", "write 20M 8M", mid)
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top, "40M")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write 1M 64k", "-c", "write -z 3M 1M", "-c", "write 30M 4M", top)

	qsock := filepath.Join(dir, "q.sock")
	if out, err := exec.Command(testtool.Need(t, "qemu-nbd"), "--fork", "-r", "-f", "qcow2", "-A", "-k", qsock, top).CombinedOutput(); err != nil {
		t.Fatalf("qemu-nbd -A: %v\n%s", err, out)
	}
	want := testtool.ContextMap(t, "nbd+unix:///?socket="+qsock, "qemu:allocation-depth")
	sock, _ := serveAt(t, dir, "-r", "-A", top)
	got := testtool.ContextMap(t, "nbd+unix:///?socket="+sock, "qemu:allocation-depth")
	if !slices.Equal(got, want) {
		t.Errorf("qemu:allocation-depth:\n got %v\nwant %v (qemu-nbd -A)", got, want)
	}
	if len(want) < 5 {
		t.Errorf("qemu-nbd reports only %v: the chain is not layered as the test means", want)
	}
}
