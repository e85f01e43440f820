package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/internal/testtool"
)

// convertSource makes a qcow2 overlay over a compressed qcow2, with data,
// zero clusters, uniform blocks and a size that is not a multiple of 4096.
func convertSource(t *testing.T, dir string) string {
	t.Helper()
	base := filepath.Join(dir, "base.raw")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "raw", base, "24M")
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 8M 1M", base)
	comp := filepath.Join(dir, "comp.qcow2")
	testtool.Run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", base, comp)
	top := filepath.Join(dir, "top.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "comp.qcow2", "-F", "qcow2", top, "30001K")
	testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 100k", "-c", "write -z 8M 64k", "-c", "write -P 0x44 29M 1000", top)
	return top
}

func TestConvert(t *testing.T) {
	dir := t.TempDir()
	src := convertSource(t, dir)
	ref := filepath.Join(dir, "ref.raw")
	testtool.Run(t, "qemu-img", "convert", "-O", "raw", src, ref)
	want, _ := os.ReadFile(ref)

	t.Run("raw", func(t *testing.T) {
		out := filepath.Join(dir, "out.raw")
		mustRun(t, "convert", "-O", "raw", src, out)
		got, _ := os.ReadFile(out)
		if !bytes.Equal(got, want) {
			t.Fatal("raw output differs from qemu-img's conversion")
		}
		if b := blocks(t, out); b*512 > 8<<20 {
			t.Errorf("raw output allocates %d KiB: zero ranges were written", b/2)
		}
	})
	t.Run("qcow2", func(t *testing.T) {
		out := filepath.Join(dir, "out.qcow2")
		mustRun(t, "convert", "-O", "qcow2", "-o", "cluster_size=4096", src, out)
		testtool.Run(t, "qemu-img", "check", out)
		testtool.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", ref, out)
	})
	for _, o := range []string{"compression_type=zlib", "compression_type=zstd,cluster_size=4096", "cluster_size=2M"} {
		t.Run("qcow2-compressed/"+o, func(t *testing.T) {
			out := filepath.Join(dir, "out-c.qcow2")
			mustRun(t, "convert", "-c", "-O", "qcow2", "-o", o, src, out)
			testtool.Run(t, "qemu-img", "check", out)
			testtool.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", ref, out)
			theirs := filepath.Join(dir, "qemu-c.qcow2")
			testtool.Run(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", o, src, theirs)
			// diskserve writes metadata clusters whole, qemu-img only their
			// used part: allow one cluster for that.
			var info struct {
				ClusterSize int64 `json:"cluster-size"`
			}
			json.Unmarshal(testtool.Run(t, "qemu-img", "info", "--output=json", out), &info)
			if a, b := blocks(t, out)*512, blocks(t, theirs)*512; a > b+b/10+info.ClusterSize {
				t.Errorf("our compressed image allocates %d KiB, qemu-img's %d KiB", a>>10, b>>10)
			}
			// And back: diskserve reads its own compressed clusters.
			back := filepath.Join(dir, "back.raw")
			mustRun(t, "convert", "-O", "raw", out, back)
			if got, _ := os.ReadFile(back); !bytes.Equal(got, want) {
				t.Fatal("the compressed image converts back to different bytes")
			}
		})
	}
	for _, bs := range []string{"1024", "4096", "65536"} {
		t.Run("android-sparse/"+bs, func(t *testing.T) {
			out := filepath.Join(dir, "out-"+bs+".simg")
			mustRun(t, "convert", "-O", "android-sparse", "-o", "block_size="+bs, src, out)
			back := filepath.Join(dir, "back-"+bs+".raw")
			testtool.Run(t, "simg2img", out, back)
			got, _ := os.ReadFile(back)
			padded := append(bytes.Clone(want), make([]byte, (len(want)+mustAtoi(bs)-1)/mustAtoi(bs)*mustAtoi(bs)-len(want))...)
			if !bytes.Equal(got, padded) {
				t.Fatalf("simg2img expands %d bytes, want %d (the source padded to a block)", len(got), len(padded))
			}
			theirs := filepath.Join(dir, "img2simg-"+bs+".simg")
			testtool.Run(t, "img2simg", ref, theirs, bs)
			if a, b := size(t, out), size(t, theirs); a > b {
				t.Errorf("our sparse image is %d bytes, img2simg's %d", a, b)
			}
		})
	}
}

// TestConvertZstd writes a seekable zstd image that the zstd tool
// decompresses to the source, and that diskserve serves over NBD.
func TestConvertZstd(t *testing.T) {
	dir := t.TempDir()
	src := convertSource(t, dir)
	ref := filepath.Join(dir, "ref.raw")
	testtool.Run(t, "qemu-img", "convert", "-O", "raw", src, ref)
	want, _ := os.ReadFile(ref)
	out := filepath.Join(dir, "out.zst")
	mustRun(t, "convert", "-O", "zstd", "-o", "frame_size=64K,level=5,checksum=on", src, out)
	if got := testtool.Run(t, "zstd", "-d", "-c", "-q", out); !bytes.Equal(got, want) {
		t.Fatalf("zstd -d gives %d bytes that differ from the source's %d", len(got), len(want))
	}
	if out, _, code := run(t, nil, "check", out); code != 0 {
		t.Fatalf("check of the zstd image: exit %d\n%s", code, out)
	}
	sock := filepath.Join(dir, "z.sock")
	startServe(t, exec.Command(diskserveBin, "serve", "-r", "--listen", "unix:"+sock, out))
	testtool.Run(t, "qemu-img", "compare", "-f", "raw", ref, "nbd+unix:///?socket="+sock)
	if _, errOut, code := run(t, nil, "convert", "-O", "zstd", "-o", "level=99", src, filepath.Join(dir, "x.zst")); code != 1 || !strings.Contains(errOut, "level 99") {
		t.Errorf("bad level: exit %d, %q", code, errOut)
	}
}

func mustAtoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}

func size(t *testing.T, path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func blocks(t *testing.T, path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks
}

// TestConvertInterrupted interrupts a conversion: DST must not exist, and
// no temporary file may be left.
func TestConvertInterrupted(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "big.raw")
	f, _ := os.Create(src)
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < 768<<20; off += 1 << 20 {
		f.WriteAt(data, off)
	}
	f.Close()
	out := filepath.Join(dir, "out.qcow2")
	cmd := exec.Command(diskserveBin, "convert", "-O", "qcow2", src, out)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	cmd.Process.Signal(syscall.SIGINT)
	err := cmd.Wait()
	if err == nil {
		t.Skip("the conversion finished before it could be interrupted")
	}
	if !strings.Contains(stderr.String(), "convert interrupted") || !strings.Contains(stderr.String(), "was not written") {
		t.Errorf("stderr: %q", stderr.String())
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.Name() != "big.raw" {
			t.Errorf("left behind: %s", e.Name())
		}
	}
}

func TestConvertErrors(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "in.raw")
	mustRun(t, "create", "-f", "raw", src, "1M")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"convert", "-O", "qed", src, filepath.Join(dir, "x")}, `unknown disk format "qed"`},
		{[]string{"convert", "-c", "-O", "raw", src, filepath.Join(dir, "x")}, "raw images cannot store data compressed"},
		{[]string{"convert", "-O", "android-sparse", "-o", "block_size=1022", src, filepath.Join(dir, "x")}, "block size 1022"},
		{[]string{"convert", "-O", "raw", filepath.Join(dir, "missing"), filepath.Join(dir, "x")}, "no such file"},
		{[]string{"convert", "-O", "raw", "-o", "a=b", src, filepath.Join(dir, "x")}, "unknown raw option"},
	} {
		if _, errOut, code := run(t, nil, tc.args...); code != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("diskserve %s: exit %d, %q; want %q", strings.Join(tc.args, " "), code, errOut, tc.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "x")); err == nil {
		t.Error("a failed conversion left its output")
	}
	// No progress bar when standard error is not a terminal.
	if out, errOut, code := run(t, nil, "convert", "-p", "-O", "raw", src, filepath.Join(dir, "y")); code != 0 || out != "" || errOut != "" {
		t.Errorf("convert -p without a terminal: exit %d, %q %q", code, out, errOut)
	}
}

// TestConvertRoundTrips converts between every pair of formats convert
// writes, A to B and back to A, and requires the bytes of the source and
// outputs that stay sparse.
func TestConvertRoundTrips(t *testing.T) {
	dir := t.TempDir()
	src := convertSource(t, dir)
	ref := filepath.Join(dir, "ref.raw")
	// A size that is a whole number of Android sparse blocks.
	testtool.Run(t, "qemu-img", "convert", "-O", "raw", src, ref)
	testtool.Run(t, "qemu-img", "resize", "-q", "-f", "raw", "--shrink", ref, "30000K")
	want, _ := os.ReadFile(ref)
	formats := []string{"raw", "qcow2", "qcow2-compressed", "android-sparse", "zstd", "vdi", "vpc", "vhdx", "vmdk", "vmdk-stream"}
	args := func(f string) []string {
		switch f {
		case "qcow2-compressed":
			return []string{"-c", "-O", "qcow2"}
		case "vpc":
			return []string{"-O", "vpc", "-o", "force_size=on"} // the size as it is, not rounded to a geometry
		case "vmdk-stream":
			return []string{"-O", "vmdk", "-o", "subformat=streamOptimized"}
		}
		return []string{"-O", f}
	}
	// Data in the source: 4 MiB and a few KiB; every output must
	// allocate less than twice that, or it wrote zeroes.
	const dataBound = 10 << 20
	first := map[string]string{}
	for _, a := range formats {
		first[a] = filepath.Join(dir, "a."+a)
		mustRun(t, append(append([]string{"convert"}, args(a)...), ref, first[a])...)
	}
	for _, a := range formats {
		for _, b := range formats {
			if a == b {
				continue
			}
			t.Run(a+"/"+b, func(t *testing.T) {
				mid, back := filepath.Join(t.TempDir(), "b."+b), filepath.Join(t.TempDir(), "back."+a)
				mustRun(t, append(append([]string{"convert"}, args(b)...), first[a], mid)...)
				mustRun(t, append(append([]string{"convert"}, args(a)...), mid, back)...)
				for _, p := range []string{mid, back} {
					if n := blocks(t, p) * 512; n > dataBound {
						t.Errorf("%s allocates %d bytes for about 4 MiB of data", filepath.Base(p), n)
					}
				}
				raw := filepath.Join(t.TempDir(), "back.raw")
				mustRun(t, "convert", "-O", "raw", back, raw)
				if got, _ := os.ReadFile(raw); !bytes.Equal(got, want) {
					t.Fatalf("%s to %s and back: %d bytes that differ from the source's %d", a, b, len(got), len(want))
				}
			})
		}
	}
}
