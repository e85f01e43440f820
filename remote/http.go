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
	"sync/atomic"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/remote/cache"
)

// ErrChanged is the error of a read of an object that was replaced after
// it was opened.
var ErrChanged = errors.New("the remote object changed since it was opened")

// An object is a remote object read with ranged GETs over HTTP(S): a
// [cache.Source]. S3 objects are objects whose requests are signed.
type object struct {
	client   *http.Client
	cfg      *Config
	url      string // after redirects; may hold a presigned query
	id       cache.Identity
	size     int64
	etag     string
	modified string                    // Last-Modified, when there is no ETag
	sign     func(*http.Request) error // nil: requests go as they are
	retries  atomic.Int64              // requests tried again
}

var _ cache.Source = (*object)(nil)

// openObject finds the size and version of the object at rawURL: with a
// HEAD, or, where HEAD is refused (a presigned GET URL) or says nothing of
// ranges, with a GET of the first byte, which also shows that the server
// serves ranges. Redirects are followed and the final URL kept.
func openObject(ctx context.Context, rawURL string, id cache.Identity, cfg *Config, sign func(*http.Request) error) (*object, error) {
	o := &object{client: cfg.client(), cfg: cfg, url: rawURL, id: id, sign: sign}
	resp, err := o.do(ctx, http.MethodHead, "")
	if err == nil && resp.StatusCode == http.StatusOK && resp.Header.Get("Accept-Ranges") == "bytes" && resp.ContentLength >= 0 {
		o.size = resp.ContentLength
	} else {
		resp, err = o.do(ctx, http.MethodGet, "bytes=0-0")
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", o.id.Name, err)
		}
		switch resp.StatusCode {
		case http.StatusPartialContent:
			_, _, total, ok := contentRange(resp.Header.Get("Content-Range"))
			if !ok || total < 0 {
				return nil, fmt.Errorf("open %s: the server gave no object size (Content-Range %q)", o.id.Name, resp.Header.Get("Content-Range"))
			}
			o.size = total
		case http.StatusRequestedRangeNotSatisfiable: // an empty object
			if _, _, total, ok := contentRange(resp.Header.Get("Content-Range")); !ok || total != 0 {
				return nil, fmt.Errorf("open %s: the server refused the first byte (%s)", o.id.Name, resp.Status)
			}
		case http.StatusOK:
			return nil, fmt.Errorf("open %s: the server does not serve byte ranges (it answered a ranged GET with the whole object), so the image cannot be read in place", o.id.Name)
		default:
			return nil, fmt.Errorf("open %s: %s", o.id.Name, statusError(resp))
		}
	}
	if resp.Request != nil && resp.Request.URL.String() != o.url {
		o.url = resp.Request.URL.String() // after redirects
		if sign == nil {
			o.id.Name = diskserve.DisplayName(o.url)
		}
	}
	o.etag = resp.Header.Get("ETag")
	o.id.Validator = o.etag
	if o.etag == "" {
		o.modified = resp.Header.Get("Last-Modified")
		o.id.Validator = o.modified
	}
	return o, nil
}

// do sends one request of the object (a ranged one when rng is set), tried
// again on failures that may pass, and returns the response with its body
// read and closed: it is for requests whose bodies do not matter.
func (o *object) do(ctx context.Context, method, rng string) (*http.Response, error) {
	var resp *http.Response
	err := o.retry(ctx, func(ctx context.Context) error {
		req, err := o.request(ctx, method, rng)
		if err != nil {
			return permanent(err)
		}
		if resp, err = o.client.Do(req); err != nil {
			return err
		}
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4096)) // so that the connection is reused
		resp.Body.Close()
		if retryable(resp.StatusCode) {
			return fmt.Errorf("%s", statusError(resp))
		}
		return nil
	})
	return resp, err
}

// request makes a request of the object, signed if the object's requests
// are.
func (o *object) request(ctx context.Context, method, rng string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, o.url, nil)
	if err != nil {
		return nil, err
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	if o.etag != "" {
		req.Header.Set("If-Match", o.etag)
	} else if o.modified != "" {
		req.Header.Set("If-Unmodified-Since", o.modified)
	}
	if o.sign != nil {
		if err := o.sign(req); err != nil {
			return nil, err
		}
	}
	return req, nil
}

// Size returns the object's size.
func (o *object) Size() int64 { return o.size }

// Identity names the object and the version opened.
func (o *object) Identity() cache.Identity { return o.id }

// Retries counts the requests tried again.
func (o *object) Retries() int64 { return o.retries.Load() }

// Close lets the client's idle connections go.
func (o *object) Close() error {
	o.client.CloseIdleConnections()
	return nil
}

// Fetch fills p from off with a ranged GET pinned to the version opened;
// when a try fails after some bytes arrived, the next asks for the rest.
func (o *object) Fetch(ctx context.Context, p []byte, off int64, progress func(int)) error {
	filled := 0
	err := o.retry(ctx, func(ctx context.Context) error {
		return o.get(ctx, p, off, &filled, progress)
	})
	if err != nil {
		return fmt.Errorf("GET bytes %d-%d: %w", off+int64(filled), off+int64(len(p))-1, err)
	}
	return nil
}

// get asks for p[*filled:] and reads what arrives into it, advancing
// *filled and calling progress.
func (o *object) get(ctx context.Context, p []byte, off int64, filled *int, progress func(int)) error {
	start := off + int64(*filled)
	end := off + int64(len(p)) - 1
	req, err := o.request(ctx, http.MethodGet, "bytes="+strconv.FormatInt(start, 10)+"-"+strconv.FormatInt(end, 10))
	if err != nil {
		return permanent(err)
	}
	resp, err := o.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusPreconditionFailed:
		return permanent(ErrChanged)
	case retryable(resp.StatusCode):
		return fmt.Errorf("%s", statusError(resp))
	case resp.StatusCode != http.StatusPartialContent:
		return permanent(fmt.Errorf("%s to a ranged GET", statusError(resp)))
	}
	first, last, total, ok := contentRange(resp.Header.Get("Content-Range"))
	if !ok || first != start || last != end || total != o.size {
		return permanent(fmt.Errorf("%w: Content-Range %q for bytes %d-%d of %d", ErrChanged, resp.Header.Get("Content-Range"), start, end, o.size))
	}
	for *filled < len(p) {
		n, err := resp.Body.Read(p[*filled:])
		if n > 0 {
			*filled += n
			progress(*filled)
		}
		if err == io.EOF && *filled < len(p) {
			return fmt.Errorf("body cut short after %d bytes", *filled)
		}
		if err != nil && err != io.EOF {
			return fmt.Errorf("body: %w", err)
		}
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 512)) // see EOF, so that the connection is reused
	return nil
}

// retry runs attempt up to cfg.Attempts times, each under cfg.Timeout,
// with an exponential backoff and jitter between them, until it succeeds,
// fails permanently or ctx ends.
func (o *object) retry(ctx context.Context, attempt func(ctx context.Context) error) error {
	backoff := firstBackoff
	var err error
	for i := range o.cfg.attempts() {
		if i > 0 {
			o.retries.Add(1)
			select {
			case <-time.After(backoff + rand.N(backoff)):
			case <-ctx.Done():
				return ctx.Err()
			}
			backoff *= 2
		}
		actx, cancel := context.WithTimeout(ctx, o.cfg.timeout())
		err = attempt(actx)
		cancel()
		var p permanentError
		if err == nil || errors.As(err, &p) || ctx.Err() != nil {
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

// statusError describes a response that failed, with the error code an
// S3 server puts in its body when the body was kept.
func statusError(resp *http.Response) string {
	if code := resp.Header.Get("X-Amz-Error-Code"); code != "" {
		return resp.Status + " (" + code + ")"
	}
	return resp.Status
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
