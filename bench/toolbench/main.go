// Command toolbench times `diskserve compare`, `rebase` and `commit` side
// by side with qemu-img's on the same images, in one run on one machine,
// and prints a Markdown table of the median times and qemu-img's time
// over diskserve's (above 1 favours diskserve).
//
// The images are qcow2, 8 GiB large (-size) with 1 GiB of random data
// (-data) in 4 MiB spans spread over the disk:
//
//   - compare: two such images of the same content, made by qemu-img
//     convert from one raw file, compared in full;
//   - rebase: an overlay holding a few MiB, over a base holding the data,
//     rebased safely onto an empty image of the same size, so that every
//     byte of the data is copied into the overlay;
//   - commit: an overlay holding the data, over an empty base, committed
//     into it (and emptied, qemu-img's default).
//
// Each tool runs on its own fresh copy of the images, in the page cache
// (Warm; -state cold: dropped from it), with a sync before the clock
// starts and one before it stops, so that writeback counts for both, and
// the machine's free memory made backed by the host again before the
// clock starts (fio.BackFreeMemory). The tools alternate in going first.
//
// Run it from the module root (it builds ./cmd/diskserve):
//
//	go run ./bench/toolbench -rounds 3
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
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/diskserve/diskserve/bench/internal/fio"
)

// backedMemory is how much free memory is made backed by the host before
// each timed run (fio.BackFreeMemory): well above what a run allocates
// (a job writes 1 GiB).
const backedMemory = 4 << 30

// A job is one operation: how to set its images up in a directory, and
// the arguments of each tool, run in that directory.
type job struct {
	name  string
	setup func(dir string)
	args  []string // the same for both tools
	files []string // to warm before the run
}

func main() {
	rounds := flag.Int("rounds", 3, "rounds of every job; figures are medians")
	size := flag.Int64("size", 8<<30, "virtual size of the images in bytes")
	data := flag.Int64("data", 1<<30, "bytes of data in them")
	state := flag.String("state", "warm", "the images in the page cache (warm) or not (cold)")
	only := flag.String("jobs", "", "the jobs to run, by name, comma-separated (default all)")
	flag.Parse()
	log.SetFlags(0)
	if *state != "warm" && *state != "cold" {
		log.Fatalf("-state %q: want warm or cold", *state)
	}
	dir, bin := fio.Setup("toolbench")
	defer os.RemoveAll(dir)

	const span = 4 << 20
	var spans [][2]int64
	step := *size / (*data / span)
	for off := int64(0); off+span <= *size && int64(len(spans))*span < *data; off += step {
		spans = append(spans, [2]int64{off, span})
	}
	raw := filepath.Join(dir, "data.raw")
	fio.WriteRandom(raw, *size, spans)
	sz := strconv.FormatInt(*size, 10)
	// Pristine images, copied for each run.
	pristine := filepath.Join(dir, "pristine")
	if err := os.Mkdir(pristine, 0o755); err != nil {
		log.Fatal(err)
	}
	in := func(n string) string { return filepath.Join(pristine, n) }
	run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, in("a.qcow2"))
	run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, in("b.qcow2"))
	run("qemu-img", "create", "-q", "-f", "qcow2", in("empty.qcow2"), sz)
	run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", in("over-a.qcow2"))
	run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 4M", in("over-a.qcow2"))
	// An overlay holding the data, over an empty base: the data written
	// into a fresh overlay with qemu-img convert -n.
	run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "empty.qcow2", "-F", "qcow2", in("full-over.qcow2"))
	run("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, in("full-over.qcow2"))
	os.Remove(raw)

	jobs := []job{
		{"compare", func(d string) { cp(d, "a.qcow2", "b.qcow2") }, []string{"compare", "a.qcow2", "b.qcow2"}, []string{"a.qcow2", "b.qcow2"}},
		{"rebase", func(d string) { cp(d, "a.qcow2", "over-a.qcow2", "empty.qcow2") }, []string{"rebase", "-b", "empty.qcow2", "-F", "qcow2", "over-a.qcow2"}, []string{"a.qcow2", "over-a.qcow2"}},
		{"commit", func(d string) { cp(d, "empty.qcow2", "full-over.qcow2") }, []string{"commit", "full-over.qcow2"}, []string{"full-over.qcow2"}},
	}
	if *only != "" {
		names := strings.Split(*only, ",")
		jobs = slices.DeleteFunc(jobs, func(j job) bool { return !slices.Contains(names, j.name) })
		if len(jobs) == 0 {
			log.Fatalf("-jobs %q: no such job (compare, rebase, commit)", *only)
		}
	}
	copyFrom = pristine
	times := map[string]map[string][]float64{}
	for round := range *rounds {
		for _, j := range jobs {
			tools := []string{"diskserve", "qemu-img"}
			if round%2 == 1 {
				slices.Reverse(tools)
			}
			for _, tool := range tools {
				work := filepath.Join(dir, "work")
				os.RemoveAll(work)
				if err := os.Mkdir(work, 0o755); err != nil {
					log.Fatal(err)
				}
				j.setup(work)
				syscall.Sync()
				for _, f := range j.files {
					if *state == "cold" {
						fio.Evict(filepath.Join(work, f))
					} else {
						fio.Warm(filepath.Join(work, f))
					}
				}
				name := "qemu-img"
				if tool == "diskserve" {
					name = bin
				}
				syscall.Sync()
				fio.BackFreeMemory(backedMemory)
				start := time.Now()
				cmd := exec.Command(name, j.args...)
				cmd.Dir = work
				if out, err := cmd.CombinedOutput(); err != nil {
					log.Fatalf("%s %v: %v\n%s", tool, j.args, err, out)
				}
				syscall.Sync()
				d := time.Since(start).Seconds()
				if times[j.name] == nil {
					times[j.name] = map[string][]float64{}
				}
				times[j.name][tool] = append(times[j.name][tool], d)
				log.Printf("round %d %-15s %-10s %6.2f s", round+1, j.name, tool, d)
			}
		}
	}
	fmt.Printf("| job (%d GiB qcow2, %d MiB of data, %s) | diskserve (s) | qemu-img (s) | qemu-img / diskserve |\n|---|---|---|---|\n", *size>>30, int64(len(spans))*span>>20, *state)
	for _, j := range jobs {
		ds, q := fio.Median(times[j.name]["diskserve"]), fio.Median(times[j.name]["qemu-img"])
		fmt.Printf("| %s | %.2f | %.2f | %.2f |\n", j.name, ds, q, q/ds)
	}
	fmt.Printf("\nMedians of %d rounds; each time includes a sync.\n", *rounds)
}

// copyFrom is the directory of the pristine images.
var copyFrom string

// cp copies the pristine images named into dir, holes kept.
func cp(dir string, names ...string) {
	for _, n := range names {
		run("cp", "--sparse=always", filepath.Join(copyFrom, n), filepath.Join(dir, n))
	}
}

func run(name string, args ...string) {
	cmd := exec.Command(name, args...)
	cmd.Stderr = os.Stderr
	cmd.Stdout = io.Discard
	if err := cmd.Run(); err != nil {
		log.Fatalf("%s %v: %v", name, args, err)
	}
}
