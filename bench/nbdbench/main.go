// Command nbdbench measures diskserve's NBD server side by side with
// nbdkit (file plugin) and qemu-nbd, in one run on one machine, and prints a
// Markdown table of each figure and diskserve's ratio to each peer.
//
// Jobs, each against a raw image over a Unix socket: fio's nbd engine
// doing 4k random reads at queue depth 16, 1M sequential reads at depth 4,
// 4k random writes at depth 16 and 1M sequential writes at depth 4, over
// one connection, and the 4k jobs again over four connections
// (numjobs=4), and in the cold and direct states 4k random reads at depth
// 64; then nbdcopy of a sparse 8 GiB image holding 256 MiB of data to a
// file, which measures block status and sparse reads. diskserve runs once
// per I/O engine named by -aio.
//
// Before each server's run the image is put into the state -state names
// (see fio.State), the same for every server: fresh, settled, cold or
// direct, where every server also bypasses the page cache.
//
// Run it from the module root (it builds ./cmd/diskserve):
//
//	go run ./bench/nbdbench -runtime 5s -rounds 3 -aio pool,uring
//	go run ./bench/nbdbench -format qcow2   # diskserve and qemu-nbd only
//	go run ./bench/nbdbench -state direct -size 4G
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

type peer struct {
	name  string
	start func(image, sock string) *exec.Cmd
}

// peers returns the servers to compare for images of format, diskserve
// first, once per engine: nbdkit's file plugin serves only raw (nbdkit 1.32
// has no qcow2 reader).
//
// In the direct state every server bypasses the page cache: diskserve
// with --cache=none, nbdkit's file plugin with cache=none (which drops
// what it read or wrote from the page cache, as nbdkit has no O_DIRECT),
// and qemu-nbd with --cache=none twice, with --aio=native and io_uring.
func peers(diskserve, format string, engines []string, state fio.State) []peer {
	direct := state == fio.Direct
	var ps []peer
	for _, e := range engines {
		ps = append(ps, peer{"diskserve-" + e, func(img, sock string) *exec.Cmd {
			args := []string{"serve", "-f", format, "--aio=" + e, "--listen", "unix:" + sock, img}
			if direct {
				args = append(args, "--cache=none")
			}
			return exec.Command(diskserve, args...)
		}})
	}
	ps = append(ps, peer{"nbdkit", func(img, sock string) *exec.Cmd {
		args := []string{"--foreground", "--exit-with-parent", "-U", sock, "file", "file=" + img}
		if direct {
			args = append(args, "cache=none")
		}
		return exec.Command("nbdkit", args...)
	}})
	// Otherwise the settings the peer comparison in the reference used:
	// writeback cache, thread-pool AIO, several connections (which turns
	// multi-conn on).
	qemu := func(name, cache, aio string) peer {
		return peer{name, func(img, sock string) *exec.Cmd {
			return exec.Command("qemu-nbd", "-f", format, "--cache="+cache, "--aio="+aio, "-t", "-e", "8", "-k", sock, img)
		}}
	}
	if direct {
		ps = append(ps, qemu("qemu-nbd-native", "none", "native"), qemu("qemu-nbd-uring", "none", "io_uring"))
	} else {
		ps = append(ps, qemu("qemu-nbd", "writeback", "threads"))
	}
	if format != "raw" {
		ps = slices.DeleteFunc(ps, func(p peer) bool { return p.name == "nbdkit" })
	}
	return ps
}

var jobs = []fio.Job{
	{Name: "4k random read QD16", Args: []string{"--rw=randread", "--bs=4k", "--iodepth=16"}, Unit: "IOPS"},
	{Name: "1M sequential read QD4", Args: []string{"--rw=read", "--bs=1m", "--iodepth=4"}, Unit: "MiB/s"},
	{Name: "4k random write QD16", Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=16"}, Unit: "IOPS"},
	{Name: "1M sequential write QD4", Args: []string{"--rw=write", "--bs=1m", "--iodepth=4"}, Unit: "MiB/s"},
	{Name: "4k random read QD16 x4 conns", Args: []string{"--rw=randread", "--bs=4k", "--iodepth=16", "--numjobs=4"}, Unit: "IOPS"},
	{Name: "4k random write QD16 x4 conns", Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=4"}, Unit: "IOPS"},
}

// deepJobs run too in the states where requests wait for the device.
var deepJobs = []fio.Job{
	{Name: "4k random read QD64", Args: []string{"--rw=randread", "--bs=4k", "--iodepth=64"}, Unit: "IOPS"},
}

func main() {
	runtime := flag.Duration("runtime", 5*time.Second, "time per fio job")
	size := flag.Int64("size", 1<<30, "size of the fio image in bytes")
	rounds := flag.Int("rounds", 3, "rounds of every job; figures are medians")
	format := flag.String("format", "raw", "image format to serve: raw, or qcow2, vdi, vpc, vhdx or vmdk (converted from the raw images by qemu-img)")
	engines := flag.String("aio", "pool,uring", "diskserve's I/O engines to measure, comma-separated")
	stateFlag := flag.String("state", "fresh", "the image's state before each server's run: fresh (written sequentially just before), settled (rewritten in 4k pieces in random order), cold (out of the page cache; use -size 4G or more), direct (cold, and every server bypasses the page cache)")
	flag.Parse()
	state, err := fio.ParseState(*stateFlag)
	if err != nil {
		log.Fatal(err)
	}
	jobs := jobs
	if state == fio.Cold || state == fio.Direct {
		jobs = append(slices.Clone(jobs), deepJobs...)
	}
	log.SetFlags(0)
	dir, bin := fio.Setup("nbdbench")
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "fio.raw")
	fio.WriteRandom(img, *size, [][2]int64{{0, *size}})
	sparse := filepath.Join(dir, "sparse.raw")
	var spans [][2]int64 // 64 spans of 4 MiB spread over 8 GiB: 256 MiB of data
	for i := range int64(64) {
		spans = append(spans, [2]int64{i * (128 << 20), 4 << 20})
	}
	fio.WriteRandom(sparse, 8<<30, spans)
	if *format != "raw" {
		img, sparse = convert(img, *format), convert(sparse, *format)
	}
	ps := peers(bin, *format, strings.Split(*engines, ","), state)
	image := fio.NewImage(img, state)

	// Peers take turns within each job and round, so that a change in the
	// machine's load hits them alike, starting with a different one each
	// round; each figure is the median of the rounds.
	results := map[string]map[string][]float64{} // job -> peer -> one figure per round
	for round := range *rounds {
		// Who goes first pays for what the previous job left behind
		// (writeback, the page cache of the copy's output): rotate.
		order := slices.Concat(ps[round%len(ps):], ps[:round%len(ps)])
		for _, j := range jobs {
			for _, p := range order {
				image.Prepare(state)
				v := withServer(p, img, dir, func(uri string) float64 { return fio.Run(j, nbdTarget(uri), *runtime, *size) })
				record(results, j.Name, p.name, v)
				log.Printf("round %d %-10s %-24s %10.0f %s", round+1, p.name, j.Name, v, j.Unit)
			}
		}
		for _, p := range order {
			syscall.Sync()
			if state == fio.Cold || state == fio.Direct {
				fio.NewImage(sparse, state).Prepare(state)
			} else {
				fio.Warm(sparse)
			}
			v := withServer(p, sparse, dir, func(uri string) float64 { return nbdcopy(uri, dir) })
			record(results, copyJob, p.name, v)
			log.Printf("round %d %-10s %-24s %10.2f s", round+1, p.name, "nbdcopy", v)
		}
	}
	printTable(os.Stdout, results, jobs, ps, *format, state, *runtime, *rounds)
	if *format == "qcow2" {
		residentMemory(os.Stdout, ps, dir, *runtime)
	}
}

// convert converts a raw image with qemu-img to format, which allocates
// every cluster or block holding data and none of the holes.
func convert(raw, format string) string {
	out := strings.TrimSuffix(raw, ".raw") + "." + format
	if b, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", format, raw, out).CombinedOutput(); err != nil {
		log.Fatalf("qemu-img convert: %v\n%s", err, b)
	}
	return out
}

// residentMemory serves a 1 TiB sparse qcow2 with one cluster written in
// every L2 table's span, so that random reads across it touch 2048 L2
// tables (128 MiB of them), and reports each server's peak resident memory
// after random 4k reads over all of it.
func residentMemory(w io.Writer, ps []peer, dir string, runtime time.Duration) {
	img := filepath.Join(dir, "huge.qcow2")
	if b, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, "1T").CombinedOutput(); err != nil {
		log.Fatalf("qemu-img create: %v\n%s", err, b)
	}
	args := []string{"-f", "qcow2"}
	for off := int64(0); off < 1<<40; off += 512 << 20 {
		args = append(args, "-c", fmt.Sprintf("write -q %d 4k", off))
	}
	if b, err := exec.Command("qemu-io", append(args, img)...).CombinedOutput(); err != nil {
		log.Fatalf("qemu-io: %v\n%s", err, b)
	}
	fmt.Fprintf(w, "\n| 1 TiB sparse qcow2, 4k random reads for %v | peak resident memory |\n|---|---|\n", runtime)
	for _, p := range ps {
		var rss string
		syscall.Sync()
		fio.Warm(img)
		withServerCmd(p, img, dir, func(uri string, cmd *exec.Cmd) float64 {
			fio.Run(jobs[0], nbdTarget(uri), runtime, 1<<40) // 4k random reads
			status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
			for _, line := range strings.Split(string(status), "\n") {
				if strings.HasPrefix(line, "VmHWM:") {
					rss = strings.TrimSpace(strings.TrimPrefix(line, "VmHWM:"))
				}
			}
			return 0
		})
		fmt.Fprintf(w, "| %s | %s |\n", p.name, rss)
	}
}

const copyJob = "nbdcopy 8 GiB, 256 MiB data"

func record(r map[string]map[string][]float64, job, peer string, v float64) {
	if r[job] == nil {
		r[job] = map[string][]float64{}
	}
	r[job][peer] = append(r[job][peer], v)
}

// withServer starts p on image, which the caller put into its state, runs
// fn against it and stops it.
func withServer(p peer, image, dir string, fn func(uri string) float64) float64 {
	return withServerCmd(p, image, dir, func(uri string, _ *exec.Cmd) float64 { return fn(uri) })
}

// withServerCmd is withServer for functions that look at the server process.
func withServerCmd(p peer, image, dir string, fn func(uri string, cmd *exec.Cmd) float64) float64 {
	sock := filepath.Join(dir, p.name+".sock")
	os.Remove(sock)
	cmd := p.start(image, sock)
	uri, stop := fio.StartNBD(p.name, cmd, sock)
	defer stop()
	return fn(uri, cmd)
}

// nbdTarget is fio's target for the NBD export at uri.
func nbdTarget(uri string) []string { return []string{"--ioengine=nbd", "--uri=" + uri} }

// nbdcopy copies the export to a file and returns the seconds it took.
func nbdcopy(uri, dir string) float64 {
	out := filepath.Join(dir, "copy.raw")
	os.Remove(out)
	fio.BackFreeMemory(1 << 30) // nbdcopy fills 256 MiB of new page cache
	start := time.Now()
	if b, err := exec.Command("nbdcopy", uri, out).CombinedOutput(); err != nil {
		log.Fatalf("nbdcopy: %v\n%s", err, b)
	}
	d := time.Since(start).Seconds()
	os.Remove(out)
	return d
}

// printTable prints each job's median figure per server and, for each of
// diskserve's engines against each peer, the median of the ratios taken
// round by round, with their range: a round's servers share its machine
// load, so its ratio is steadier than one of medians from different
// minutes.
func printTable(w io.Writer, r map[string]map[string][]float64, jobs []fio.Job, ps []peer, format string, state fio.State, runtime time.Duration, rounds int) {
	var ours, theirs []peer
	for _, p := range ps {
		if strings.HasPrefix(p.name, "diskserve") {
			ours = append(ours, p)
		} else {
			theirs = append(theirs, p)
		}
	}
	fmt.Fprintf(w, "| job (%s, %s) |", format, state)
	cols := len(ps)
	for _, p := range ps {
		fmt.Fprintf(w, " %s |", p.name)
	}
	for _, o := range ours {
		for _, p := range theirs {
			fmt.Fprintf(w, " %s / %s |", o.name, p.name)
			cols++
		}
	}
	fmt.Fprintf(w, "\n|%s\n", strings.Repeat("---|", cols+1))
	row := func(name string, v map[string][]float64, prec int, inverse bool) {
		fmt.Fprintf(w, "| %s |", name)
		for _, p := range ps {
			fmt.Fprintf(w, " %.*f |", prec, fio.Median(v[p.name]))
		}
		for _, o := range ours {
			for _, p := range theirs {
				var ratios []float64
				for i := range min(len(v[o.name]), len(v[p.name])) {
					ratio := v[o.name][i] / v[p.name][i]
					if inverse { // a time: the peer's over ours
						ratio = 1 / ratio
					}
					ratios = append(ratios, ratio)
				}
				fmt.Fprintf(w, " %.2f (%.2f-%.2f) |", fio.Median(ratios), slices.Min(ratios), slices.Max(ratios))
			}
		}
		fmt.Fprintln(w)
	}
	for _, j := range jobs {
		row(j.Name+" ("+j.Unit+")", r[j.Name], 0, false)
	}
	row(copyJob+" (s)", r[copyJob], 2, true)
	fmt.Fprintf(w, "\nFigures are medians of %d rounds; ratios are the medians of the rounds' ratios, with their range. fio: %v per job, %s image in the %s state before each server's run, over a Unix socket, one connection unless the job says otherwise. Ratios above 1 favour diskserve (for nbdcopy, the peer's time over diskserve's).\n", rounds, runtime, format, state)
}
