// Package remote opens images kept on HTTP(S) servers as read-only
// containers that formats parse like local files: `diskserve serve
// https://host/golden.qcow2` reads only the bytes its clients read, with
// ranged GETs.
//
// # Supported
//
//   - http:// and https:// URLs, presigned ones included (the size comes
//     from the Content-Range of a one-byte GET, since a presigned URL may
//     refuse HEAD); redirects followed at open and the final URL kept.
//   - Every read pinned to the object seen at open: If-Match on its ETag,
//     or If-Unmodified-Since on its Last-Modified; an object replaced while
//     served gives read errors, never a mix of old and new bytes.
//   - Bounded retries with backoff on 5xx, 429, resets and short bodies,
//     a timeout per request, and proxies and CA bundles from the
//     environment as net/http takes them.
//
// # Not supported yet
//
// A persistent block cache, s3:// URLs and coalesced, parallel fetches
// (issue #24): every read is a GET of what it asks for.
package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/diskserve/diskserve"
)

// IsURL reports whether name is the URL of a remote image (http:// or
// https://).
func IsURL(name string) bool {
	return strings.HasPrefix(name, "http://") || strings.HasPrefix(name, "https://")
}

// Defaults of [Options].
const (
	defaultTimeout  = 30 * time.Second
	defaultAttempts = 5
	firstBackoff    = 100 * time.Millisecond
	idleConns       = 16 // kept alive to one server: the exporters' parallelism
)

// Options configure [OpenHTTP]. The zero value means the defaults.
type Options struct {
	// Client makes the requests; nil means one with keep-alive
	// connections for the exporters' parallelism, proxies from the
	// environment and the system's CA bundle.
	Client *http.Client
	// Timeout bounds each request; 0 means 30 s.
	Timeout time.Duration
	// Attempts is how often a request is tried before its error is
	// returned; 0 means 5.
	Attempts int
}

// ErrChanged is the error of a read of an object that was replaced after
// it was opened.
var ErrChanged = errors.New("the remote object changed since it was opened")

// An HTTP is an object on an HTTP(S) server, read-only: a
// [diskserve.DiskFile] container.
type HTTP struct {
	client   *http.Client
	o        Options
	url      string // after redirects; may hold a presigned query
	name     string // url without credentials or query, for messages
	size     int64
	etag     string
	modified string // Last-Modified, when there is no ETag
}

var (
	_ diskserve.DiskFile  = (*HTTP)(nil)
	_ diskserve.Describer = (*HTTP)(nil)
)

// OpenHTTP opens the object at rawURL: it asks for its first byte, which
// gives its size and validators and shows that the server serves ranges.
func OpenHTTP(rawURL string, o Options) (*HTTP, error) {
	if o.Timeout == 0 {
		o.Timeout = defaultTimeout
	}
	if o.Attempts == 0 {
		o.Attempts = defaultAttempts
	}
	client := o.Client
	if client == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = idleConns
		client = &http.Client{Transport: t}
	}
	h := &HTTP{client: client, o: o, url: rawURL, name: diskserve.DisplayName(rawURL)}
	var resp *http.Response
	err := h.retry(func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.url, nil)
		if err != nil {
			return permanent(err)
		}
		req.Header.Set("Range", "bytes=0-0")
		resp, err = h.client.Do(req)
		if err != nil {
			return err
		}
		if retryable(resp.StatusCode) {
			resp.Body.Close()
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", h.name, err)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 512)) // to EOF, so that the connection is reused
	switch resp.StatusCode {
	case http.StatusPartialContent:
		_, _, total, ok := contentRange(resp.Header.Get("Content-Range"))
		if !ok || total < 0 {
			return nil, fmt.Errorf("open %s: the server gave no object size (Content-Range %q)", h.name, resp.Header.Get("Content-Range"))
		}
		h.size = total
	case http.StatusRequestedRangeNotSatisfiable: // an empty object
		if _, _, total, ok := contentRange(resp.Header.Get("Content-Range")); !ok || total != 0 {
			return nil, fmt.Errorf("open %s: the server refused the first byte (%s)", h.name, resp.Status)
		}
	case http.StatusOK:
		return nil, fmt.Errorf("open %s: the server does not serve byte ranges (it answered a ranged GET with the whole object), so the image cannot be read in place", h.name)
	default:
		return nil, fmt.Errorf("open %s: %s", h.name, resp.Status)
	}
	h.url = resp.Request.URL.String() // after redirects
	h.name = diskserve.DisplayName(h.url)
	h.etag = resp.Header.Get("ETag")
	if h.etag == "" {
		h.modified = resp.Header.Get("Last-Modified")
	}
	return h, nil
}

// Size returns the object's size.
func (h *HTTP) Size() int64 { return h.size }

// ReadOnly is true: remote objects are only read.
func (h *HTTP) ReadOnly() bool { return true }

// WriteAt fails: the object is read-only.
func (h *HTTP) WriteAt([]byte, int64) (int, error) {
	return 0, fmt.Errorf("write %s: %w", h.name, diskserve.ErrReadOnly)
}

// Close lets the client's idle connections go.
func (h *HTTP) Close() error {
	h.client.CloseIdleConnections()
	return nil
}

// Describe names the object, without credentials.
func (h *HTTP) Describe(info *diskserve.Info) {
	info.Filename = h.name
	info.Specific = map[string]any{"url": h.name, "etag": h.etag}
}

// ReadAt reads [off, off+len(p)) of the object with one ranged GET,
// pinned to the object opened.
func (h *HTTP) ReadAt(p []byte, off int64) (int, error) {
	p, eof := diskserve.ClipRead(h.size, off, p)
	if len(p) == 0 {
		return 0, eof
	}
	err := h.retry(func(ctx context.Context) error { return h.get(ctx, p, off) })
	if err != nil {
		return 0, fmt.Errorf("read %d bytes at %d of %s: %w", len(p), off, h.name, err)
	}
	return len(p), eof
}

// get fills p from off with one GET.
func (h *HTTP) get(ctx context.Context, p []byte, off int64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.url, nil)
	if err != nil {
		return permanent(err)
	}
	end := off + int64(len(p)) - 1
	req.Header.Set("Range", "bytes="+strconv.FormatInt(off, 10)+"-"+strconv.FormatInt(end, 10))
	if h.etag != "" {
		req.Header.Set("If-Match", h.etag)
	} else if h.modified != "" {
		req.Header.Set("If-Unmodified-Since", h.modified)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusPreconditionFailed:
		return permanent(ErrChanged)
	case retryable(resp.StatusCode):
		return fmt.Errorf("status %s", resp.Status)
	case resp.StatusCode != http.StatusPartialContent:
		return permanent(fmt.Errorf("status %s to a ranged GET", resp.Status))
	}
	start, last, total, ok := contentRange(resp.Header.Get("Content-Range"))
	if !ok || start != off || last != end || total != h.size {
		return permanent(fmt.Errorf("%w: Content-Range %q for bytes %d-%d of %d", ErrChanged, resp.Header.Get("Content-Range"), off, end, h.size))
	}
	if _, err := io.ReadFull(resp.Body, p); err != nil {
		return fmt.Errorf("body cut short: %w", err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 512)) // see EOF, so that the connection is reused
	return nil
}

// retry runs attempt up to o.Attempts times, each under o.Timeout, with
// an exponential backoff and jitter between them, until it succeeds or
// fails permanently.
func (h *HTTP) retry(attempt func(ctx context.Context) error) error {
	backoff := firstBackoff
	var err error
	for i := range h.o.Attempts {
		if i > 0 {
			time.Sleep(backoff + rand.N(backoff))
			backoff *= 2
		}
		ctx, cancel := context.WithTimeout(context.Background(), h.o.Timeout)
		err = attempt(ctx)
		cancel()
		var p permanentError
		if err == nil || errors.As(err, &p) {
			break
		}
	}
	if p, ok := err.(permanentError); ok {
		return p.err
	}
	return redactErr(err)
}

// A permanentError is not worth retrying.
type permanentError struct{ err error }

func (p permanentError) Error() string { return p.err.Error() }
func (p permanentError) Unwrap() error { return p.err }

func permanent(err error) error { return permanentError{err} }

// retryable reports whether a status may go away when asked again.
func retryable(status int) bool {
	return status >= 500 || status == http.StatusTooManyRequests || status == http.StatusRequestTimeout
}

// contentRange parses "bytes START-END/TOTAL" (TOTAL may be "*", given as
// -1) or "bytes */TOTAL" (START and END then -1).
func contentRange(v string) (start, end, total int64, ok bool) {
	v, ok = strings.CutPrefix(v, "bytes ")
	if !ok {
		return 0, 0, 0, false
	}
	r, t, ok := strings.Cut(v, "/")
	if !ok {
		return 0, 0, 0, false
	}
	total = -1
	if t != "*" {
		var err error
		if total, err = strconv.ParseInt(t, 10, 64); err != nil || total < 0 {
			return 0, 0, 0, false
		}
	}
	if r == "*" {
		return -1, -1, total, true
	}
	s, e, ok := strings.Cut(r, "-")
	if !ok {
		return 0, 0, 0, false
	}
	start, err1 := strconv.ParseInt(s, 10, 64)
	end, err2 := strconv.ParseInt(e, 10, 64)
	if err1 != nil || err2 != nil || start < 0 || end < start {
		return 0, 0, 0, false
	}
	return start, end, total, true
}

// redactErr keeps a *url.Error, which names the whole URL, from carrying
// credentials into messages.
func redactErr(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("%s %s: %w", ue.Op, diskserve.DisplayName(ue.URL), ue.Err)
	}
	return err
}
