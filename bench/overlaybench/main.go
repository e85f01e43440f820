// Command overlaybench measures 4k random writes at QD16 over NBD into a
// fresh qcow2 overlay of a raw backing file, the job of a VM's first
// minutes on a golden image: nearly every write allocates a cluster and
// copies the rest of it from the backing file. It compares diskserve with
// qemu-nbd on overlays with plain and with extended L2 entries (64 KiB
// clusters, 2 KiB subclusters), with the backing file in the page cache
// (warm) and out of it (cold), the servers taking turns.
//
//	go run ./bench/overlaybench [-size 4G] [-rounds 2] [-runtime 5s]
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/diskserve/diskserve/bench/internal/fio"
)

var job = fio.Job{Name: "4k random write QD16", Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=16"}, Unit: "IOPS"}

func main() {
	runtime := flag.Duration("runtime", 5*time.Second, "time per fio run")
	size := flag.Int64("size", 4<<30, "size of the backing file and the overlay in bytes")
	rounds := flag.Int("rounds", 2, "rounds; figures are medians")
	flag.Parse()
	log.SetFlags(0)
	dir, bin := fio.Setup("overlaybench")
	defer os.RemoveAll(dir)
	base := filepath.Join(dir, "base.raw")
	fio.WriteRandom(base, *size, [][2]int64{{0, *size}})
	overlay := filepath.Join(dir, "overlay.qcow2")

	servers := []struct {
		name  string
		start func(sock string) *exec.Cmd
	}{
		{"diskserve", func(sock string) *exec.Cmd {
			return exec.Command(bin, "serve", "-f", "qcow2", "--listen", "unix:"+sock, overlay)
		}},
		{"qemu-nbd", func(sock string) *exec.Cmd {
			return exec.Command("qemu-nbd", "-f", "qcow2", "-t", "-k", sock, overlay)
		}},
	}
	type config struct {
		l2    string // qemu-img's extended_l2 option
		state fio.State
	}
	var configs []config
	for _, state := range []fio.State{fio.Fresh, fio.Cold} {
		for _, l2 := range []string{"off", "on"} {
			configs = append(configs, config{l2, state})
		}
	}
	results := map[config]map[string][]float64{}
	for round := range *rounds {
		for _, c := range configs {
			if results[c] == nil {
				results[c] = map[string][]float64{}
			}
			order := slices.Clone(servers)
			if round%2 == 1 {
				slices.Reverse(order)
			}
			for _, s := range order {
				os.Remove(overlay)
				if b, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2="+c.l2,
					"-b", base, "-F", "raw", overlay, fmt.Sprint(*size)).CombinedOutput(); err != nil {
					log.Fatalf("qemu-img create: %v\n%s", err, b)
				}
				syscall.Sync() // no server pays for the previous one's writeback
				if c.state == fio.Cold {
					fio.NewImage(base, fio.Cold).Prepare(fio.Cold)
				} else {
					fio.Warm(base)
				}
				sock := filepath.Join(dir, s.name+".sock")
				os.Remove(sock)
				uri, stop := fio.StartNBD(s.name, s.start(sock), sock)
				v := fio.Run(job, []string{"--ioengine=nbd", "--uri=" + uri}, *runtime, *size)
				stop()
				results[c][s.name] = append(results[c][s.name], v)
				log.Printf("round %d %-9s extended_l2=%-3s backing %-5s %8.0f IOPS", round+1, s.name, c.l2, backingState(c.state), v)
			}
		}
	}
	fmt.Printf("| backing file | extended L2 | diskserve (IOPS) | qemu-nbd (IOPS) | ratio |\n|---|---|---|---|---|\n")
	for _, c := range configs {
		ds, q := fio.Median(results[c]["diskserve"]), fio.Median(results[c]["qemu-nbd"])
		fmt.Printf("| %s | %s | %.0f | %.0f | %.2f |\n", backingState(c.state), c.l2, ds, q, ds/q)
	}
	fmt.Printf("\n4k random writes at QD16 for %v into a fresh %d-byte qcow2 overlay (64 KiB clusters) of a raw backing file of random data; medians of %d rounds, servers alternating, one connection over a Unix socket.\n", *runtime, *size, *rounds)
}

// backingState names the backing file's state in the page cache.
func backingState(s fio.State) string {
	if s == fio.Cold {
		return "cold"
	}
	return "warm"
}
