// Package remotetest starts the servers that the remote-image tests read
// from: versitygw (an S3 server, built from the tool module in ./tool so
// that its dependencies stay out of diskserve's go.mod), nginx, and a
// proxy in front of either that counts requests and injects faults.
//
// Like [testtool.Need], a server that cannot be had skips the test, or
// fails it under DISKSERVE_REQUIRE_INTEROP=1.
package remotetest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"golang.org/x/sys/unix"

	"github.com/diskserve/diskserve/internal/testtool"
)

// Credentials of the test S3 server.
const (
	AccessKey = "diskserve-test"
	SecretKey = "diskserve-test-secret"
	Region    = "us-east-1"
)

// BinaryEnv names a versitygw binary to use instead of building one;
// test.sh builds it once and sets it.
const BinaryEnv = "DISKSERVE_VERSITYGW"

// versitygw returns the path of a versitygw binary: $DISKSERVE_VERSITYGW,
// or one built from the tool module into the user cache directory, once
// per version of the module (its go.sum), under a lock so that test
// packages running at once build it once.
func versitygw(t testing.TB) string {
	t.Helper()
	if p := os.Getenv(BinaryEnv); p != "" {
		return p
	}
	_, file, _, _ := runtime.Caller(0)
	tool := filepath.Join(filepath.Dir(file), "tool")
	sum, err := os.ReadFile(filepath.Join(tool, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(sum)
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "diskserve-test")
	bin := filepath.Join(dir, "versitygw-"+hex.EncodeToString(h[:6]))
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	lock, err := os.OpenFile(bin+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	unix.Flock(int(lock.Fd()), unix.LOCK_EX)
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	out, err := exec.Command("go", "build", "-C", tool, "-o", bin+".tmp", "github.com/versity/versitygw/cmd/versitygw").CombinedOutput()
	if err == nil {
		err = os.Rename(bin+".tmp", bin)
	}
	if err != nil {
		if os.Getenv(testtool.RequireEnv) == "1" {
			t.Fatalf("building versitygw: %v\n%s", err, out)
		}
		t.Skipf("cannot build versitygw: %v\n%s", err, out)
	}
	return bin
}

// freePort returns a TCP port on 127.0.0.1 that nothing listens on now.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// waitListening waits until addr accepts connections, or fails the test
// with the server's log.
func waitListening(t testing.TB, addr string, exited <-chan error, log func() string) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		select {
		case err := <-exited:
			t.Fatalf("the server exited: %v\n%s", err, log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %s:\n%s", addr, log())
		}
	}
}

// start runs cmd until the test ends.
func start(t testing.TB, cmd *exec.Cmd, addr string) {
	t.Helper()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	waitListening(t, addr, exited, out.String)
}

// An S3 is a versitygw server with a posix backend in a temporary
// directory.
type S3 struct {
	URL  string // http://127.0.0.1:PORT
	Root string // the buckets, as directories
}

// StartS3 starts an S3 server for the test.
func StartS3(t testing.TB) *S3 {
	t.Helper()
	bin := versitygw(t)
	root := t.TempDir()
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	cmd := exec.Command(bin, "--access", AccessKey, "--secret", SecretKey, "--region", Region, "--port", addr, "--quiet", "posix", root)
	start(t, cmd, addr)
	return &S3{URL: "http://" + addr, Root: root}
}

// Env sets the environment by which diskserve finds an S3 server at url
// (this one's, or a proxy's in front of it), for the test and the
// processes it starts.
func Env(t *testing.T, url string) {
	t.Setenv("AWS_ACCESS_KEY_ID", AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", SecretKey)
	t.Setenv("AWS_REGION", Region)
	t.Setenv("AWS_ENDPOINT_URL_S3", url)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
}

// CreateBucket makes a bucket.
func (s *S3) CreateBucket(t testing.TB, bucket string) {
	t.Helper()
	s.do(t, http.MethodPut, "/"+bucket, nil)
}

// Put stores data as bucket/key, as a client would (the server records
// its ETag), and returns the ETag.
func (s *S3) Put(t testing.TB, bucket, key string, data []byte) string {
	t.Helper()
	return s.do(t, http.MethodPut, "/"+bucket+"/"+key, data).Header.Get("ETag")
}

// PutFile stores the file at path as bucket/key.
func (s *S3) PutFile(t testing.TB, bucket, key, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return s.Put(t, bucket, key, data)
}

// do sends a signed request and fails the test unless it succeeds.
func (s *S3) do(t testing.TB, method, path string, body []byte) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, s.URL+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(body)
	payload := hex.EncodeToString(sum[:])
	req.Header.Set("X-Amz-Content-Sha256", payload)
	creds := aws.Credentials{AccessKeyID: AccessKey, SecretAccessKey: SecretKey}
	if err := v4.NewSigner().SignHTTP(context.Background(), creds, req, payload, "s3", Region, time.Now()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		t.Fatalf("%s %s: %s\n%s", method, path, resp.Status, msg)
	}
	return resp
}

// StartNginx serves the files under root with Debian's nginx, with a
// configuration of the test's own, and returns its URL.
func StartNginx(t testing.TB, root string) string {
	t.Helper()
	testtool.Need(t, "nginx")
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	cmd, err := NginxCommand(t.TempDir(), addr, root)
	if err != nil {
		t.Fatal(err)
	}
	start(t, cmd, addr)
	return "http://" + addr
}

// NginxCommand writes a configuration for nginx to serve the files under
// root on addr, with its files in dir, and returns the command that runs
// it in the foreground.
func NginxCommand(dir, addr, root string) (*exec.Cmd, error) {
	user := ""
	if os.Geteuid() == 0 {
		user = "user root root;" // the workers must read the caller's files
	}
	conf := fmt.Sprintf(`%s
daemon off;
worker_processes 2;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log;
events { worker_connections 256; }
http {
	access_log off;
	client_body_temp_path %[2]s/tmp-body;
	proxy_temp_path %[2]s/tmp-proxy;
	fastcgi_temp_path %[2]s/tmp-fastcgi;
	uwsgi_temp_path %[2]s/tmp-uwsgi;
	scgi_temp_path %[2]s/tmp-scgi;
	keepalive_requests 100000;
	server {
		listen %[3]s;
		root %[4]s;
	}
}
`, user, dir, addr, root)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	return exec.Command("nginx", "-p", dir, "-c", path, "-e", filepath.Join(dir, "error.log")), nil
}

// Presign returns a presigned GET URL of bucket/key, valid for an hour.
func (s *S3) Presign(t testing.TB, bucket, key string) string {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, s.URL+"/"+bucket+"/"+key+"?X-Amz-Expires=3600", nil)
	if err != nil {
		t.Fatal(err)
	}
	creds := aws.Credentials{AccessKeyID: AccessKey, SecretAccessKey: SecretKey}
	u, _, err := v4.NewSigner().PresignHTTP(context.Background(), creds, req, "UNSIGNED-PAYLOAD", "s3", Region, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return u
}
