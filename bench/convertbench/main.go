// Command convertbench times `diskserve convert` side by side with
// `qemu-img convert` on the same files, in one run on one machine, and
// prints a Markdown table of the median times and qemu-img's time over
// diskserve's (above 1 favours diskserve).
//
// The source is a 2 GiB raw image holding 512 MiB of random data in 4 MiB
// spans, and holes elsewhere, in the page cache; and the same converted to
// qcow2 by qemu-img. Conversions: raw to qcow2, qcow2 to raw, and raw to
// compressed qcow2 (-c), from that image and from one of the same layout
// whose data is text (log lines), which compresses about tenfold. Each
// output is written to the same directory, and synced before the clock
// stops, so writeback counts for both tools. Before the clock starts, the
// machine's free memory is made backed by the host again
// (fio.BackFreeMemory), so that neither tool pays for the host taking it
// away while the machine was idle.
//
// Run it from the module root (it builds ./cmd/diskserve):
//
//	go run ./bench/convertbench -rounds 3
//
// Machines are shared and noisy: compare the ratios of one run, not
// absolute figures across runs.
package main

import (
	"flag"
	"fmt"
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

// backedMemory is how much free memory is made backed by the host before
// each timed run (fio.BackFreeMemory): well above what a run allocates
// (an output holds 512 MiB of data).
const backedMemory = 3 << 30

// A job is one conversion: the arguments after "convert" for each tool,
// with SRC and DST appended.
type job struct {
	name      string
	src       string // "raw" or "qcow2"
	diskserve []string
	qemu      []string
}

var jobs = []job{
	{"raw to qcow2", "raw", []string{"-O", "qcow2"}, []string{"-f", "raw", "-O", "qcow2"}},
	{"qcow2 to raw", "qcow2", []string{"-O", "raw"}, []string{"-f", "qcow2", "-O", "raw"}},
	{"raw to compressed qcow2 (-c)", "raw", []string{"-c", "-O", "qcow2"}, []string{"-c", "-f", "raw", "-O", "qcow2"}},
	{"text raw to compressed qcow2 (-c)", "text", []string{"-c", "-O", "qcow2"}, []string{"-c", "-f", "raw", "-O", "qcow2"}},
}

// formatJobs converts to and from the formats of other hypervisors (-formats).
func formatJobs(formats []string) []job {
	var js []job
	for _, f := range formats {
		name, opts := f, []string{"-O", f}
		if f == "vmdk-stream" {
			name, opts = "streamOptimized vmdk", []string{"-O", "vmdk", "-o", "subformat=streamOptimized"}
		}
		js = append(js,
			job{"raw to " + name, "raw", opts, append([]string{"-f", "raw"}, opts...)},
			job{name + " to raw", f, []string{"-O", "raw"}, []string{"-f", strings.TrimSuffix(f, "-stream"), "-O", "raw"}})
	}
	return js
}

func main() {
	rounds := flag.Int("rounds", 3, "rounds of every conversion; figures are medians")
	size := flag.Int64("size", 2<<30, "virtual size of the source image in bytes")
	formats := flag.String("formats", "", "also convert raw to and from these formats, comma-separated (vdi, vpc, vhdx, vmdk, vmdk-stream); with -only-formats, nothing else")
	onlyFormats := flag.Bool("only-formats", false, "run only the -formats jobs")
	flag.Parse()
	log.SetFlags(0)
	dir, bin := fio.Setup("convertbench")
	defer os.RemoveAll(dir)
	srcs := map[string]string{"raw": filepath.Join(dir, "src.raw"), "qcow2": filepath.Join(dir, "src.qcow2"), "text": filepath.Join(dir, "text.raw")}
	var spans [][2]int64
	for off := int64(0); off < *size; off += 16 << 20 {
		spans = append(spans, [2]int64{off, 4 << 20})
	}
	fio.WriteRandom(srcs["raw"], *size, spans)
	run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", srcs["raw"], srcs["qcow2"])
	fio.WriteText(srcs["text"], *size, spans)
	var extra []string
	if *formats != "" {
		extra = strings.Split(*formats, ",")
	}
	for _, f := range extra {
		srcs[f] = filepath.Join(dir, "src."+f)
		args := formatJobs([]string{f})[0].qemu
		run("qemu-img", append(append([]string{"convert"}, args...), srcs["raw"], srcs[f])...)
	}
	jobs := jobs
	if *onlyFormats {
		jobs = nil
	}
	jobs = append(slices.Clone(jobs), formatJobs(extra)...)

	times := map[string]map[string][]float64{}
	for round := range *rounds {
		for _, j := range jobs {
			tools := []string{"diskserve", "qemu-img"}
			if round%2 == 1 { // alternate who goes first, so that neither always follows the other's writeback
				slices.Reverse(tools)
			}
			for _, tool := range tools {
				out := filepath.Join(dir, "out")
				os.Remove(out)
				args := append([]string{"convert"}, j.qemu...)
				name := "qemu-img"
				if tool == "diskserve" {
					args, name = append([]string{"convert"}, j.diskserve...), bin
				}
				syscall.Sync()
				fio.BackFreeMemory(backedMemory)
				start := time.Now()
				run(name, append(args, srcs[j.src], out)...)
				syscall.Sync()
				d := time.Since(start).Seconds()
				if times[j.name] == nil {
					times[j.name] = map[string][]float64{}
				}
				times[j.name][tool] = append(times[j.name][tool], d)
				log.Printf("round %d %-30s %-10s %6.2f s", round+1, j.name, tool, d)
			}
		}
	}
	fmt.Printf("| conversion (%d MiB, %d MiB of data) | diskserve (s) | qemu-img (s) | qemu-img / diskserve |\n|---|---|---|---|\n", *size>>20, int64(len(spans))*4)
	for _, j := range jobs {
		ds, q := fio.Median(times[j.name]["diskserve"]), fio.Median(times[j.name]["qemu-img"])
		fmt.Printf("| %s | %.2f | %.2f | %.2f |\n", j.name, ds, q, q/ds)
	}
	fmt.Printf("\nMedians of %d rounds; each time includes a sync of the output.\n", *rounds)
}

func run(name string, args ...string) {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		log.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}
