// Command fusebench measures `diskserve mount` side by side with nbdfuse
// (over nbdkit's file plugin) and qemu-storage-daemon's FUSE export, in one
// run on one machine, and prints a Markdown table of each figure and
// diskserve's ratio to each peer.
//
// Every peer exposes the same raw image as a regular file (the mountpoint
// is a file, the mode all three share), put into the state -state names
// before each run (fresh by default; see fio.State), and fio runs against
// that file with O_DIRECT, so that the kernel's page cache of the FUSE file
// does not stand in for the server: 1M sequential and 4k random reads and writes,
// each with psync at queue depth 1 and with io_uring at depth 16. The same
// jobs on a copy of the image file, read and written with O_DIRECT on the
// machine's own disk, give the baseline.
//
// Run it from the module root as root (it builds ./cmd/diskserve):
//
//	go run ./bench/fusebench -runtime 5s -rounds 3
//	go run ./bench/fusebench -state settled
//
// Machines are shared and noisy: compare the ratios of one run, not
// absolute figures across runs.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/diskserve/diskserve/bench/internal/fio"
)

// A peer mounts image at the regular file mnt and returns a function that
// unmounts it and waits for the server to exit; the baseline has no mount.
type peer struct {
	name  string
	mount func(image, mnt, dir string) (stop func())
}

// plainFile is the baseline: fio on a copy of the image file.
const plainFile = "plain file"

func peers(diskserve string) []peer {
	return []peer{
		{plainFile, nil},
		{"diskserve", func(img, mnt, _ string) func() {
			cmd := start(exec.Command(diskserve, "mount", "-f", "raw", img, mnt))
			return func() { stopCmd(cmd, os.Interrupt) }
		}},
		{"nbdfuse+nbdkit", func(img, mnt, dir string) func() {
			sock := filepath.Join(dir, "nbdkit.sock")
			os.Remove(sock)
			kit := start(exec.Command("nbdkit", "--foreground", "--exit-with-parent", "-U", sock, "file", "file="+img))
			waitFor("nbdkit", func() bool { return exec.Command("nbdinfo", "--size", "nbd+unix:///?socket="+sock).Run() == nil })
			fuse := start(exec.Command("nbdfuse", mnt, "--unix", sock))
			return func() {
				// nbdfuse's manual: unmount with fusermount3, never kill it.
				if b, err := exec.Command("fusermount3", "-u", mnt).CombinedOutput(); err != nil {
					log.Printf("fusermount3 -u: %v: %s", err, b)
				}
				stopCmd(fuse, os.Interrupt)
				stopCmd(kit, os.Interrupt)
			}
		}},
		{"qemu-storage-daemon", func(img, mnt, _ string) func() {
			cmd := start(exec.Command("qemu-storage-daemon",
				"--blockdev", "driver=file,node-name=f,filename="+img+",cache.direct=off",
				"--export", "type=fuse,id=e,node-name=f,mountpoint="+mnt+",writable=on"))
			return func() { stopCmd(cmd, syscall.SIGTERM) }
		}},
	}
}

// jobs are every pairing of the four patterns with the two engines: psync at
// queue depth 1 and io_uring at depth 16.
var jobs = func() []fio.Job {
	var js []fio.Job
	for _, engine := range []struct{ name, engine, depth string }{{"QD1", "psync", "1"}, {"QD16", "io_uring", "16"}} {
		for _, pattern := range []struct{ name, rw, bs, unit string }{
			{"1M sequential read", "read", "1m", "MiB/s"},
			{"1M sequential write", "write", "1m", "MiB/s"},
			{"4k random read", "randread", "4k", "IOPS"},
			{"4k random write", "randwrite", "4k", "IOPS"},
		} {
			js = append(js, fio.Job{
				Name: pattern.name + " " + engine.name,
				Args: []string{"--rw=" + pattern.rw, "--bs=" + pattern.bs, "--ioengine=" + engine.engine, "--iodepth=" + engine.depth},
				Unit: pattern.unit,
			})
		}
	}
	return js
}()

func main() {
	runtime := flag.Duration("runtime", 5*time.Second, "time per fio job")
	size := flag.Int64("size", 1<<30, "size of the image in bytes")
	rounds := flag.Int("rounds", 3, "rounds of every job; figures are medians")
	stateFlag := flag.String("state", "fresh", "the served image's state before each run: fresh (written sequentially just before), settled (rewritten in 4k pieces in random order) or cold (out of the page cache)")
	flag.Parse()
	state, err := fio.ParseState(*stateFlag)
	if err != nil || state == fio.Direct {
		log.Fatalf("-state %s: want fresh, settled or cold", *stateFlag)
	}
	log.SetFlags(0)
	dir, bin := fio.Setup("fusebench")
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "fio.raw")
	fio.WriteRandom(img, *size, [][2]int64{{0, *size}})
	// The baseline gets its own copy: its O_DIRECT writes would drop the
	// served image from the page cache.
	plain := filepath.Join(dir, "plain.raw")
	fio.WriteRandom(plain, *size, [][2]int64{{0, *size}})
	mnt := filepath.Join(dir, "mnt")
	if err := os.WriteFile(mnt, nil, 0o644); err != nil {
		log.Fatal(err)
	}
	ps := peers(bin)
	image := fio.NewImage(img, state)

	// Peers take turns within each job and round, so that a change in the
	// machine's load hits them alike; each figure is the median of the
	// rounds.
	results := map[string]map[string][]float64{} // job -> peer -> one figure per round
	for round := range *rounds {
		for _, j := range jobs {
			for _, p := range ps {
				syscall.Sync()
				v := 0.0
				if p.mount == nil {
					v = fio.Run(j, fileTarget(plain), *runtime, *size)
				} else {
					image.Prepare(state)
					stop := p.mount(img, mnt, dir)
					waitFor(p.name, func() bool {
						fi, err := os.Stat(mnt)
						return err == nil && fi.Size() == *size
					})
					v = fio.Run(j, fileTarget(mnt), *runtime, *size)
					stop()
				}
				if results[j.Name] == nil {
					results[j.Name] = map[string][]float64{}
				}
				results[j.Name][p.name] = append(results[j.Name][p.name], v)
				log.Printf("round %d %-20s %-24s %10.0f %s", round+1, p.name, j.Name, v, j.Unit)
			}
		}
	}
	printTable(os.Stdout, results, ps, state, *runtime, *rounds)
}

// start starts cmd, which gets SIGTERM if the benchmark dies first, so that
// no mount outlives it.
func start(cmd *exec.Cmd) *exec.Cmd {
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		log.Fatalf("%s: %v", cmd.Path, err)
	}
	return cmd
}

// stopCmd sends sig to cmd and waits for it, killing it after 10 seconds.
func stopCmd(cmd *exec.Cmd, sig os.Signal) {
	cmd.Process.Signal(sig)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		log.Printf("%s did not exit; killing it", cmd.Path)
		cmd.Process.Kill()
		<-done
	}
}

func waitFor(what string, ready func() bool) {
	for deadline := time.Now().Add(10 * time.Second); !ready(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			log.Fatalf("%s did not start", what)
		}
	}
}

// fileTarget is fio's target for file, read and written with O_DIRECT.
func fileTarget(file string) []string { return []string{"--filename=" + file, "--direct=1"} }

func printTable(w io.Writer, r map[string]map[string][]float64, ps []peer, state fio.State, runtime time.Duration, rounds int) {
	fmt.Fprintf(w, "| job (O_DIRECT, %s) |", state)
	for _, p := range ps {
		fmt.Fprintf(w, " %s |", p.name)
	}
	others := slices.DeleteFunc(slices.Clone(ps), func(p peer) bool { return p.name == "diskserve" })
	for _, p := range others {
		fmt.Fprintf(w, " diskserve / %s |", p.name)
	}
	fmt.Fprintf(w, "\n|%s\n", strings.Repeat("---|", 2*len(ps)))
	for _, j := range jobs {
		fmt.Fprintf(w, "| %s (%s) |", j.Name, j.Unit)
		for _, p := range ps {
			fmt.Fprintf(w, " %.0f |", fio.Median(r[j.Name][p.name]))
		}
		for _, p := range others {
			fmt.Fprintf(w, " %.2f |", fio.Median(r[j.Name]["diskserve"])/fio.Median(r[j.Name][p.name]))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "\nMedians of %d rounds; fio: %v per job on the mounted file of a raw image put into the %s state before each run. Ratios above 1 favour diskserve.\n", rounds, runtime, state)
}
