package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/diskserve/diskserve"
)

// An Export is one export as the API sees it.
type Export struct {
	Name string
	Live *Live
}

// ExportInfo is what GET /v1/exports reports of an export.
type ExportInfo struct {
	Name     string  `json:"name"`
	Size     int64   `json:"size"`
	ReadOnly bool    `json:"read_only"`
	Clients  int     `json:"clients"`
	Chain    []Image `json:"chain"` // the top image first, then its backing files
}

// An Image is one image of a chain.
type Image struct {
	Path   string `json:"path"`
	Format string `json:"format"`
}

// OverlayRequest is the body of POST /v1/overlay, and of POST /v1/commit
// (without Overlay).
type OverlayRequest struct {
	Export  string `json:"export"`
	Overlay string `json:"overlay"`
}

// apiError is the body of every failed request.
type apiError struct {
	Error string `json:"error"`
}

// Handler serves the API: GET /v1/exports, POST /v1/overlay, POST
// /v1/commit and GET /metrics (gatherer's metrics in Prometheus text format). clients
// counts the connections attached to an export.
func Handler(exports []Export, clients func(name string) int, gatherer prometheus.Gatherer) http.Handler {
	byName := map[string]*Live{}
	for _, e := range exports {
		byName[e.Name] = e.Live
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/exports", func(w http.ResponseWriter, _ *http.Request) {
		out := []ExportInfo{}
		for _, e := range exports {
			info := diskserve.Describe(e.Live)
			ei := ExportInfo{Name: e.Name, Size: info.VirtualSize, ReadOnly: info.ReadOnly, Clients: clients(e.Name)}
			for i := &info; i != nil; i = i.Backing {
				ei.Chain = append(ei.Chain, Image{Path: i.Filename, Format: i.Format})
			}
			out = append(out, ei)
		}
		reply(w, http.StatusOK, out)
	})
	// live decodes a request naming an export, or answers it with an error.
	live := func(w http.ResponseWriter, r *http.Request, req *OverlayRequest) *Live {
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(req); err != nil {
			reply(w, http.StatusBadRequest, apiError{"bad request: " + err.Error()})
			return nil
		}
		l, ok := byName[req.Export]
		if !ok {
			reply(w, http.StatusNotFound, apiError{fmt.Sprintf("no export %q", req.Export)})
		}
		return l
	}
	done := func(w http.ResponseWriter, req OverlayRequest, err error) {
		if err != nil {
			reply(w, http.StatusConflict, apiError{err.Error()})
			return
		}
		reply(w, http.StatusOK, req)
	}
	mux.HandleFunc("POST /v1/overlay", func(w http.ResponseWriter, r *http.Request) {
		var req OverlayRequest
		if l := live(w, r, &req); l != nil {
			if req.Overlay == "" {
				reply(w, http.StatusBadRequest, apiError{"overlay: a path is needed"})
				return
			}
			done(w, req, l.Overlay(req.Overlay))
		}
	})
	mux.HandleFunc("POST /v1/commit", func(w http.ResponseWriter, r *http.Request) {
		var req OverlayRequest
		if l := live(w, r, &req); l != nil {
			done(w, req, l.Commit())
		}
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	return mux
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// Listen listens on the Unix socket at path, readable and writable by
// its owner only, replacing a stale socket left there.
func Listen(path string) (net.Listener, error) {
	if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
		os.Remove(path)
	}
	old := syscall.Umask(0o177) // no moment at which others may connect
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// A Client calls the API over its Unix socket.
type Client struct {
	http *http.Client
}

// NewClient returns a client of the API at the socket path.
func NewClient(path string) *Client {
	return &Client{http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}
}

// Exports lists the exports.
func (c *Client) Exports() ([]ExportInfo, error) {
	var out []ExportInfo
	return out, c.call("GET", "/v1/exports", nil, &out)
}

// Overlay moves an export onto a new qcow2 overlay over its current
// image, live.
func (c *Client) Overlay(export, overlay string) error {
	return c.call("POST", "/v1/overlay", OverlayRequest{Export: export, Overlay: overlay}, nil)
}

// Commit merges an export's top overlay into its backing image.
func (c *Client) Commit(export string) error {
	return c.call("POST", "/v1/commit", OverlayRequest{Export: export}, nil)
}

// Metrics returns the metrics in Prometheus text format.
func (c *Client) Metrics() (string, error) {
	resp, err := c.http.Get("http://diskserve/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func (c *Client) call(method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://diskserve"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e apiError
		json.NewDecoder(resp.Body).Decode(&e)
		return errors.New(e.Error)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}
