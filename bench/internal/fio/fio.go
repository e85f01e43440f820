// Package fio runs fio jobs, and holds what the benchmark harnesses in
// bench/ share: the images they write and their setup.
package fio

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A Job is one fio workload: its name in tables, the fio arguments that
// set its pattern (the first is --rw=...), and the unit of its figure.
type Job struct {
	Name string
	Args []string
	Unit string // "IOPS" or "MiB/s"
}

// hangGrace is how long past its runtime fio may take before Run calls
// the server hung.
const hangGrace = 2 * time.Minute

// Command is fio with args, killed with the processes it forks when ctx
// ends: fio runs each job in a child process, which a kill of fio alone
// would leave holding the output pipe, and Output waiting for ever.
func Command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "fio", args...)
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	return cmd
}

// Run runs j for runtime over size bytes of the target that target names
// (--filename=... or --ioengine=nbd --uri=...) and returns its IOPS or
// MiB/s, summed over its jobs (--numjobs). A failure, or a server that
// stops answering, ends the benchmark.
func Run(j Job, target []string, runtime time.Duration, size int64) float64 {
	v, ok := TryRun(j, target, runtime, size)
	if !ok {
		log.Fatalf("fio %s: no result %v after its runtime: the server stopped answering", j.Name, hangGrace)
	}
	return v
}

// TryRun is [Run] for a benchmark that goes on past a server that stops
// answering: it reports false then. Any other failure ends the benchmark.
func TryRun(j Job, target []string, runtime time.Duration, size int64) (float64, bool) {
	args := append([]string{"--name=bench", fmt.Sprintf("--size=%d", size), "--time_based", "--group_reporting",
		fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())), "--output-format=json"}, target...)
	// A server that stops answering would hold fio, and the whole run,
	// for ever.
	ctx, cancel := context.WithTimeout(context.Background(), runtime+hangGrace)
	defer cancel()
	out, err := Command(ctx, append(args, j.Args...)...).Output()
	if ctx.Err() != nil {
		return 0, false
	}
	if err != nil {
		log.Fatalf("fio %s: %v\n%s", j.Name, err, out)
	}
	var res struct {
		Jobs []struct {
			Read, Write struct {
				IOPS  float64 `json:"iops"`
				BWKiB float64 `json:"bw"`
			}
		}
	}
	if i := bytes.IndexByte(out, '{'); i < 0 || json.Unmarshal(out[i:], &res) != nil || len(res.Jobs) == 0 {
		log.Fatalf("fio %s: no JSON result in\n%s", j.Name, out)
	}
	r := res.Jobs[0].Read
	if strings.Contains(j.Args[0], "write") {
		r = res.Jobs[0].Write
	}
	if j.Unit == "IOPS" {
		return r.IOPS, true
	}
	return r.BWKiB / 1024, true
}

// Median returns the median of vs (the upper one of an even count).
func Median(vs []float64) float64 {
	return slices.Sorted(slices.Values(vs))[len(vs)/2]
}

// WriteRandom makes a file of size bytes with the same random data on
// every run in each [offset, length] span, and holes elsewhere.
func WriteRandom(path string, size int64, spans [][2]int64) {
	rnd := rand.New(rand.NewPCG(1, 1))
	writeSpans(path, size, spans, func(b []byte) {
		for i := 0; i < len(b); i += 8 {
			v := rnd.Uint64()
			for k := range 8 {
				b[i+k] = byte(v >> (8 * k))
			}
		}
	})
}

// WriteText makes a file of size bytes with log-like text, which
// compresses about tenfold, in each span and holes elsewhere.
func WriteText(path string, size int64, spans [][2]int64) {
	line := 0
	var pending []byte
	writeSpans(path, size, spans, func(b []byte) {
		for n := 0; n < len(b); {
			if len(pending) == 0 {
				pending = fmt.Appendf(pending[:0], "2026-11-22T23:%02d:%02d.%06dZ host%d kernel: request %d completed in %d us\n",
					line/60%60, line%60, line*7919%1000000, line%13, line, line*31%997)
				line++
			}
			k := copy(b[n:], pending)
			pending, n = pending[k:], n+k
		}
	})
}

// writeSpans makes a sparse file of size bytes whose spans fill fills,
// 1 MiB at a time, and syncs it.
func writeSpans(path string, size int64, spans [][2]int64, fill func([]byte)) {
	f, err := os.Create(path)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		log.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for _, s := range spans {
		for off := s[0]; off < s[0]+s[1]; off += int64(len(buf)) {
			fill(buf)
			if _, err := f.WriteAt(buf[:min(int64(len(buf)), s[0]+s[1]-off)], off); err != nil {
				log.Fatal(err)
			}
		}
	}
	if err := f.Sync(); err != nil {
		log.Fatal(err)
	}
}

// peerMalloc keeps the memory a C program frees in the program (glibc
// neither unmaps large blocks nor trims its heaps), for every process a
// harness starts: the peers, fio and nbdcopy. On these VMs freed memory
// goes back to the host (see BackFreeMemory), and a program that frees a
// buffer per request, as qemu-nbd does for each 1 MiB read, then faults
// at the host on every new one and runs several times slower than it
// would on a machine without a balloon (docs/performance.md). diskserve,
// a Go program that pools its buffers, is not affected either way.
const peerMalloc = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"

// Setup makes a temporary directory for a harness called name and builds
// ./cmd/diskserve into it (run from the module root). It returns the
// directory and the binary; the caller removes the directory. It sets
// GLIBC_TUNABLES (peerMalloc) for the processes the harness starts.
func Setup(name string) (dir, bin string) {
	os.Setenv("GLIBC_TUNABLES", peerMalloc)
	dir, err := os.MkdirTemp("", name)
	if err != nil {
		log.Fatal(err)
	}
	bin = filepath.Join(dir, "diskserve")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/diskserve").CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		log.Fatalf("go build: %v\n%s", err, out)
	}
	return dir, bin
}

// Warm reads every data extent of the file at path (found with SEEK_DATA
// and SEEK_HOLE, so a sparse file's holes stay uncached), so that a job
// starts with the file in the page cache. The host trims pages it deems
// cold (DAMON reclaim on these machines pages out memory idle for a
// minute), and the first server of a round would otherwise pay for
// reading them back.
func Warm(path string) {
	f, err := os.Open(path)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	fd := int(f.Fd())
	for pos := int64(0); ; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err != nil { // ENXIO: no data past pos
			return
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			log.Fatalf("warm %s: %v", path, err)
		}
		for off := data; off < hole; off += int64(len(buf)) {
			if _, err := f.ReadAt(buf[:min(int64(len(buf)), hole-off)], off); err != nil {
				log.Fatalf("warm %s: %v", path, err)
			}
		}
		pos = hole
	}
}

// BackFreeMemory has the host back n bytes of the guest's free memory
// again, by faulting in an anonymous mapping of n bytes and unmapping it.
// These machines are VMs whose balloon driver reports free memory to the
// host (free page reporting), and the host takes it away: a tool that
// fills the page cache after an idle moment then faults at the host on
// every new page, and its copies into the page cache take several times
// their usual system time. Whichever tool ran first after a pause paid
// for it (docs/performance.md). Call this right before the clock starts,
// with n well above what the timed run allocates: the pages it frees are
// the ones the run gets, before the balloon reports them (seconds later).
func BackFreeMemory(n int64) {
	m, err := unix.Mmap(-1, 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		log.Fatalf("back free memory: %v", err)
	}
	if err := unix.Munmap(m); err != nil {
		log.Fatalf("back free memory: %v", err)
	}
}

// StartNBD starts cmd, a server of an NBD export on the Unix socket sock,
// and waits (20 s at most) until nbdinfo can reach the export. It returns the export's
// URI and a function that stops the server (SIGINT, then SIGKILL after
// 10 s). A server that does not start ends the benchmark.
func StartNBD(name string, cmd *exec.Cmd, sock string) (uri string, stop func()) {
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		log.Fatalf("%s: %v", name, err)
	}
	stop = func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}
	uri = "nbd+unix:///?socket=" + sock
	for deadline := time.Now().Add(20 * time.Second); exec.Command("nbdinfo", "--size", uri).Run() != nil; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			stop()
			log.Fatalf("%s did not start: %s", name, stderr.String())
		}
	}
	return uri, stop
}
