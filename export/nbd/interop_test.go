package nbd

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/internal/testtool"
)

// These tests drive the server with the clients people use: qemu-img,
// qemu-io, nbdinfo, nbdcopy, fio and nbdfuse.

// rawImage writes a sparse raw image with random data in a few places.
func rawImage(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	rnd := mrand.New(mrand.NewPCG(5, 6))
	for _, off := range []int64{0, 3 << 20, size / 2, size - 100<<10} {
		p := make([]byte, 100<<10)
		for i := range p {
			p[i] = byte(rnd.Uint32())
		}
		if _, err := f.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// serveFiles serves the raw images as exports named by the map's keys and
// returns the socket path.
func serveFiles(t *testing.T, images map[string]string, readOnly bool) string {
	t.Helper()
	var exports []Export
	for name, path := range images {
		d, err := raw.OpenFile(path, readOnly)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		exports = append(exports, Export{Name: name, Description: "image " + filepath.Base(path), Disk: d})
	}
	_, sock := start(t, exports, Options{})
	return sock
}

func uri(sock, export string) string { return "nbd+unix:///" + export + "?socket=" + sock }

func TestInteropQemuImg(t *testing.T) {
	img := rawImage(t, 64<<20)
	sock := serveFiles(t, map[string]string{"": img}, true)
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
		Format      string
	}
	if err := json.Unmarshal(testtool.Run(t, "qemu-img", "info", "--output=json", uri(sock, "")), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != 64<<20 || info.Format != "raw" {
		t.Errorf("qemu-img info: %+v", info)
	}
	testtool.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri(sock, ""))
	out := filepath.Join(t.TempDir(), "copy.qcow2")
	testtool.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri(sock, ""), out)
	testtool.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", img, out)
	// Block status: qemu-img map over NBD agrees with qemu-img map of the
	// file on which ranges hold data.
	want := testtool.DataRanges(t, testtool.Run(t, "qemu-img", "map", "-f", "raw", "--output=json", img))
	got := testtool.DataRanges(t, testtool.Run(t, "qemu-img", "map", "-f", "raw", "--output=json", uri(sock, "")))
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("data ranges over NBD %v, in the file %v", got, want)
	}
}

// TestInteropQemuIO writes, zeroes and discards through qemu-io and checks
// every byte of the file afterwards against the same operations done
// locally.
func TestInteropQemuIO(t *testing.T) {
	img := rawImage(t, 16<<20)
	want, _ := os.ReadFile(img)
	sock := serveFiles(t, map[string]string{"": img}, false)
	ops := []struct {
		cmd      string
		off, len int
		fill     byte
	}{
		{"write -P 0x5a", 4096, 65536, 0x5a},
		{"write -P 0x11", 100, 3000, 0x11}, // unaligned
		{"write -z", 1 << 20, 1 << 20, 0},
		{"write -z -u", 3<<20 + 4096, 40960, 0}, // may unmap
		{"discard", 8 << 20, 2 << 20, 0},
		{"write -f -P 0x77", 12<<20 + 512, 512, 0x77}, // FUA
		{"write -P 0x22", 16<<20 - 1000, 1000, 0x22},  // up to the end
	}
	args := []string{"-f", "raw"}
	for _, op := range ops {
		args = append(args, "-c", fmt.Sprintf("%s %d %d", op.cmd, op.off, op.len))
		for i := op.off; i < op.off+op.len; i++ {
			want[i] = op.fill
		}
	}
	args = append(args, "-c", "flush", "-c", fmt.Sprintf("read -P 0x5a %d %d", 4096+3000, 65536-3000), uri(sock, ""))
	if out := testtool.Run(t, "qemu-io", args...); bytes.Contains(out, []byte("Pattern verification failed")) || bytes.Contains(out, []byte("error")) {
		t.Fatalf("qemu-io: %s", out)
	}
	got, _ := os.ReadFile(img)
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("byte %d is %#x, want %#x", i, got[i], want[i])
		}
	}
	// A write past the end is refused, and the client says so.
	cmd := exec.Command(testtool.Need(t, "qemu-io"), "-f", "raw", "-c", fmt.Sprintf("write %d 4096", 16<<20-512), uri(sock, ""))
	out, _ := cmd.CombinedOutput()
	if !bytes.Contains(out, []byte("rror")) {
		t.Errorf("qemu-io write past the end succeeded: %s", out)
	}
}

func TestInteropNbdinfo(t *testing.T) {
	a, b := rawImage(t, 8<<20), rawImage(t, 32<<20)
	sock := serveFiles(t, map[string]string{"a": a, "b": b}, false)
	list := string(testtool.Run(t, "nbdinfo", "--list", uri(sock, "")))
	for _, want := range []string{`export="a"`, `export="b"`, "description: image disk.raw", "export-size: 8388608", "export-size: 33554432"} {
		if !strings.Contains(list, want) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", want, list)
		}
	}
	var info struct {
		Exports []map[string]any
	}
	if err := json.Unmarshal(testtool.Run(t, "nbdinfo", "--json", uri(sock, "b")), &info); err != nil {
		t.Fatal(err)
	}
	e := info.Exports[0]
	for key, want := range map[string]any{
		"can_flush": true, "can_fua": true, "can_multi_conn": true, "can_trim": true, "can_zero": true,
		"can_fast_zero": true, "can_df": true, "can_cache": true, "is_read_only": false,
		"block_size_minimum": 1.0, "block_size_preferred": 4096.0, "block_size_maximum": float64(32 << 20),
	} {
		if e[key] != want {
			t.Errorf("nbdinfo --json: %s = %v, want %v", key, e[key], want)
		}
	}
	// --map shows the holes the file has.
	m := string(testtool.Run(t, "nbdinfo", "--map", uri(sock, "b")))
	if !strings.Contains(m, "hole,zero") || !strings.Contains(m, "data") {
		t.Errorf("nbdinfo --map:\n%s", m)
	}
}

// TestInteropNbdcopy copies with several connections (nbdcopy uses four
// when the server advertises multi-conn) in both directions.
func TestInteropNbdcopy(t *testing.T) {
	img := rawImage(t, 256<<20)
	dst := filepath.Join(t.TempDir(), "dst.raw")
	if err := os.WriteFile(dst, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(dst, 256<<20); err != nil {
		t.Fatal(err)
	}
	sock := serveFiles(t, map[string]string{"src": img, "dst": dst}, false)
	testtool.Run(t, "nbdcopy", "--flush", uri(sock, "src"), uri(sock, "dst"))
	testtool.Run(t, "cmp", img, dst)
	out := filepath.Join(t.TempDir(), "out.raw")
	testtool.Run(t, "nbdcopy", uri(sock, "src"), out)
	testtool.Run(t, "cmp", img, out)
	// Holes were skipped, so the copy stays sparse.
	if b, src := blocks(t, out), blocks(t, img); b > 2*src+1024 {
		t.Errorf("copy allocates %d blocks, source %d", b, src)
	}
}

func blocks(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks
}

func TestInteropFio(t *testing.T) {
	img := rawImage(t, 64<<20)
	sock := serveFiles(t, map[string]string{"": img}, false)
	for _, job := range [][]string{
		{"--rw=randrw", "--bs=4k", "--iodepth=32"},
		{"--rw=write", "--bs=1m", "--iodepth=4"},
		{"--rw=randwrite", "--bsrange=512-64k", "--iodepth=16"},
	} {
		args := append([]string{"--name=verify", "--ioengine=nbd", "--uri=" + uri(sock, ""), "--size=32m",
			"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"}, job...)
		out := testtool.Run(t, "fio", args...)
		var res struct {
			Jobs []struct{ Error int }
		}
		if err := json.Unmarshal(out[bytes.IndexByte(out, '{'):], &res); err != nil || len(res.Jobs) != 1 || res.Jobs[0].Error != 0 {
			t.Fatalf("fio %v: %v\n%s", job, err, out)
		}
	}
}

func TestInteropNbdfuse(t *testing.T) {
	testtool.Need(t, "fusermount3")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	img := rawImage(t, 16<<20)
	want, _ := os.ReadFile(img)
	sock := serveFiles(t, map[string]string{"": img}, false)
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	pidfile := filepath.Join(dir, "pid")
	cmd := exec.Command(testtool.Need(t, "nbdfuse"), "-P", pidfile, mnt+"/disk", "--unix", sock)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("fusermount3", "-u", mnt).Run()
		cmd.Wait()
	})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(pidfile); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("nbdfuse did not start")
		}
	}
	got, err := os.ReadFile(mnt + "/disk")
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("reading the nbdfuse file: %v (equal %v)", err, bytes.Equal(got, want))
	}
	f, err := os.OpenFile(mnt+"/disk", os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("written through nbdfuse"), 5<<20+7); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := exec.Command("fusermount3", "-u", mnt).Run(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	got, _ = os.ReadFile(img)
	if !bytes.Equal(got[5<<20+7:5<<20+30], []byte("written through nbdfuse")) {
		t.Fatal("a write through nbdfuse did not reach the image")
	}
}

// TestInteropTLS serves over TLS (required) to nbdinfo, whose TLS is
// GnuTLS: a certificate chain written the way libnbd looks for it
// (tls-certificates=DIR with ca-cert.pem), and a refusal without TLS.
func TestInteropTLS(t *testing.T) {
	certDir := t.TempDir()
	serverCert := writeCA(t, certDir)
	img := rawImage(t, 8<<20)
	d, err := raw.OpenFile(img, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	_, sock := start(t, []Export{{Disk: d}}, Options{TLS: &tls.Config{Certificates: []tls.Certificate{serverCert}}, TLSMode: TLSRequire})
	out := string(testtool.Run(t, "nbdinfo", "nbds+unix:///?socket="+sock+"&tls-certificates="+certDir))
	if !strings.Contains(out, "export-size: 8388608") || !strings.Contains(out, "with TLS") {
		t.Errorf("nbdinfo over TLS:\n%s", out)
	}
	if err := exec.Command(testtool.Need(t, "nbdinfo"), uri(sock, "")).Run(); err == nil {
		t.Error("nbdinfo without TLS was served by a server that requires it")
	}
}

// writeCA makes a CA and a server certificate for localhost signed by it,
// writes the CA to dir/ca-cert.pem, and returns the server's certificate.
func writeCA(t *testing.T, dir string) tls.Certificate {
	t.Helper()
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	caKey, srvKey := newKey(), newKey()
	now := time.Now()
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "diskserve test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srv := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srv, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca-cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{srvDER, caDER}, PrivateKey: srvKey}
}
