// Command guestio is the I/O load vhostbench runs inside its guest, where
// fio (and its 80 MB of libraries) would not fit an initramfs: one job of
// O_DIRECT reads or writes on a block device, qd goroutines each with one
// request in flight, for a fixed time. It prints
// "GUESTIO <job> <requests> <seconds>".
//
//	guestio -dev /dev/vda -job randread -bs 4096 -qd 16 -t 5s
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	dev := flag.String("dev", "/dev/vda", "block device")
	job := flag.String("job", "randread", "randread, randwrite, read or write")
	bs := flag.Int("bs", 4096, "request size")
	qd := flag.Int("qd", 16, "requests in flight")
	d := flag.Duration("t", 5*time.Second, "run time")
	flag.Parse()
	write := *job == "randwrite" || *job == "write"
	random := *job == "randread" || *job == "randwrite"
	mode := unix.O_RDONLY
	if write {
		mode = unix.O_RDWR
	}
	fd, err := unix.Open(*dev, mode|unix.O_DIRECT, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	size, err := unix.IoctlGetInt(fd, unix.BLKGETSIZE64)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	blocks := int64(size) / int64(*bs)
	var ops, next atomic.Int64
	var failed atomic.Bool
	end := time.Now().Add(*d)
	var wg sync.WaitGroup
	for g := range *qd {
		wg.Go(func() {
			buf, _ := unix.Mmap(-1, 0, *bs, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS) // page aligned
			rnd := rand.New(rand.NewPCG(uint64(g), 7))
			for time.Now().Before(end) {
				b := next.Add(1) % blocks
				if random {
					b = rnd.Int64N(blocks)
				}
				var err error
				if write {
					_, err = unix.Pwrite(fd, buf, b*int64(*bs))
				} else {
					_, err = unix.Pread(fd, buf, b*int64(*bs))
				}
				if err != nil {
					failed.Store(true)
					return
				}
				ops.Add(1)
			}
		})
	}
	start := time.Now()
	wg.Wait()
	if failed.Load() {
		fmt.Println("GUESTIO-ERROR", *job)
		os.Exit(1)
	}
	fmt.Printf("GUESTIO %s-%d-qd%d %d %.3f\n", *job, *bs, *qd, ops.Load(), time.Since(start).Seconds())
}
