package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/diskserve/diskserve/internal/testtool"
)

// TestLiveOverlay puts a live overlay on a raw export while fio writes
// through NBD: fio sees no error, the raw image keeps exactly what was
// written before the snapshot, and the overlay over it holds what was
// written after. The control API lists the new chain, and /metrics parses
// and counts the writes the test sent.
func TestLiveOverlay(t *testing.T) {
	testtool.Need(t, "fio")
	dir := t.TempDir()
	img := image(t, dir, "disk.raw", "64M")
	sock, ctl := filepath.Join(dir, "s.sock"), filepath.Join(dir, "ctl.sock")
	uri := "nbd+unix:///?socket=" + sock
	s := startServe(t, exec.Command(diskserveBin, "serve", "-f", "raw", "--control", "unix:"+ctl, "--listen", "unix:"+sock, img))
	if st, err := os.Stat(ctl); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("control socket: %v, %v", st, err)
	}

	// Before the snapshot: 5 writes of 64 KiB, counted below.
	var cmds []string
	for i := range 5 {
		cmds = append(cmds, "write -P 17 "+strconv.Itoa(i<<16)+" 64k")
	}
	testtool.Run(t, "qemu-io", append(append([]string{"-f", "raw"}, qemuIOArgs(cmds)...), uri)...)
	text := mustRun(t, "control", "--socket", ctl, "metrics")
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, text)
	}
	value := func(name, op string) float64 {
		for _, m := range families[name].GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "op" && l.GetValue() == op {
					return m.GetCounter().GetValue()
				}
			}
		}
		return -1
	}
	if n, b := value("diskserve_requests_total", "write"), value("diskserve_bytes_total", "write"); n != 5 || b != 5*65536 {
		t.Errorf("metrics count %v writes of %v bytes, want 5 of %d", n, b, 5*65536)
	}

	fio := exec.Command("fio", "--name=live", "--ioengine=nbd", "--uri="+uri, "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--offset=32m", "--size=32m", "--time_based", "--runtime=3")
	var fioOut bytes.Buffer
	fio.Stdout, fio.Stderr = &fioOut, &fioOut
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	overlay := filepath.Join(dir, "after.qcow2")
	mustRun(t, "control", "--socket", ctl, "overlay", overlay)
	// After the snapshot.
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 34 64k 64k", uri)
	list := mustRun(t, "control", "--socket", ctl, "list")
	if !strings.Contains(list, overlay+" (qcow2) <- "+img+" (raw)") {
		t.Errorf("control list does not show the new chain:\n%s", list)
	}
	if err := fio.Wait(); err != nil {
		t.Fatalf("fio failed across the snapshot: %v\n%s", err, fioOut.String())
	}
	if _, stderr, code := run(t, nil, "control", "--socket", ctl, "overlay", overlay); code == 0 || !strings.Contains(stderr, "exists") {
		t.Errorf("a second snapshot onto the same overlay: exit %d, %s", code, stderr)
	}
	// The overlay's metadata reaches its file with a flush; qemu-img then
	// reads it beside the running server (-U).
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "flush", uri)
	raw, _ := os.ReadFile(img)
	if !bytes.Equal(raw[:5<<16], bytes.Repeat([]byte{17}, 5<<16)) {
		t.Fatal("the snapshot image does not hold what was written before the snapshot")
	}
	testtool.Run(t, "qemu-img", "check", "-U", overlay)
	merged := filepath.Join(dir, "merged.raw")
	testtool.Run(t, "qemu-img", "convert", "-U", "-O", "raw", overlay, merged)
	after, _ := os.ReadFile(merged)
	want := bytes.Repeat([]byte{17}, 5<<16)
	copy(want[64<<10:], bytes.Repeat([]byte{34}, 64<<10))
	if !bytes.Equal(after[:5<<16], want) {
		t.Fatal("the overlay over the snapshot does not hold everything written")
	}

	// Commit, live: the raw image then holds everything, the overlay is
	// gone, and the export goes on serving the raw image.
	mustRun(t, "control", "--socket", ctl, "commit")
	if _, err := os.Stat(overlay); err == nil {
		t.Error("the overlay is still there after commit")
	}
	testtool.Run(t, "qemu-io", "-f", "raw", "-c", "read -P 34 64k 64k", "-c", "write -P 51 128k 4k", uri)
	if list := mustRun(t, "control", "--socket", ctl, "list"); !strings.Contains(list, img+" (raw)") || strings.Contains(list, "qcow2") {
		t.Errorf("after commit, control list shows:\n%s", list)
	}
	if code := s.stop(t, syscall.SIGTERM); code != 0 {
		t.Fatalf("serve exit status %d:\n%s", code, s.stderr)
	}
	raw, _ = os.ReadFile(img)
	copy(want[128<<10:], bytes.Repeat([]byte{51}, 4<<10))
	if !bytes.Equal(raw[:5<<16], want) {
		t.Fatal("after commit the raw image does not hold everything written")
	}
	if !bytes.Equal(raw[32<<20:64<<20], after[32<<20:64<<20]) {
		t.Fatal("after commit the raw image lacks fio's writes")
	}
}
