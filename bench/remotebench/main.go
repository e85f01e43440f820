// Command remotebench measures diskserve serving an image from an HTTP
// server side by side with nbdkit's curl plugin (under its cache and
// readahead filters, as a user would stack them) and qemu-nbd over qemu's
// curl driver, in one run on one machine, and prints Markdown tables.
//
// One nginx serves a 1 GiB raw image of random data; a proxy in front of
// it counts the bytes each server fetches and adds a latency to every
// request (0 and, standing in for S3, 5 ms). Every job starts a server
// with nothing cached (diskserve with an empty cache directory):
//
//   - cold 1M sequential read at QD4: fio reads the whole image once;
//   - cold 4k random read at QD16 for -runtime;
//   - a boot-like trace of scattered reads and short sequential runs:
//     bytes fetched over bytes of 1 MiB chunks the trace touches.
//
// Then, for diskserve alone: the same image fully cached (after
// --prefetch=all) against the local file served by diskserve, and a
// restart, counting the bytes fetched again.
//
// Run it from the module root (it builds ./cmd/diskserve):
//
//	go run ./bench/remotebench -rounds 2
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/diskserve/diskserve/bench/internal/fio"
	"github.com/diskserve/diskserve/export/nbd"
	"github.com/diskserve/diskserve/internal/remotetest"
)

const imageSize = 1 << 30

type peer struct {
	name  string
	start func(url, sock, cache string) *exec.Cmd
}

func peers(diskserve string, extra []string) []peer {
	return []peer{
		{"diskserve", func(url, sock, cache string) *exec.Cmd {
			return exec.Command(diskserve, append([]string{"serve", "-r", "-f", "raw", "--cache-dir", cache, "--listen", "unix:" + sock, url}, extra...)...)
		}},
		{"nbdkit-curl", func(url, sock, _ string) *exec.Cmd {
			// The first filter is nearest the client: readahead asks
			// the cache to fetch ahead, the cache keeps what curl got.
			return exec.Command("nbdkit", "--foreground", "--exit-with-parent", "-r", "-U", sock,
				"--filter=readahead", "--filter=cache", "curl", url, "cache-on-read=true")
		}},
		{"qemu-nbd-curl", func(url, sock, _ string) *exec.Cmd {
			return exec.Command("qemu-nbd", "-r", "-f", "raw", "-t", "-k", sock, url)
		}},
	}
}

func main() {
	runtime := flag.Duration("runtime", 3*time.Second, "time of the random-read job")
	rounds := flag.Int("rounds", 2, "rounds of every job; figures are medians")
	flags := flag.String("flags", "", "more flags for diskserve serve, space-separated (--chunk-size 256K)")
	only := flag.String("peers", "diskserve,nbdkit-curl,qemu-nbd-curl", "the servers to measure, comma-separated")
	jobsFlag := flag.String("jobs", "seq,rand,trace", "the jobs to run, comma-separated")
	flag.Parse()
	log.SetFlags(0)
	dir, bin := fio.Setup("remotebench")
	defer os.RemoveAll(dir)
	www := filepath.Join(dir, "www")
	os.Mkdir(www, 0o755)
	img := filepath.Join(www, "disk.raw")
	fio.WriteRandom(img, imageSize, [][2]int64{{0, imageSize}})
	content, err := os.ReadFile(img)
	if err != nil {
		log.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	nginx, err := remotetest.NginxCommand(dir, addr, www)
	if err != nil {
		log.Fatal(err)
	}
	if err := nginx.Start(); err != nil {
		log.Fatal(err)
	}
	defer func() {
		// SIGINT, not SIGKILL: the master stops its workers, which a
		// killed master would leave behind.
		nginx.Process.Signal(os.Interrupt)
		nginx.Wait()
	}()
	waitTCP(addr)
	proxy, stop, err := remotetest.StartProxy("http://" + addr)
	if err != nil {
		log.Fatal(err)
	}
	defer stop()
	url := proxy.URL + "/disk.raw"
	ps := slices.DeleteFunc(peers(bin, strings.Fields(*flags)), func(p peer) bool { return !slices.Contains(strings.Split(*only, ","), p.name) })
	trace := bootTrace()

	type key struct{ job, peer string }
	results := map[key][]float64{}
	fetched := map[key][]float64{}
	jobs := []string{"cold 1M sequential read QD4 (MiB/s)", "cold 4k random read QD16 (IOPS)", "boot trace (s)"}
	jobKeys := []string{"seq", "rand", "trace"}
	for _, lat := range []time.Duration{0, 5 * time.Millisecond} {
		proxy.SetLatency(lat)
		for round := range *rounds {
			order := slices.Concat(ps[round%len(ps):], ps[:round%len(ps)])
			for ji, job := range jobs {
				if !slices.Contains(strings.Split(*jobsFlag, ","), jobKeys[ji]) {
					continue
				}
				for _, p := range order {
					k := key{fmt.Sprintf("%s, %v latency", job, lat), p.name}
					before := proxy.Bytes.Load()
					v := withServer(p, url, dir, func(uri, sock string) float64 {
						switch ji {
						case 0:
							return fioOnce(uri, "--rw=read", "--bs=1m", "--iodepth=4")
						case 1:
							v, ok := fio.TryRun(fio.Job{Name: job, Args: []string{"--rw=randread", "--bs=4k", "--iodepth=16"}, Unit: "IOPS"},
								[]string{"--ioengine=nbd", "--uri=" + uri}, *runtime, imageSize)
							if !ok {
								log.Printf("fio %s: no result after its runtime: the server stopped answering", job)
								return math.NaN()
							}
							return v
						}
						return replay(sock, trace, content)
					})
					got := float64(proxy.Bytes.Load() - before)
					log.Printf("latency %v round %d %-14s %-36s %10.2f, %6.0f MiB fetched", lat, round+1, p.name, job, v, got/(1<<20))
					if math.IsNaN(v) { // a run that hung fetched only part of what it would have
						got = math.NaN()
					}
					results[k] = append(results[k], v)
					fetched[k] = append(fetched[k], got)
				}
			}
		}
	}
	header, rule := "| job |", "|---|"
	for _, p := range ps {
		header, rule = header+" "+p.name+" |", rule+"---|"
	}
	fmt.Println(header + " first / better other |")
	fmt.Println(rule + "---|")
	// rows calls row with each job's name, per latency, that m has figures of.
	rows := func(m map[key][]float64, row func(job, name string)) {
		for _, lat := range []time.Duration{0, 5 * time.Millisecond} {
			for _, job := range jobs {
				if name := fmt.Sprintf("%s, %v latency", job, lat); len(m[key{name, ps[0].name}]) > 0 {
					row(job, name)
				}
			}
		}
	}
	rows(results, func(job, name string) {
		fmt.Printf("| %s |", name)
		var first float64
		var others []float64 // the other servers' medians, hung ones left out
		for i, p := range ps {
			v := median(results[key{name, p.name}])
			if math.IsNaN(v) {
				fmt.Print(" hung |")
			} else {
				fmt.Printf(" %.1f |", v)
			}
			if i == 0 {
				first = v
			} else if !math.IsNaN(v) {
				others = append(others, v)
			}
		}
		if len(others) == 0 || math.IsNaN(first) {
			fmt.Println(" |")
			return
		}
		ratio := first / slices.Max(others)
		if strings.HasSuffix(job, "(s)") { // a time: the better peer's over ours
			ratio = slices.Min(others) / first
		}
		fmt.Printf(" %.2f |\n", ratio)
	})
	distinct := traceChunks(trace)
	fmt.Println("\n" + strings.Replace(header, "job", "bytes fetched (MiB)", 1))
	fmt.Println(rule)
	rows(fetched, func(_, name string) {
		fmt.Printf("| %s |", name)
		for _, p := range ps {
			if v := median(fetched[key{name, p.name}]); math.IsNaN(v) {
				fmt.Print(" hung |")
			} else {
				fmt.Printf(" %.0f |", v/(1<<20))
			}
		}
		fmt.Println()
	})
	fmt.Printf("\nThe boot trace reads %d MiB touching %d MiB of 1 MiB chunks.\n", traceBytes(trace)>>20, distinct>>20)
	if ps[0].name == "diskserve" {
		warmAndRestart(bin, url, img, dir, proxy, *runtime)
	}
}

// warmAndRestart compares diskserve serving the image from a full cache
// with diskserve serving the local file, and counts what a restart
// fetches.
func warmAndRestart(bin, url, img, dir string, proxy *remotetest.Proxy, runtime time.Duration) {
	proxy.SetLatency(0)
	cache := filepath.Join(dir, "warm-cache")
	os.RemoveAll(cache)
	fill := exec.Command(bin, "convert", "--cache-dir", cache, "-f", "raw", "-O", "raw", url, filepath.Join(dir, "copy.raw"))
	if out, err := fill.CombinedOutput(); err != nil {
		log.Fatalf("fill: %v\n%s", err, out)
	}
	os.Remove(filepath.Join(dir, "copy.raw"))
	remote := peer{"diskserve-cached", func(url, sock, _ string) *exec.Cmd {
		return exec.Command(bin, "serve", "-r", "-f", "raw", "--cache-dir", cache, "--listen", "unix:"+sock, url)
	}}
	local := peer{"diskserve-local", func(_, sock, _ string) *exec.Cmd {
		return exec.Command(bin, "serve", "-r", "-f", "raw", "--listen", "unix:"+sock, img)
	}}
	jobs := []fio.Job{
		{Name: "4k random read QD16", Args: []string{"--rw=randread", "--bs=4k", "--iodepth=16"}, Unit: "IOPS"},
		{Name: "1M sequential read QD4", Args: []string{"--rw=read", "--bs=1m", "--iodepth=4"}, Unit: "MiB/s"},
	}
	fmt.Println("\n| fully cached | remote image, cached | local file | ratio |\n|---|---|---|---|")
	before := proxy.Bytes.Load()
	for _, j := range jobs {
		var a, b []float64
		for range 3 {
			fio.Warm(img)
			data, _ := filepath.Glob(filepath.Join(cache, "*", "data"))
			for _, f := range data {
				fio.Warm(f)
			}
			a = append(a, withServer(remote, url, dir, func(uri, _ string) float64 {
				return fio.Run(j, []string{"--ioengine=nbd", "--uri=" + uri}, runtime, imageSize)
			}))
			b = append(b, withServer(local, url, dir, func(uri, _ string) float64 {
				return fio.Run(j, []string{"--ioengine=nbd", "--uri=" + uri}, runtime, imageSize)
			}))
		}
		fmt.Printf("| %s (%s) | %.0f | %.0f | %.2f |\n", j.Name, j.Unit, fio.Median(a), fio.Median(b), fio.Median(a)/fio.Median(b))
	}
	fmt.Printf("\nRestarted servers on the full cache fetched %d bytes of data.\n", proxy.Bytes.Load()-before)
}

// withServer starts p for url with an empty cache, runs fn against it and
// stops it.
func withServer(p peer, url, dir string, fn func(uri, sock string) float64) float64 {
	sock := filepath.Join(dir, "nbd.sock")
	os.Remove(sock)
	cache, err := os.MkdirTemp(dir, "cache")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(cache)
	uri, stop := fio.StartNBD(p.name, p.start(url, sock, cache), sock)
	defer stop()
	return fn(uri, sock)
}

// onceLimit bounds one read of the whole image, and one replay of the
// trace: a server that stops answering (qemu-nbd over curl has, with its
// connections to the proxy idle) would otherwise hold the run for ever.
const onceLimit = 5 * time.Minute

// median is the median of the rounds that did not hang, or NaN if all
// did.
func median(vs []float64) float64 {
	vs = slices.DeleteFunc(slices.Clone(vs), math.IsNaN)
	if len(vs) == 0 {
		return math.NaN()
	}
	return fio.Median(vs)
}

// fioOnce reads the whole export once with fio's nbd engine and returns
// MiB/s, or NaN when the server stopped answering: the run goes on, and
// the tables say "hung".
func fioOnce(uri string, args ...string) float64 {
	ctx, cancel := context.WithTimeout(context.Background(), onceLimit)
	defer cancel()
	out, err := fio.Command(ctx, append([]string{"--name=once", "--ioengine=nbd", "--uri=" + uri, "--size=" + strconv.Itoa(imageSize), "--output-format=json"}, args...)...).Output()
	if ctx.Err() != nil {
		log.Printf("fio: the image not read in %v: the server stopped answering", onceLimit)
		return math.NaN()
	}
	if err != nil {
		log.Fatalf("fio: %v\n%s", err, out)
	}
	var res struct {
		Jobs []struct{ Read struct{ BW float64 } }
	}
	if i := bytes.IndexByte(out, '{'); i < 0 || json.Unmarshal(out[i:], &res) != nil || len(res.Jobs) == 0 {
		log.Fatalf("fio: no result in\n%s", out)
	}
	return res.Jobs[0].Read.BW / 1024
}

// bootTrace is a boot-like read pattern: scattered reads of 4 to 128 KiB
// and a few sequential runs of 1 to 4 MiB, over the image.
func bootTrace() [][2]int64 {
	rnd := rand.New(rand.NewPCG(7, 7))
	var trace [][2]int64
	for len(trace) < 400 {
		if rnd.IntN(10) < 2 {
			off := rnd.Int64N(imageSize-8<<20) &^ 4095
			for o := off; o < off+(1+rnd.Int64N(4))<<20; o += 128 << 10 {
				trace = append(trace, [2]int64{o, 128 << 10})
			}
			continue
		}
		n := (1 + rnd.Int64N(32)) * 4096
		trace = append(trace, [2]int64{rnd.Int64N(imageSize-n) &^ 4095, n})
	}
	return trace
}

func traceBytes(trace [][2]int64) (n int64) {
	for _, r := range trace {
		n += r[1]
	}
	return n
}

// traceChunks is the bytes of the 1 MiB chunks the trace touches.
func traceChunks(trace [][2]int64) int64 {
	touched := map[int64]bool{}
	for _, r := range trace {
		for c := r[0] >> 20; c <= (r[0]+r[1]-1)>>20; c++ {
			touched[c] = true
		}
	}
	return int64(len(touched)) << 20
}

// replay reads the trace through the export at sock, one request at a
// time as a booting guest mostly does, checks the bytes and returns the
// seconds it took, or NaN when the server stopped answering.
func replay(sock string, trace [][2]int64, content []byte) float64 {
	c, err := nbd.Dial("unix", sock, "")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		for _, r := range trace {
			p := make([]byte, r[1])
			if _, err := c.ReadAt(p, r[0]); err != nil {
				done <- err
				return
			}
			if !bytes.Equal(p, content[r[0]:r[0]+r[1]]) {
				done <- fmt.Errorf("trace: wrong bytes at %d", r[0])
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			log.Fatal(err)
		}
		return time.Since(start).Seconds()
	case <-time.After(onceLimit):
		// Closing the connection (deferred) ends the reads.
		log.Printf("trace: not replayed in %v: the server stopped answering", onceLimit)
		return math.NaN()
	}
}

func waitTCP(addr string) {
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			log.Fatalf("nothing listens on %s", addr)
		}
	}
}
