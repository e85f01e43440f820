// Package fio runs fio jobs and makes the images the benchmark harnesses
// in bench/ share.
package fio

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"time"
)

// A Job is one fio workload: its name in tables, the fio arguments that
// set its pattern (the first is --rw=...), and the unit of its figure.
type Job struct {
	Name string
	Args []string
	Unit string // "IOPS" or "MiB/s"
}

// Run runs j for runtime over size bytes of the target that target names
// (--filename=... or --ioengine=nbd --uri=...) and returns its IOPS or
// MiB/s, summed over its jobs (--numjobs). A failure ends the benchmark.
func Run(j Job, target []string, runtime time.Duration, size int64) float64 {
	args := append([]string{"--name=bench", fmt.Sprintf("--size=%d", size), "--time_based", "--group_reporting",
		fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())), "--output-format=json"}, target...)
	out, err := exec.Command("fio", append(args, j.Args...)...).Output()
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
		return r.IOPS
	}
	return r.BWKiB / 1024
}

// WriteRandom makes a file of size bytes with the same random data on
// every run in each [offset, length] span, and holes elsewhere.
func WriteRandom(path string, size int64, spans [][2]int64) {
	f, err := os.Create(path)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		log.Fatal(err)
	}
	rnd := rand.New(rand.NewPCG(1, 1))
	buf := make([]byte, 1<<20)
	for _, s := range spans {
		for off := s[0]; off < s[0]+s[1]; off += int64(len(buf)) {
			for i := 0; i < len(buf); i += 8 {
				v := rnd.Uint64()
				for k := range 8 {
					buf[i+k] = byte(v >> (8 * k))
				}
			}
			if _, err := f.WriteAt(buf[:min(int64(len(buf)), s[0]+s[1]-off)], off); err != nil {
				log.Fatal(err)
			}
		}
	}
	if err := f.Sync(); err != nil {
		log.Fatal(err)
	}
}
