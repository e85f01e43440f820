package main

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/diskserve/diskserve/bench/internal/fio"
)

// guestJobs are guestio's arguments for each job run inside the guest.
var guestJobs = []struct{ name, args string }{
	{"4k random read QD16", "-job randread -bs 4096 -qd 16"},
	{"4k random read QD1", "-job randread -bs 4096 -qd 1"},
	{"4k random write QD16", "-job randwrite -bs 4096 -qd 16"},
	{"1M sequential read QD4", "-job read -bs 1048576 -qd 4"},
}

// guest measures the jobs inside a TCG guest on each way to attach img.
func guest(dir, bin, img string, runtime time.Duration, rounds int) {
	kernelDir := os.Getenv("DISKSERVE_GUEST_DIR")
	if kernelDir == "" {
		home, _ := os.UserHomeDir()
		kernelDir = filepath.Join(home, ".cache", "diskserve", "guest")
	}
	if _, err := os.Stat(filepath.Join(kernelDir, "vmlinuz")); err != nil {
		log.Fatalf("no guest kernel in %s: run testdata/guest/fetch-kernel.sh", kernelDir)
	}
	initrd := guestInitrd(dir, kernelDir, runtime)
	sock := filepath.Join(dir, "guest.sock")
	vhost := []string{"-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
		"-chardev", "socket,id=c0,path=" + sock, "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"}
	configs := []struct {
		name   string
		server []string
		disk   []string
	}{
		{"diskserve vhost-user-blk", []string{bin, "serve", "--vhost-user-blk", sock, "--queues", "1", img}, vhost},
		{"diskserve NBD", []string{bin, "serve", "--listen", "unix:" + sock, img},
			[]string{"-drive", "file=nbd+unix:///?socket=" + sock + ",format=raw,if=virtio"}},
		{"qemu-storage-daemon vhost-user-blk", []string{"qemu-storage-daemon",
			"--blockdev", "driver=file,node-name=f,filename=" + img, "--blockdev", "driver=raw,node-name=r,file=f",
			"--export", "type=vhost-user-blk,id=e,node-name=r,addr.type=unix,addr.path=" + sock + ",writable=on,num-queues=1"}, vhost},
	}
	results := map[string]map[string][]float64{}
	for round := range rounds {
		order := slices.Clone(configs)
		if round%2 == 1 {
			slices.Reverse(order)
		}
		for _, c := range order {
			fio.Warm(img)
			os.Remove(sock)
			srv := exec.Command(c.server[0], c.server[1:]...)
			var stderr bytes.Buffer
			srv.Stderr = &stderr
			if err := srv.Start(); err != nil {
				log.Fatal(err)
			}
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if _, err := os.Stat(sock); err == nil {
					break
				}
				if time.Now().After(deadline) {
					log.Fatalf("%s did not start: %s", c.name, stderr.String())
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			args := append([]string{"-accel", "tcg", "-m", "512", "-smp", "1", "-nographic", "-no-reboot",
				"-kernel", filepath.Join(kernelDir, "vmlinuz"), "-initrd", initrd,
				"-append", "console=ttyS0 quiet panic=-1"}, c.disk...)
			out, err := exec.CommandContext(ctx, "qemu-system-x86_64", args...).CombinedOutput()
			cancel()
			srv.Process.Signal(os.Interrupt)
			srv.Wait()
			if err != nil || bytes.Contains(out, []byte("GUESTIO-ERROR")) {
				log.Fatalf("%s: guest: %v\n%s\n%s", c.name, err, out, stderr.String())
			}
			for _, j := range guestJobs {
				rate := parseGuestIO(string(out), j.args)
				if rate < 0 {
					log.Fatalf("%s: no result for %s:\n%s", c.name, j.name, out)
				}
				log.Printf("round %d %-36s %-24s %8.0f", round+1, c.name, j.name, rate)
				if results[j.name] == nil {
					results[j.name] = map[string][]float64{}
				}
				results[j.name][c.name] = append(results[j.name][c.name], rate)
			}
		}
	}
	fmt.Println("| job, inside the guest | diskserve vhost-user-blk | diskserve NBD | qemu-storage-daemon vhost-user-blk | vs NBD | vs qsd |")
	fmt.Println("|---|---|---|---|---|---|")
	for _, j := range guestJobs {
		r := results[j.name]
		v, n, q := fio.Median(r["diskserve vhost-user-blk"]), fio.Median(r["diskserve NBD"]), fio.Median(r["qemu-storage-daemon vhost-user-blk"])
		fmt.Printf("| %s | %.0f | %.0f | %.0f | %.2f | %.2f |\n", j.name, v, n, q, v/n, v/q)
	}
	fmt.Printf("\nIOPS (MiB/s for 1M), O_DIRECT on the guest's /dev/vda, %v per job, TCG, one vCPU, one queue; medians of %d rounds.\n", runtime, rounds)
}

// guestInitrd builds the guest's initramfs: busybox, the virtio modules,
// guestio and an init that runs the jobs and powers off.
func guestInitrd(dir, kernelDir string, runtime time.Duration) string {
	root := filepath.Join(dir, "root")
	for _, d := range []string{"bin", "proc", "sys", "dev", "modules"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	build := exec.Command("go", "build", "-o", filepath.Join(root, "guestio"), "./bench/vhostbench/guestio")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := build.CombinedOutput(); err != nil {
		log.Fatalf("build guestio: %v\n%s", err, out)
	}
	var init strings.Builder
	init.WriteString(`#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
	insmod /modules/$m.ko
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
`)
	for _, j := range guestJobs {
		fmt.Fprintf(&init, "/guestio -dev /dev/vda %s -t %s\n", j.args, runtime)
	}
	init.WriteString("poweroff -f\n")
	if err := os.WriteFile(filepath.Join(root, "init"), []byte(init.String()), 0o755); err != nil {
		log.Fatal(err)
	}
	out := filepath.Join(dir, "initrd.gz")
	script := `cp /bin/busybox "$0/bin/busybox" && cp "$1"/modules/*.ko "$0/modules/" && cd "$0" && find . | cpio -o -H newc --quiet | gzip > "$2"`
	if b, err := exec.Command("sh", "-c", script, root, kernelDir, out).CombinedOutput(); err != nil {
		log.Fatalf("initramfs: %v\n%s", err, b)
	}
	return out
}

// parseGuestIO returns the rate of the job with args from the console:
// requests per second.
func parseGuestIO(console, args string) float64 {
	f := strings.Fields(args)
	key := fmt.Sprintf("%s-%s-qd%s", f[1], f[3], f[5])
	for _, line := range strings.Split(console, "\n") {
		if i := strings.Index(line, "GUESTIO "); i > 0 {
			line = line[i:] // after the firmware's escape sequences
		}
		fields := strings.Fields(line)
		if len(fields) == 4 && fields[0] == "GUESTIO" && fields[1] == key {
			n, _ := strconv.ParseFloat(fields[2], 64)
			secs, _ := strconv.ParseFloat(fields[3], 64)
			if secs > 0 {
				return n / secs
			}
		}
	}
	return -1
}
