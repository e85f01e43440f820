package remote_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/newimage"
	"github.com/diskserve/diskserve/remote"
	"github.com/diskserve/diskserve/remote/cache"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// object serves one object whose content and ETag a test can replace,
// with ranges as net/http serves them.
type object struct {
	mu   sync.Mutex
	data []byte
	etag string
	gets atomic.Int64
}

func (o *object) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	o.gets.Add(1)
	o.mu.Lock()
	data, etag := o.data, o.etag
	o.mu.Unlock()
	w.Header().Set("ETag", etag)
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
}

func (o *object) replace(data []byte, etag string) {
	o.mu.Lock()
	o.data, o.etag = data, etag
	o.mu.Unlock()
}

func serve(t *testing.T, h http.Handler) *httptest.Server {
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	return s
}

// config returns a configuration with a cache of the test's own.
func config(t *testing.T) remote.Config {
	return remote.Config{Cache: cache.Config{Dir: t.TempDir(), ChunkSize: 64 << 10}}
}

// openURL opens the image at url through the opener, read-only, with cfg.
func openURL(t *testing.T, url string, cfg remote.Config, opts diskserve.Options) diskserve.DiskFile {
	t.Helper()
	opts.ReadOnly = true
	opts.OpenFile = format.FileOpener(cfg, diskserve.CacheWriteback)
	d, err := format.Open(url, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func content(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{4}).Read(b)
	return b
}

// TestRawOverHTTP opens an image by URL through the opener and runs the
// conformance suite on it, through the cache.
func TestRawOverHTTP(t *testing.T) {
	data := content(3<<20 + 123)
	copy(data[1<<20:], make([]byte, 256<<10)) // chunks of zeroes
	o := &object{data: data, etag: `"v1"`}
	s := serve(t, o)
	cfg := config(t)
	d := openURL(t, s.URL+"/disk.img", cfg, diskserve.Options{Format: "raw"})
	disktest.Check(t, d, data)
	opts := diskserve.Options{Format: "raw", OpenFile: format.FileOpener(cfg, diskserve.CacheWriteback)}
	if _, err := format.Open(s.URL+"/disk.img", opts); !errors.Is(err, diskserve.ErrReadOnly) {
		t.Errorf("a read-write open of a URL: %v", err)
	}
}

// TestQcow2OverHTTP serves a qcow2 overlay and its raw backing file from
// one directory: the overlay opened by URL finds its backing file by URL,
// relative to its own, and reads as it does locally.
func TestQcow2OverHTTP(t *testing.T) {
	dir := t.TempDir()
	base := content(192 << 10)
	if err := os.WriteFile(filepath.Join(dir, "base.raw"), base, 0o644); err != nil {
		t.Fatal(err)
	}
	ov := filepath.Join(dir, "overlay.qcow2")
	if err := qcow2.Create(ov, qcow2.CreateOptions{Size: 192 << 10, ClusterSize: 4096, BackingFile: "base.raw", BackingFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	local, err := format.Open(ov, diskserve.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := local.WriteAt(bytes.Repeat([]byte{7}, 10000), 30000); err != nil {
		t.Fatal(err)
	}
	diskserve.Flush(local)
	want := make([]byte, 192<<10)
	diskserve.ReadFullAt(local, want, 0)
	local.Close()

	s := serve(t, http.FileServer(http.Dir(dir)))
	d := openURL(t, s.URL+"/overlay.qcow2", config(t), diskserve.Options{})
	if info := diskserve.Describe(d); info.Format != "qcow2" || info.Backing == nil || info.Backing.Filename != s.URL+"/base.raw" {
		t.Errorf("described as %+v", info)
	}
	// TestRawOverHTTP runs the conformance suite; here whole and random
	// reads.
	got := make([]byte, len(want))
	if err := diskserve.ReadFullAt(d, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("whole read: %v", err)
	}
	rnd := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		off := rnd.Int64N(int64(len(want)))
		n := 1 + rnd.Int64N(min(20000, int64(len(want))-off))
		if err := diskserve.ReadFullAt(d, got[:n], off); err != nil || !bytes.Equal(got[:n], want[off:off+n]) {
			t.Fatalf("read of %d bytes at %d: %v", n, off, err)
		}
	}
}

// TestReplacedObject replaces the object while it is open: reads fail
// with ErrChanged, never returning bytes of the new object.
func TestReplacedObject(t *testing.T) {
	o := &object{data: content(1 << 20), etag: `"v1"`}
	s := serve(t, o)
	d := openURL(t, s.URL+"/disk.img", config(t), diskserve.Options{Format: "raw"})
	p := make([]byte, 4096)
	if _, err := d.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	o.replace(bytes.Repeat([]byte{1}, 1<<20), `"v2"`)
	if n, err := d.ReadAt(p, 512<<10); !errors.Is(err, remote.ErrChanged) || n != 0 {
		t.Fatalf("a read after the object changed: %d bytes, %v", n, err)
	}
}

// TestNoRanges refuses, at open, a server that answers a ranged GET with
// the whole object.
func TestNoRanges(t *testing.T) {
	s := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write(content(4096))
	}))
	if _, err := config(t).Open(s.URL + "/disk.img"); err == nil || !strings.Contains(err.Error(), "does not serve byte ranges") {
		t.Fatalf("open: %v", err)
	}
}

// TestRetries fails every other request with 503 or a cut-short body: the
// reads still succeed, through retries.
func TestRetries(t *testing.T) {
	data := content(1 << 20)
	o := &object{data: data, etag: `"v1"`}
	var n atomic.Int64
	s := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch n.Add(1) % 4 {
		case 1:
			w.WriteHeader(http.StatusServiceUnavailable)
		case 3: // a body cut short: the bytes asked for, only the first 100 of them sent
			var first, last int
			fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &first, &last)
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", first, last, len(data)))
			w.Header().Set("Content-Length", strconv.Itoa(last-first+1))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data[first : first+100])
		default:
			o.ServeHTTP(w, r)
		}
	}))
	d := openURL(t, s.URL+"/disk.img", config(t), diskserve.Options{Format: "raw"})
	p := make([]byte, 65536)
	for off := int64(0); off < int64(len(data)); off += int64(len(p)) {
		if _, err := d.ReadAt(p, off); err != nil || !bytes.Equal(p, data[off:off+int64(len(p))]) {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
}

// TestCredentialsStayOut opens a URL whose query and user information
// hold secrets, on a server that refuses it: the error names the object
// without them, and so does Describe of one that opens.
func TestCredentialsStayOut(t *testing.T) {
	o := &object{data: content(4096), etag: `"v1"`}
	s := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/denied" {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		o.ServeHTTP(w, r)
	}))
	u := strings.Replace(s.URL, "http://", "http://user:hunter2@", 1)
	cfg := config(t)
	_, err := format.Open(u+"/denied?X-Amz-Signature=SECRET", diskserve.Options{ReadOnly: true, OpenFile: format.FileOpener(cfg, diskserve.CacheWriteback)})
	if err == nil || strings.Contains(err.Error(), "SECRET") || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("open of a refused URL: %v", err)
	}
	d := openURL(t, u+"/disk.img?X-Amz-Signature=SECRET", cfg, diskserve.Options{})
	if info := diskserve.Describe(d); strings.Contains(info.Filename, "SECRET") || strings.Contains(info.Filename, "hunter2") {
		t.Errorf("described as %q", info.Filename)
	}
	entries, err := cache.List(cfg.Cache.Dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("cache entries %v, %v", entries, err)
	}
	meta, _ := os.ReadFile(filepath.Join(entries[0].Dir, "meta.json"))
	if bytes.Contains(meta, []byte("SECRET")) || bytes.Contains(meta, []byte("hunter2")) {
		t.Errorf("the cache's meta.json holds credentials: %s", meta)
	}
}

// TestRedirectAndRefusedHEAD opens a URL that redirects, on a server that
// refuses HEAD as a presigned GET URL does: the size comes from a ranged
// GET, and later GETs go straight to where the redirect led.
func TestRedirectAndRefusedHEAD(t *testing.T) {
	data := content(3 << 20)
	o := &object{data: data, etag: `"v1"`}
	var redirected, heads atomic.Int64
	s := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodHead:
			heads.Add(1)
			http.Error(w, "signature does not match", http.StatusForbidden)
		case r.URL.Path == "/old.img":
			redirected.Add(1)
			http.Redirect(w, r, "/new.img?X-Amz-Signature=SECRET", http.StatusFound)
		default:
			o.ServeHTTP(w, r)
		}
	}))
	d := openURL(t, s.URL+"/old.img", config(t), diskserve.Options{Format: "raw"})
	got := make([]byte, len(data))
	if err := diskserve.ReadFullAt(d, got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read: %v", err)
	}
	if redirected.Load() != 1 || heads.Load() != 1 { // the probing GET at open
		t.Errorf("%d requests redirected, %d HEADs", redirected.Load(), heads.Load())
	}
	if info := diskserve.Describe(d); info.Filename != s.URL+"/new.img" {
		t.Errorf("described as %q", info.Filename)
	}
}

// TestFormatsOverHTTP converts one content into every format diskserve
// writes, serves the directory over HTTP, and reads each image by URL
// through the opener: formats parse a remote container as a file, and a
// composite finds its components relative to its URL.
func TestFormatsOverHTTP(t *testing.T) {
	data := content(6 << 20)
	copy(data[2<<20:], make([]byte, 1<<20))
	dir := t.TempDir()
	src := disktest.NewMemory(data, true)
	images := map[string][]string{
		"qcow2":          nil,
		"zstd":           {"frame_size=256K"},
		"android-sparse": nil,
		"composite":      {"components=3"},
	}
	for name, opts := range images {
		f, err := diskserve.LookupFormat(format.All(), name)
		if err != nil {
			t.Fatal(err)
		}
		o, err := diskserve.ParseCreateOptions(opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := newimage.Convert(context.Background(), src, filepath.Join(dir, "disk."+name), newimage.Target{Format: f, Options: o, Compress: name == "qcow2"}, nil); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	s := serve(t, http.FileServer(http.Dir(dir)))
	for name := range images {
		t.Run(name, func(t *testing.T) {
			d := openURL(t, s.URL+"/disk."+name, config(t), diskserve.Options{})
			if got := diskserve.Describe(d).Format; got != name {
				t.Errorf("detected as %s", got)
			}
			got := make([]byte, len(data))
			if err := diskserve.ReadFullAt(d, got, 0); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read: %v", err)
			}
		})
	}
}
