package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/diskserve/diskserve/export/nbd"
	"github.com/diskserve/diskserve/internal/remotetest"
	"github.com/diskserve/diskserve/internal/testtool"
)

// golden makes, in dir, a 64 MiB raw image with random data in places and
// a qcow2 copy of it with compressed clusters, as qemu-img makes them.
func golden(t *testing.T, dir string) (qcow2Path, rawPath string, content []byte) {
	t.Helper()
	content = make([]byte, 64<<20)
	rnd := rand.NewChaCha8([32]byte{24})
	rnd.Read(content[1<<20 : 6<<20])
	rnd.Read(content[40<<20 : 41<<20])
	for i := 20 << 20; i < 30<<20; i += 1 << 20 { // scattered blocks, like files
		rnd.Read(content[i : i+128<<10])
	}
	rawPath = filepath.Join(dir, "base.raw")
	if err := os.WriteFile(rawPath, content, 0o644); err != nil {
		t.Fatal(err)
	}
	qcow2Path = filepath.Join(dir, "base.qcow2")
	testtool.Run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", rawPath, qcow2Path)
	return qcow2Path, rawPath, content
}

// serveAt starts `diskserve serve` with args, listening on a Unix socket
// in dir, and returns the socket.
func serveAt(t *testing.T, dir string, args ...string) (string, *server) {
	t.Helper()
	sock := filepath.Join(dir, "nbd.sock")
	os.Remove(sock)
	s := startServe(t, exec.Command(diskserveBin, append([]string{"serve", "--listen", "unix:" + sock}, args...)...))
	return sock, s
}

// dial connects to the default export at sock.
func dial(t *testing.T, sock string) *nbd.Client {
	t.Helper()
	c, err := nbd.Dial("unix", sock, "")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// readExport reads the whole default export at sock.
func readExport(t *testing.T, sock string, size int) []byte {
	t.Helper()
	c := dial(t, sock)
	defer c.Close()
	got := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 {
		if _, err := c.ReadAt(got[off:min(size, off+1<<20)], int64(off)); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	return got
}

// TestRemoteS3 serves a qcow2 golden image from a real S3 server
// (versitygw): whole, again after a restart without fetching anything, as
// the backing file of a local overlay made by create, and writable with
// serve --overlay. The object in the bucket never changes.
func TestRemoteS3(t *testing.T) {
	dir := t.TempDir()
	qcow2Path, rawPath, content := golden(t, dir)
	s3 := remotetest.StartS3(t)
	s3.CreateBucket(t, "golden")
	s3.PutFile(t, "golden", "base.qcow2", qcow2Path)
	s3.PutFile(t, "golden", "base.raw", rawPath)
	proxy := remotetest.NewProxy(t, s3.URL)
	remotetest.Env(t, proxy.URL)
	cache := filepath.Join(dir, "cache")
	const url = "s3://golden/base.qcow2"

	var info struct {
		Format string
		Remote []struct {
			URL, Validator string
			Size           int64
		}
	}
	if err := json.Unmarshal([]byte(mustRun(t, "info", "--output=json", "--cache-dir", cache, url)), &info); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(qcow2Path); info.Format != "qcow2" || len(info.Remote) != 1 || info.Remote[0].URL != url || info.Remote[0].Size != fi.Size() || info.Remote[0].Validator == "" {
		t.Fatalf("info: %+v", info)
	}

	ctl := filepath.Join(dir, "ctl.sock")
	sock, srv := serveAt(t, dir, "-r", "--cache-dir", cache, "--control", "unix:"+ctl, url)
	if got := readExport(t, sock, len(content)); !bytes.Equal(got, content) {
		t.Fatal("the export differs from the image")
	}
	metrics := mustRun(t, "control", "--socket", ctl, "metrics")
	for _, m := range []string{`diskserve_remote_gets_total{export="",image="s3://golden/base.qcow2"}`, `diskserve_remote_fetched_bytes_total{export="",image="s3://golden/base.qcow2"}`, `diskserve_remote_fetch_seconds_count{export="",image="s3://golden/base.qcow2"}`} {
		if !strings.Contains(metrics, m) {
			t.Errorf("the metrics have no %s:\n%s", m, metrics)
		}
	}
	srv.stop(t, syscall.SIGTERM)
	fetched := proxy.Bytes.Load()
	sock, srv = serveAt(t, dir, "-r", "--cache-dir", cache, url)
	if got := readExport(t, sock, len(content)); !bytes.Equal(got, content) {
		t.Fatal("the export differs from the image after a restart")
	}
	srv.stop(t, syscall.SIGTERM)
	if again := proxy.Bytes.Load() - fetched; again != 0 {
		t.Errorf("a restarted server fetched %d bytes again", again)
	}

	// A local overlay whose backing file is the bucket's object.
	vm := filepath.Join(dir, "vm1.qcow2")
	mustRun(t, "create", "--cache-dir", cache, "-f", "qcow2", "-b", url, "-F", "qcow2", vm)
	if out := string(testtool.Run(t, "qemu-img", "info", "-U", vm)); !strings.Contains(out, "backing file: "+url) {
		t.Errorf("qemu-img info of the overlay:\n%s", out)
	}
	sock, srv = serveAt(t, dir, "--cache-dir", cache, vm)
	want := append([]byte(nil), content...)
	writeExport(t, sock, want, 3<<20+1000, 70000)
	if got := readExport(t, sock, len(want)); !bytes.Equal(got, want) {
		t.Fatal("the overlay reads wrong")
	}
	srv.stop(t, syscall.SIGTERM)

	// serve --overlay: a writable export of the golden image in one
	// command, going on from where it was after a restart.
	ovDir := filepath.Join(dir, "overlays")
	os.Mkdir(ovDir, 0o755)
	want = append([]byte(nil), content...)
	sock, srv = serveAt(t, dir, "--cache-dir", cache, "--overlay", ovDir, url)
	writeExport(t, sock, want, 100, 5000)
	srv.stop(t, syscall.SIGTERM)
	sock, srv = serveAt(t, dir, "--cache-dir", cache, "--overlay", ovDir, url)
	if got := readExport(t, sock, len(want)); !bytes.Equal(got, want) {
		t.Fatal("the --overlay export lost its writes over a restart")
	}
	srv.stop(t, syscall.SIGTERM)
	if _, err := os.Stat(filepath.Join(ovDir, "base-overlay.qcow2")); err != nil {
		t.Error(err)
	}

	stored, err := os.ReadFile(filepath.Join(s3.Root, "golden", "base.qcow2"))
	if orig, _ := os.ReadFile(qcow2Path); err != nil || !bytes.Equal(stored, orig) {
		t.Errorf("the object in the bucket changed (%v)", err)
	}

	// The other commands that take an image.
	mustRun(t, "check", "--cache-dir", cache, url)
	out := filepath.Join(dir, "out.raw")
	mustRun(t, "convert", "--cache-dir", cache, "-O", "raw", "s3://golden/base.raw", out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, content) {
		t.Error("convert of the raw object differs")
	}
	if m := mustRun(t, "map", "--output=json", "--cache-dir", cache, "s3://golden/base.raw"); !strings.Contains(m, `"zero": true`) {
		t.Errorf("map of a cached raw object shows no zero chunks:\n%s", m)
	}
	list := mustRun(t, "cache", "list", "--cache-dir", cache)
	if !strings.Contains(list, url) || !strings.Contains(list, "s3://golden/base.raw") || strings.Contains(list, remotetest.SecretKey) {
		t.Errorf("cache list:\n%s", list)
	}
	mustRun(t, "cache", "verify", "--cache-dir", cache)

	// A presigned URL, which refuses HEAD, works as a plain URL and never
	// shows its signature.
	presigned := s3.Presign(t, "golden", "base.raw")
	info2 := mustRun(t, "info", "--cache-dir", cache, presigned)
	if !strings.Contains(info2, "virtual size: 64 MiB") || strings.Contains(info2, "Signature") {
		t.Errorf("info of a presigned URL:\n%s", info2)
	}

	// Credentials from a profile of the shared credentials file, and a
	// wrong secret refused without the secret in the message.
	creds := filepath.Join(dir, "credentials")
	os.WriteFile(creds, []byte("[golden]\naws_access_key_id = "+remotetest.AccessKey+"\naws_secret_access_key = "+remotetest.SecretKey+"\n"), 0o600)
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", creds)
	t.Setenv("AWS_PROFILE", "golden")
	mustRun(t, "info", "--cache-dir", cache, url)
	t.Setenv("AWS_PROFILE", "")
	t.Setenv("AWS_ACCESS_KEY_ID", remotetest.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-42")
	if _, errOut, code := run(t, nil, "info", "--cache-dir", cache, url); code != 1 || !strings.Contains(errOut, "403") || strings.Contains(errOut, "not-the-secret-42") {
		t.Errorf("a wrong secret: exit %d\n%s", code, errOut)
	}
	if pruned := mustRun(t, "cache", "prune", "--all", "--cache-dir", cache); strings.Count(pruned, "removed") != 3 { // the qcow2, the raw object, and the raw object by presigned URL
		t.Errorf("cache prune:\n%s", pruned)
	}
}

// writeExport writes n random bytes at off through the default export at
// sock, and into want.
func writeExport(t *testing.T, sock string, want []byte, off, n int) {
	t.Helper()
	c := dial(t, sock)
	defer c.Close()
	p := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(off)}).Read(p)
	if _, err := c.WriteAt(p, int64(off)); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	copy(want[off:], p)
}

// TestRemoteHTTPMatchesQemu reads images on nginx through diskserve and
// through qemu's curl driver: the same bytes, for raw, for qcow2, and for
// a local overlay that qemu-img made with the URL as its backing file.
func TestRemoteHTTPMatchesQemu(t *testing.T) {
	qemuCurl(t)
	dir := t.TempDir()
	www := filepath.Join(dir, "www")
	os.Mkdir(www, 0o755)
	_, _, content := golden(t, www)
	base := remotetest.StartNginx(t, www)
	cache := filepath.Join(dir, "cache")
	for _, name := range []string{"base.raw", "base.qcow2"} {
		url := base + "/" + name
		a, b := filepath.Join(dir, "a-"+name), filepath.Join(dir, "b-"+name)
		qemuConvert(t, url, a)
		mustRun(t, "convert", "--cache-dir", cache, "-O", "raw", url, b)
		if !sameFiles(t, a, b) {
			t.Errorf("%s: qemu and diskserve read different bytes", name)
		}
	}
	ov := filepath.Join(dir, "overlay.qcow2")
	testtool.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base+"/base.qcow2", "-F", "qcow2", ov)
	testtool.Run(t, "qemu-io", "-c", "write -P 5 2M 64k", "-c", "write -P 6 41M 4k", ov)
	a, b := filepath.Join(dir, "a-ov.raw"), filepath.Join(dir, "b-ov.raw")
	qemuConvert(t, ov, a)
	mustRun(t, "convert", "--cache-dir", cache, "-O", "raw", ov, b)
	if !sameFiles(t, a, b) {
		t.Error("the overlay: qemu and diskserve read different bytes")
	}
	// diskserve writes to the overlay; qemu reads what it wrote.
	want := append([]byte(nil), content...)
	copy(want[2<<20:], bytes.Repeat([]byte{5}, 64<<10))
	copy(want[41<<20:], bytes.Repeat([]byte{6}, 4<<10))
	sock, srv := serveAt(t, dir, "--cache-dir", cache, ov)
	writeExport(t, sock, want, 7<<20+512, 100000)
	srv.stop(t, syscall.SIGTERM)
	qemuConvert(t, ov, a)
	if got, _ := os.ReadFile(a); !bytes.Equal(got, want) {
		t.Error("qemu reads the overlay diskserve wrote wrong")
	}
	testtool.Run(t, "qemu-img", "check", ov)
}

// qemuConvert copies src to dst, raw, with qemu-img and its curl driver.
// It reads with one request at a time (-m 1): with its default of 8, qemu
// 7.2's curl driver hangs on compressed qcow2 images (most runs here, with
// or without diskserve in the picture). A hang fails the test in a minute.
func qemuConvert(t *testing.T, src, dst string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, testtool.Need(t, "qemu-img"), "convert", "-m", "1", "-O", "raw", src, dst).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img convert %s: %v\n%s", src, err, out)
	}
}

// qemuCurl fails or skips the test without qemu's curl driver
// (qemu-block-extra).
func qemuCurl(t *testing.T) {
	t.Helper()
	out := testtool.Run(t, "qemu-img", "--help")
	if bytes.Contains(out, []byte(" http ")) {
		if _, err := os.Stat("/usr/lib/x86_64-linux-gnu/qemu/block-curl.so"); err == nil {
			return
		}
	}
	if os.Getenv(testtool.RequireEnv) == "1" {
		t.Fatal("qemu's curl driver (qemu-block-extra) is required but not installed")
	}
	t.Skip("qemu's curl driver (qemu-block-extra) is not installed")
}

func sameFiles(t *testing.T, a, b string) bool {
	t.Helper()
	x, err1 := os.ReadFile(a)
	y, err2 := os.ReadFile(b)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(x, y)
}

// TestRemoteFaults reads through a proxy that fails 10% of GETs (503,
// resets, bodies cut short): every read succeeds. Then the proxy stops
// answering: reads of that export fail within the timeout while another
// export of the same server keeps serving.
func TestRemoteFaults(t *testing.T) {
	dir := t.TempDir()
	www := filepath.Join(dir, "www")
	os.Mkdir(www, 0o755)
	_, rawPath, content := golden(t, www)
	proxy := remotetest.NewProxy(t, remotetest.StartNginx(t, www))
	proxy.SetFailRate(0.1)
	out := filepath.Join(dir, "out.raw")
	mustRun(t, "convert", "--cache-dir", filepath.Join(dir, "c1"), "--chunk-size", "64K", "-O", "raw", proxy.URL+"/base.raw", out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, content) {
		t.Fatal("a copy through a failing proxy differs")
	}
	if proxy.Faults.Load() == 0 {
		t.Errorf("no fault injected in %d GETs", proxy.GETs.Load())
	}
	t.Logf("%d of %d GETs failed on purpose", proxy.Faults.Load(), proxy.GETs.Load())
	proxy.SetFailRate(0)

	sock := filepath.Join(dir, "nbd.sock")
	startServe(t, exec.Command(diskserveBin, "serve", "-r", "--listen", "unix:"+sock, "--cache-dir", filepath.Join(dir, "c2"),
		"--remote-timeout", "500ms", "remote="+proxy.URL+"/base.raw", "local="+rawPath))
	proxy.SetStalled(true)
	defer proxy.SetStalled(false)
	errc := make(chan error, 1)
	start := time.Now()
	go func() {
		c, err := nbd.Dial("unix", sock, "remote")
		if err == nil {
			defer c.Close()
			_, err = c.ReadAt(make([]byte, 4096), 1<<20)
		}
		errc <- err
	}()
	local, err := nbd.Dial("unix", sock, "local")
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	p := make([]byte, 1<<20)
	for i := 0; time.Since(start) < time.Second; i++ {
		off := int64(i%64) << 20
		if _, err := local.ReadAt(p, off); err != nil || !bytes.Equal(p, content[off:off+1<<20]) {
			t.Fatalf("the local export stalled or failed with the remote one: %v", err)
		}
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("a read of a server that does not answer succeeded")
		}
		t.Logf("the stalled read failed after %v: %v", time.Since(start), err)
	case <-time.After(30 * time.Second):
		t.Fatal("a read of a server that does not answer did not fail within 30 s")
	}
}

// TestRemoteReplaced replaces the object in the bucket while it is
// served: reads of chunks not yet cached fail, and no read ever returns
// bytes of the new object.
func TestRemoteReplaced(t *testing.T) {
	dir := t.TempDir()
	s3 := remotetest.StartS3(t)
	s3.CreateBucket(t, "golden")
	old := make([]byte, 8<<20)
	rand.NewChaCha8([32]byte{1}).Read(old)
	s3.Put(t, "golden", "disk.raw", old)
	remotetest.Env(t, s3.URL)
	sock, _ := serveAt(t, dir, "-r", "--cache-dir", filepath.Join(dir, "cache"), "s3://golden/disk.raw")
	c := dial(t, sock)
	defer c.Close()
	p := make([]byte, 64<<10)
	if _, err := c.ReadAt(p, 0); err != nil || !bytes.Equal(p, old[:len(p)]) {
		t.Fatal(err)
	}
	s3.Put(t, "golden", "disk.raw", bytes.Repeat([]byte{0xee}, len(old)))
	failed := 0
	for off := int64(0); off < int64(len(old)); off += int64(len(p)) {
		_, err := c.ReadAt(p, off)
		switch {
		case err != nil:
			failed++
		case !bytes.Equal(p, old[off:off+int64(len(p))]):
			t.Fatalf("a read at %d returned bytes that are not the object opened", off)
		}
	}
	if failed == 0 {
		t.Error("no read failed after the object was replaced")
	}
}

// TestRemoteKilledDuringPrefetch kills a server while --prefetch=all fills
// its cache: every chunk the cache holds matches the object, and a server
// started on the cache serves the image whole.
func TestRemoteKilledDuringPrefetch(t *testing.T) {
	dir := t.TempDir()
	www := filepath.Join(dir, "www")
	os.Mkdir(www, 0o755)
	_, _, content := golden(t, www)
	base := remotetest.StartNginx(t, www)
	cache := filepath.Join(dir, "cache")
	for range 3 {
		_, srv := serveAt(t, dir, "-r", "--cache-dir", cache, "--chunk-size", "256K", "--prefetch=all", "--prefetch-rate", "8M", base+"/base.raw")
		time.Sleep(time.Duration(200+rand.IntN(600)) * time.Millisecond)
		srv.stop(t, syscall.SIGKILL)
		mustRun(t, "cache", "verify", "--cache-dir", cache)
	}
	out := mustRun(t, "cache", "list", "--cache-dir", cache, "--output=json")
	var entries []struct {
		ChunksCached int64 `json:"chunks-cached"`
	}
	if err := json.Unmarshal([]byte(out), &entries); err != nil || len(entries) != 1 || entries[0].ChunksCached == 0 || entries[0].ChunksCached == 256 {
		t.Fatalf("after the kills, the cache holds %s (%v): the test kills too early or too late", out, err)
	}
	sock, _ := serveAt(t, dir, "-r", "--cache-dir", cache, "--chunk-size", "256K", base+"/base.raw")
	if got := readExport(t, sock, len(content)); !bytes.Equal(got, content) {
		t.Fatal("the image read through the cache the killed servers left differs")
	}
}

// bootTrace is a boot-like read pattern over content: scattered small
// reads where there is data, and some sequential runs of a few MiB.
func bootTrace(size int64) [][2]int64 {
	rnd := rand.New(rand.NewPCG(7, 7))
	var trace [][2]int64
	for len(trace) < 150 {
		if rnd.IntN(10) < 3 { // a file read sequentially
			off := rnd.Int64N(size-8<<20) &^ 4095
			run := (1 + rnd.Int64N(4)) << 20
			for o := off; o < off+run; o += 128 << 10 {
				trace = append(trace, [2]int64{o, 128 << 10})
			}
			continue
		}
		n := (1 + rnd.Int64N(32)) * 4096
		trace = append(trace, [2]int64{rnd.Int64N(size-n) &^ 511, n})
	}
	return trace
}

// replay reads trace through the default export at sock, checking the
// bytes.
func replay(t *testing.T, sock string, trace [][2]int64, content []byte) error {
	c, err := nbd.Dial("unix", sock, "")
	if err != nil {
		return err
	}
	defer c.Close()
	for _, r := range trace {
		p := make([]byte, r[1])
		if _, err := c.ReadAt(p, r[0]); err != nil {
			return err
		}
		if !bytes.Equal(p, content[r[0]:r[0]+r[1]]) {
			return fmt.Errorf("read of %d bytes at %d: wrong bytes", r[1], r[0])
		}
	}
	return nil
}

// serveHost starts a diskserve process as one host of a fleet: its own
// S3 endpoint (a proxy that counts what it fetches) and cache directory.
func serveHost(t *testing.T, dir, name, endpoint, cache, image string) (string, *server) {
	t.Helper()
	sock := filepath.Join(dir, name+".sock")
	os.Remove(sock)
	cmd := exec.Command(diskserveBin, "serve", "-r", "--listen", "unix:"+sock, "--cache-dir", cache, image)
	cmd.Env = append(os.Environ(), "AWS_ENDPOINT_URL_S3="+endpoint)
	return sock, startServe(t, cmd)
}

// TestRemoteFleet has four diskserve processes, standing for four hosts
// with a cache each, serve one golden image from one bucket and replay a
// boot-like trace at once. Each fetches at most 1.2 times the chunks the
// trace touches; restarted, they fetch nothing; and two processes that
// share one cache directory fetch each chunk once between them.
func TestRemoteFleet(t *testing.T) {
	dir := t.TempDir()
	_, rawPath, content := golden(t, dir)
	for i := range content { // data everywhere: no chunk is all zeroes
		content[i] |= 1
	}
	os.WriteFile(rawPath, content, 0o644)
	s3 := remotetest.StartS3(t)
	s3.CreateBucket(t, "golden")
	s3.PutFile(t, "golden", "base.raw", rawPath)
	remotetest.Env(t, s3.URL)
	const image = "s3://golden/base.raw"
	trace := bootTrace(int64(len(content)))
	touched := map[int64]bool{}
	for _, r := range trace {
		for c := r[0] >> 20; c <= (r[0]+r[1]-1)>>20; c++ {
			touched[c] = true
		}
	}
	distinct := int64(len(touched)) << 20

	const hosts = 4
	proxies := make([]*remotetest.Proxy, hosts)
	socks := make([]string, hosts)
	servers := make([]*server, hosts)
	start := func() {
		for i := range hosts {
			socks[i], servers[i] = serveHost(t, dir, fmt.Sprint("host", i), proxies[i].URL, filepath.Join(dir, fmt.Sprint("cache", i)), image)
		}
	}
	runAll := func(socks []string) {
		errs := make(chan error, len(socks))
		for _, s := range socks {
			go func() { errs <- replay(t, s, trace, content) }()
		}
		for range socks {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := range hosts {
		proxies[i] = remotetest.NewProxy(t, s3.URL)
	}
	start()
	runAll(socks)
	fetched := make([]int64, hosts)
	for i, p := range proxies {
		fetched[i] = p.Bytes.Load()
		t.Logf("host %d: %d GETs, %d bytes fetched for %d bytes of chunks touched (%.2fx)", i, p.GETs.Load(), fetched[i], distinct, float64(fetched[i])/float64(distinct))
		if fetched[i] > distinct*12/10 || fetched[i] < distinct {
			t.Errorf("host %d fetched %d bytes; the trace touches %d bytes of chunks", i, fetched[i], distinct)
		}
	}
	for _, s := range servers {
		s.stop(t, syscall.SIGTERM)
	}
	before := make([][][2]int64, hosts)
	for i, p := range proxies {
		before[i] = p.Ranges()
	}
	start()
	runAll(socks)
	// Restarted, a host fetches nothing it had. Readahead, which depends
	// on timing, may go on past a sequential run into chunks the first
	// run did not fetch, and never the trace touches: at most one window.
	for i, p := range proxies {
		more := p.Bytes.Load() - fetched[i]
		for _, r := range p.Ranges()[len(before[i]):] {
			for _, b := range before[i] {
				if r[0] <= b[1] && b[0] <= r[1] {
					t.Errorf("host %d fetched bytes %d-%d again after a restart", i, max(r[0], b[0]), min(r[1], b[1]))
				}
			}
		}
		if more > 8<<20 {
			t.Errorf("host %d fetched %d bytes after a restart", i, more)
		}
		if more > 0 {
			t.Logf("host %d: readahead fetched %d bytes more after the restart, none fetched before", i, more)
		}
	}
	for _, s := range servers {
		s.stop(t, syscall.SIGTERM)
	}

	// Two processes on one host, sharing its cache directory.
	shared := filepath.Join(dir, "shared-cache")
	pa, pb := remotetest.NewProxy(t, s3.URL), remotetest.NewProxy(t, s3.URL)
	sa, _ := serveHost(t, dir, "a", pa.URL, shared, image)
	sb, _ := serveHost(t, dir, "b", pb.URL, shared, image)
	runAll([]string{sa, sb})
	ranges := append(pa.Ranges(), pb.Ranges()...)
	slices.SortFunc(ranges, func(x, y [2]int64) int { return cmp.Compare(x[0], y[0]) })
	for i := 1; i < len(ranges); i++ {
		if ranges[i][0] <= ranges[i-1][1] {
			t.Errorf("bytes %d-%d fetched twice by processes sharing a cache", ranges[i][0], min(ranges[i][1], ranges[i-1][1]))
		}
	}
	if total := pa.Bytes.Load() + pb.Bytes.Load(); total > distinct*12/10 {
		t.Errorf("two processes sharing a cache fetched %d bytes for %d bytes of chunks", total, distinct)
	}
}

// pattern is an object of any size whose bytes are computed from their
// offsets (none zero), served with ranges.
type pattern int64

func (p pattern) byteAt(off int64) byte { return byte(off*0x9e3779b1>>24) | 1 }

func (p pattern) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("ETag", `"pattern"`)
	http.ServeContent(w, r, "", time.Time{}, io.NewSectionReader(p, 0, int64(p)))
}

func (p pattern) ReadAt(b []byte, off int64) (int, error) {
	n := min(int64(len(b)), int64(p)-off)
	for i := range n {
		b[i] = p.byteAt(off + i)
	}
	if n < int64(len(b)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// TestRemoteMemoryBounded streams a 4 GiB image through a cache bounded
// to 256 MiB: the cache stays within its bound, chunks on their way
// included, and so does the server's memory.
func TestRemoteMemoryBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("streams 4 GiB")
	}
	dir := t.TempDir()
	const size = 4 << 30
	s := httptest.NewServer(pattern(size))
	defer s.Close()
	cache := filepath.Join(dir, "cache")
	sock, srv := serveAt(t, dir, "-r", "--cache-dir", cache, "--cache-size", "256M", s.URL+"/big.img")
	c := dial(t, sock)
	defer c.Close()
	p := make([]byte, 4<<20)
	var peakDisk int64
	for off := int64(0); off < size; off += int64(len(p)) {
		if _, err := c.ReadAt(p, off); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		if p[0] != pattern(size).byteAt(off) || p[len(p)-1] != pattern(size).byteAt(off+int64(len(p))-1) {
			t.Fatalf("wrong bytes at %d", off)
		}
		if off%(32<<20) == 0 {
			peakDisk = max(peakDisk, diskUsage(t, cache))
		}
	}
	rss := peakRSS(t, srv.cmd.Process.Pid)
	t.Logf("peak RSS %d MiB, cache on disk at most %d MiB", rss>>20, peakDisk>>20)
	if peakDisk > 256<<20+1<<20 { // the bound, and the chunks' states and sums
		t.Errorf("the cache grew to %d MiB on disk, bound 256 MiB", peakDisk>>20)
	}
	if rss > 256<<20 {
		t.Errorf("peak RSS %d MiB streaming through the cache", rss>>20)
	}
}

// diskUsage returns the bytes the files under dir occupy.
func diskUsage(t *testing.T, dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				n += fi.Sys().(*syscall.Stat_t).Blocks * 512
			}
		}
		return nil
	})
	return n
}

// peakRSS reads VmHWM of process pid.
func peakRSS(t *testing.T, pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(v), "%d kB", &kb)
			return kb << 10
		}
	}
	t.Fatal("no VmHWM")
	return 0
}
