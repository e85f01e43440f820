// Command vhostbench measures diskserve's vhost-user-blk back-end against
// qemu-storage-daemon's, without a guest: a front-end in this process
// (internal/vhostfront, what a VMM does) drives one queue of each back-end
// on the same raw image (1 GiB of random data, in the page cache) with
// 4k random reads and writes at QD16 and QD1 and 1M sequential reads and
// writes at QD4, the back-ends taking turns. It reports IOPS, MiB/s and
// the back-end's CPU time per request (user and system, from
// /proc/PID/stat), since under a guest the guest's CPU, not the
// back-end's, would set the pace.
//
// With -guest it boots a Linux guest under qemu (TCG: this machine has no
// KVM) instead, with the kernel testdata/guest/fetch-kernel.sh fetches,
// and runs O_DIRECT jobs inside it (guestio, a small static program) on
// its virtio disk: diskserve's vhost-user-blk device, the same image over
// diskserve's NBD server through qemu's NBD client, and
// qemu-storage-daemon's vhost-user-blk export.
//
//	go run ./bench/vhostbench [-runtime 5s] [-rounds 3] [-guest]
package main

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/diskserve/diskserve/bench/internal/fio"
	"github.com/diskserve/diskserve/internal/vhostfront"
)

type job struct {
	name  string
	write bool
	bs    int
	qd    int
	seq   bool
}

var jobs = []job{
	{"4k random read QD16", false, 4096, 16, false},
	{"4k random write QD16", true, 4096, 16, false},
	{"4k random read QD1", false, 4096, 1, false},
	{"4k random write QD1", true, 4096, 1, false},
	{"1M sequential read QD4", false, 1 << 20, 4, true},
	{"1M sequential write QD4", true, 1 << 20, 4, true},
}

const size = 1 << 30

func main() {
	runtime := flag.Duration("runtime", 5*time.Second, "time per job")
	rounds := flag.Int("rounds", 3, "rounds; figures are medians")
	inGuest := flag.Bool("guest", false, "measure inside a TCG guest")
	flag.Parse()
	log.SetFlags(0)
	dir, bin := fio.Setup("vhostbench")
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "disk.raw")
	fio.WriteRandom(img, size, [][2]int64{{0, size}})
	if *inGuest {
		guest(dir, bin, img, *runtime, *rounds)
		return
	}
	sock := filepath.Join(dir, "vhost.sock")
	servers := []struct {
		name string
		cmd  func() *exec.Cmd
	}{
		{"diskserve", func() *exec.Cmd {
			return exec.Command(bin, "serve", "--vhost-user-blk", sock, "--queues", "1", img)
		}},
		{"qemu-storage-daemon", func() *exec.Cmd {
			return exec.Command("qemu-storage-daemon",
				"--blockdev", "driver=file,node-name=f,filename="+img,
				"--blockdev", "driver=raw,node-name=r,file=f",
				"--export", "type=vhost-user-blk,id=e,node-name=r,addr.type=unix,addr.path="+sock+",writable=on,num-queues=1")
		}},
	}
	type result struct{ rate, cpu []float64 }
	results := map[string]map[string]*result{}
	for round := range *rounds {
		for _, j := range jobs {
			order := slices.Clone(servers)
			if round%2 == 1 {
				slices.Reverse(order)
			}
			for _, s := range order {
				fio.Warm(img)
				os.Remove(sock)
				cmd := s.cmd()
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				if err := cmd.Start(); err != nil {
					log.Fatalf("%s: %v", s.name, err)
				}
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
					if _, err := os.Stat(sock); err == nil {
						break
					}
					if time.Now().After(deadline) {
						log.Fatalf("%s did not start: %s", s.name, stderr.String())
					}
				}
				ops, cpu, err := drive(sock, j, *runtime, cmd.Process.Pid)
				cmd.Process.Signal(os.Interrupt)
				cmd.Wait()
				if err != nil {
					log.Fatalf("%s, %s: %v\n%s", s.name, j.name, err, stderr.String())
				}
				rate := float64(ops) / runtime.Seconds()
				unit := "IOPS"
				if j.bs == 1<<20 {
					rate, unit = rate*float64(j.bs)/(1<<20), "MiB/s"
				}
				perOp := cpu.Seconds() * 1e6 / float64(ops)
				log.Printf("round %d %-20s %-24s %9.0f %s  %5.1f µs CPU per request", round+1, s.name, j.name, rate, unit, perOp)
				if results[j.name] == nil {
					results[j.name] = map[string]*result{}
				}
				r := results[j.name][s.name]
				if r == nil {
					r = &result{}
					results[j.name][s.name] = r
				}
				r.rate = append(r.rate, rate)
				r.cpu = append(r.cpu, perOp)
			}
		}
	}
	fmt.Println("| job | diskserve | qemu-storage-daemon | ratio | CPU µs per request (diskserve / qsd) |")
	fmt.Println("|---|---|---|---|---|")
	for _, j := range jobs {
		d, q := results[j.name]["diskserve"], results[j.name]["qemu-storage-daemon"]
		fmt.Printf("| %s | %.0f | %.0f | %.2f | %.1f / %.1f |\n", j.name, fio.Median(d.rate), fio.Median(q.rate),
			fio.Median(d.rate)/fio.Median(q.rate), fio.Median(d.cpu), fio.Median(q.cpu))
	}
	fmt.Printf("\nOne queue, the front-end in the harness, a 1 GiB raw image of random data in the page cache; %v per job, medians of %d rounds, back-ends alternating.\n", *runtime, *rounds)
}

// drive runs job j against the back-end at sock for d and returns the
// requests completed and the CPU time the back-end (process pid) used.
func drive(sock string, j job, d time.Duration, pid int) (int, time.Duration, error) {
	f, err := vhostfront.Dial(sock, 64<<20)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	_, qs, err := f.Setup(1, 128, true, false)
	if err != nil {
		return 0, 0, err
	}
	q := qs[0]
	type slot struct{ hdr, data, status uint64 }
	slots := make([]slot, j.qd)
	byHead := map[uint16]int{}
	for i := range slots {
		slots[i] = slot{hdr: f.Alloc(16, 16), status: f.Alloc(1, 1), data: f.Alloc(uint64(j.bs), 4096)}
	}
	rnd := rand.New(rand.NewPCG(1, 2))
	next := int64(0)
	submit := func(i int) error {
		s := slots[i]
		var off int64
		if j.seq {
			off, next = next, (next+int64(j.bs))%size
		} else {
			off = rnd.Int64N(size/int64(j.bs)) * int64(j.bs)
		}
		typ := uint32(0)
		if j.write {
			typ = 1
		}
		binary.LittleEndian.PutUint32(f.Mem[s.hdr:], typ)
		binary.LittleEndian.PutUint64(f.Mem[s.hdr+8:], uint64(off/512))
		f.Mem[s.status] = 0xff
		head, err := q.Add(vhostfront.Seg{Addr: s.hdr, Len: 16}, vhostfront.Seg{Addr: s.data, Len: uint32(j.bs), Write: !j.write}, vhostfront.Seg{Addr: s.status, Len: 1, Write: true})
		byHead[head] = i
		return err
	}
	cpu0 := cpuTime(pid)
	old := q.AvailIdx()
	for i := range slots {
		if err := submit(i); err != nil {
			return 0, 0, err
		}
	}
	q.KickIfWanted(old, true)
	done := 0
	var used []vhostfront.Used
	var free []int
	for end := time.Now().Add(d); time.Now().Before(end); {
		used = q.Reap(used[:0])
		if len(used) == 0 {
			if !q.WaitCall(time.Second) {
				return done, 0, fmt.Errorf("no completion in a second")
			}
			continue
		}
		old := q.AvailIdx()
		free = free[:0]
		for _, u := range used { // all of them before any head is reused
			i := byHead[u.Head]
			if st := f.Mem[slots[i].status]; st != 0 {
				return done, 0, fmt.Errorf("request status %d", st)
			}
			free = append(free, i)
		}
		for _, i := range free {
			done++
			if err := submit(i); err != nil {
				return done, 0, err
			}
		}
		q.KickIfWanted(old, true)
	}
	return done, cpuTime(pid) - cpu0, nil
}

// cpuTime returns the user and system time of process pid.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		log.Fatal(err)
	}
	fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / 100 // USER_HZ
}
