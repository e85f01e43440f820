package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/internal/testtool"
)

// TestCrashConsistency serves a qcow2 image, and a composite of two qcow2
// components, runs a random workload of writes, discards and zero writes
// against it through qemu-io over NBD, and kills the server with SIGKILL
// at a random moment, many times. After each kill: qemu-img check finds no
// corruption in any qcow2 (leaked clusters are allowed: diskserve check -r
// leaks repairs them, and then qemu-img check is clean), and every write
// acknowledged before a completed flush is still there. The same for VDI,
// VHD, VHDX and VMDK images: qemu-img check where qemu has one (VHD has
// none: diskserve check then).
func TestCrashConsistency(t *testing.T) {
	testtool.Need(t, "qemu-io")
	t.Run("qcow2", func(t *testing.T) {
		dir := t.TempDir()
		img := filepath.Join(dir, "crash.qcow2")
		mustRun(t, "create", "-f", "qcow2", "-o", "cluster_size=4096", img, "64M")
		crashLoop(t, dir, []string{"-f", "qcow2", img}, []string{img})
	})
	t.Run("qcow2-extended-l2-overlay", func(t *testing.T) {
		dir := t.TempDir()
		base, img := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "crash.qcow2")
		mustRun(t, "create", "-f", "qcow2", base, "64M")
		testtool.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 64M", base)
		mustRun(t, "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32768", "-b", base, "-F", "qcow2", img)
		crashLoop(t, dir, []string{"-f", "qcow2", img}, []string{img})
	})
	t.Run("composite-over-qcow2", func(t *testing.T) {
		dir := t.TempDir()
		a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
		// Flushed writes go to the first 16 MiB, the workload to the rest:
		// both reach both components.
		mustRun(t, "create", "-f", "qcow2", "-o", "cluster_size=4096", a, "8M")
		mustRun(t, "create", "-f", "qcow2", "-o", "cluster_size=65536", b, "56M")
		comp := filepath.Join(dir, "crash.composite")
		spec := &composite.Spec{Version: 2, Length: 64 << 20, Components: []composite.Component{
			{Path: "a.qcow2", Writable: true}, {Path: "b.qcow2", Offset: 8 << 20, Writable: true},
		}}
		if err := os.WriteFile(comp, spec.Marshal(), 0o644); err != nil {
			t.Fatal(err)
		}
		crashLoop(t, dir, []string{"-f", "composite", comp}, []string{a, b})
	})
	// The block-table formats, as qemu-img makes them.
	for _, f := range []struct{ name, fmt string }{{"vdi", "vdi"}, {"vhd", "vpc"}, {"vhdx", "vhdx"}, {"vmdk", "vmdk"}} {
		t.Run(f.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "crash."+f.name)
			testtool.Run(t, "qemu-img", "create", "-q", "-f", f.fmt, img, "64M")
			crashLoop(t, dir, []string{"-f", f.fmt, img}, []string{img})
		})
	}
}

// crashLoop runs the kill loop against the image that serve args name,
// whose qcow2 files are images.
func crashLoop(t *testing.T, dir string, args, images []string) {
	sock := filepath.Join(dir, "nbd.sock")
	uri := "nbd+unix:///?socket=" + sock
	serve := func(extra ...string) *server {
		return startServe(t, exec.Command(diskserveBin, append(append([]string{"serve", "--listen", "unix:" + sock}, extra...), args...)...))
	}
	rnd := rand.New(rand.NewPCG(11, 12))
	const rounds = 12
	durable := map[int64]byte{} // 64 KiB slot of the first 16 MiB -> pattern flushed there
	interrupted, leaky := 0, 0
	for round := range rounds {
		srv := serve()

		// Durable writes: each slot written, then a flush that completes.
		var cmds []string
		for range 4 {
			slot := rnd.Int64N(256)
			pattern := byte(round*4 + 1 + len(cmds))
			cmds = append(cmds, fmt.Sprintf("write -P %d %d 65536", pattern, slot<<16))
			durable[slot] = pattern
		}
		testtool.Run(t, "qemu-io", append(qemuIOArgs(cmds), "-c", "flush", uri)...)

		// Then a workload in the rest of the disk, cut short by SIGKILL.
		cmds = nil
		for range 3000 {
			off := 16<<20 + rnd.Int64N(48<<20-256<<10)
			n := 512 * (1 + rnd.Int64N(400))
			switch rnd.IntN(5) {
			case 0:
				cmds = append(cmds, fmt.Sprintf("discard %d %d", off&^4095, n&^4095+4096))
			case 1:
				cmds = append(cmds, fmt.Sprintf("write -z %d %d", off, n))
			case 2:
				cmds = append(cmds, "flush")
			default:
				cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", rnd.IntN(255)+1, off, n))
			}
		}
		workload := exec.Command(testtool.Need(t, "qemu-io"), append(qemuIOArgs(cmds), uri)...)
		if err := workload.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(10+rnd.IntN(300)) * time.Millisecond)
		srv.cmd.Process.Signal(syscall.SIGKILL)
		<-srv.done
		srv.done <- nil // for startServe's cleanup
		if err := workload.Wait(); err != nil || workload.ProcessState.ExitCode() != 0 {
			interrupted++
		}

		for _, img := range images {
			cmd := exec.Command("qemu-img", "check", "--output=json", img)
			out, _ := cmd.Output()
			if cmd.ProcessState.ExitCode() == 63 { // qemu has no check for the format
				out, errOut, code := run(t, nil, "check", img)
				if code == checkLeaks { // leaked space is allowed, and repaired
					leaky++
					if _, errOut, code := run(t, nil, "check", "-r", "leaks", img); code != 0 {
						t.Fatalf("round %d: check -r leaks %s: exit %d: %s", round, img, code, errOut)
					}
					out, errOut, code = run(t, nil, "check", img)
				}
				if code != 0 {
					t.Fatalf("round %d: diskserve check %s after SIGKILL: exit %d: %s%s", round, img, code, out, errOut)
				}
				continue
			}
			var res struct{ Corruptions, Leaks int }
			if err := json.Unmarshal(out, &res); err != nil {
				t.Fatalf("round %d: qemu-img check %s: %v\n%s", round, img, err, out)
			}
			if res.Corruptions != 0 {
				human, _ := exec.Command("qemu-img", "check", img).CombinedOutput()
				t.Fatalf("round %d: corruption in %s after SIGKILL:\n%s", round, img, human)
			}
			if res.Leaks > 0 {
				leaky++
				if _, errOut, code := run(t, nil, "check", "-r", "leaks", img); code != 0 {
					t.Fatalf("round %d: check -r leaks %s: exit %d: %s", round, img, code, errOut)
				}
				testtool.Run(t, "qemu-img", "check", img)
			}
		}
		var reads []string
		for slot, pattern := range durable {
			reads = append(reads, fmt.Sprintf("read -P %d %d 65536", pattern, slot<<16))
		}
		reader := serve("-r")
		out := string(testtool.Run(t, "qemu-io", append(append([]string{"-r", "-f", "raw"}, qemuIOArgs(reads)...), uri)...))
		reader.stop(t, syscall.SIGTERM)
		if strings.Contains(out, "Pattern verification failed") {
			t.Fatalf("round %d: a flushed write is missing:\n%s", round, out)
		}
	}
	// A test that never cut a workload short would prove nothing.
	if interrupted < rounds/2 {
		t.Fatalf("only %d of %d workloads were cut short by the kill", interrupted, rounds)
	}
	t.Logf("%d of %d workloads cut short; %d left leaked clusters, all repaired", interrupted, rounds, leaky)
}

func qemuIOArgs(cmds []string) []string {
	var args []string
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return args
}
