// Command membench measures the peak resident memory of `diskserve serve`
// under 16 parallel readers of the worst image of each format: the images
// whose frames, clusters, chunks or components are the largest or the most
// numerous diskserve accepts, read at random with fio's nbd engine.
//
//	go run ./bench/membench [-runtime 10s] [-only NAME]
//
// It prints a table of peak resident memory (VmHWM) per image.
package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/diskserve/diskserve/bench/internal/fio"
)

// An image is one worst case: how it is made from a 1 GiB raw image of
// compressible data, and what makes it the worst.
type image struct {
	name, why string
	make      func(bin, dir, raw string) string // returns the image's path
}

func main() {
	runtime := flag.Duration("runtime", 10*time.Second, "time each image is read")
	only := flag.String("only", "", "measure only the images whose name contains this")
	flag.Parse()
	log.SetFlags(0)
	dir, bin := fio.Setup("membench")
	defer os.RemoveAll(dir)
	raw := filepath.Join(dir, "data.raw")
	fio.WriteText(raw, 1<<30, [][2]int64{{0, 1 << 30}})

	convert := func(bin, out string, args ...string) string {
		run(bin, append(append([]string{"convert"}, args...), raw, out)...)
		return out
	}
	images := []image{
		{"raw", "the baseline: no format state", func(bin, dir, raw string) string { return raw }},
		{"qcow2, compressed, 2 MiB clusters", "the largest clusters, each read decompresses one", func(bin, dir, raw string) string {
			return convert(bin, filepath.Join(dir, "c2m.qcow2"), "-c", "-O", "qcow2", "-o", "cluster_size=2M")
		}},
		{"qcow2, 1 TiB sparse, a cluster in every L2 table", "2048 L2 tables to cache", func(bin, dir, raw string) string {
			img := filepath.Join(dir, "huge.qcow2")
			run("qemu-img", "create", "-q", "-f", "qcow2", img, "1T")
			args := []string{"-f", "qcow2"}
			for off := int64(0); off < 1<<40; off += 512 << 20 {
				args = append(args, "-c", fmt.Sprintf("write -q %d 4k", off))
			}
			run("qemu-io", append(args, img)...)
			return img
		}},
		{"seekable zstd, 32 MiB frames", "the largest frames accepted, each read decompresses one", func(bin, dir, raw string) string {
			return convert(bin, filepath.Join(dir, "f32m.zst"), "-O", "zstd", "-o", "frame_size=32M,level=1")
		}},
		{"Android sparse, 4 Mi chunks of 4 bytes", "the most chunks an image may have: the largest index", func(bin, dir, raw string) string {
			// Every other 4-byte word is zero and the others differ: a
			// FILL chunk and a DONT_CARE chunk for every 8 bytes.
			alt := filepath.Join(dir, "alternating.raw")
			b := make([]byte, 16<<20)
			for i := 0; i < len(b); i += 8 {
				binary.LittleEndian.PutUint32(b[i:], uint32(i/8+1))
			}
			if err := os.WriteFile(alt, b, 0o644); err != nil {
				log.Fatal(err)
			}
			out := filepath.Join(dir, "b4.simg")
			run(bin, "convert", "-O", "android-sparse", "-o", "block_size=4", alt, out)
			return out
		}},
		{"composite of 1024 raw components", "one open file and disk per component", func(bin, dir, raw string) string {
			return convert(bin, filepath.Join(dir, "many.cmp"), "-O", "composite", "-o", "components=1024")
		}},
	}
	fmt.Printf("| image (16 readers, 4k random, %v) | why it is the worst | peak resident memory |\n|---|---|---|\n", *runtime)
	for _, im := range images {
		if !strings.Contains(im.name, *only) {
			continue
		}
		path := im.make(bin, dir, raw)
		fmt.Printf("| %s | %s | %s |\n", im.name, im.why, peak(bin, dir, path, *runtime))
	}
}

// peak serves image read-only, reads it with 16 parallel fio jobs for
// runtime and returns the server's VmHWM.
func peak(bin, dir, image string, runtime time.Duration) string {
	sock := filepath.Join(dir, "nbd.sock")
	os.Remove(sock)
	cmd := exec.Command(bin, "serve", "-r", "--listen", "unix:"+sock, image)
	uri, stop := fio.StartNBD("diskserve serve "+image, cmd, sock)
	defer stop()
	job := fio.Job{Name: "16 readers", Args: []string{"--rw=randread", "--bs=4k", "--iodepth=1", "--numjobs=16"}, Unit: "IOPS"}
	size := int64(1 << 30)
	if out, err := exec.Command("nbdinfo", "--size", uri).Output(); err == nil {
		fmt.Sscan(string(out), &size)
	}
	fio.Run(job, []string{"--ioengine=nbd", "--uri=" + uri}, runtime, size)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		log.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

// run runs a command and ends the program if it fails.
func run(name string, args ...string) {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		log.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}
