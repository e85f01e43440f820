// Package remote opens images kept in S3 buckets or on HTTP(S) servers
// as read-only containers that formats parse like local files: `diskserve
// serve s3://golden/debian.qcow2` reads only the bytes its clients read,
// through a persistent block cache on local disk ([cache]).
//
// # Names
//
//   - http:// and https:// URLs, presigned ones included (the size comes
//     from the Content-Range of a one-byte GET where HEAD is refused);
//     redirects are followed at open and the final URL kept.
//   - s3://BUCKET/KEY[?versionId=V]: requests are signed with SigV4 and
//     credentials from the standard AWS chain (environment, shared files,
//     AWS_PROFILE, instance roles). The endpoint is AWS's for AWS_REGION,
//     or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (then path-style).
//
// Every read is pinned to the version seen at open (If-Match on its ETag,
// or If-Unmodified-Since): an object replaced while served gives read
// errors, never a mix of old and new bytes. Requests that fail in a way
// that may pass (5xx, 429, resets, bodies cut short) are tried again with
// backoff, each under a timeout.
package remote

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/remote/cache"
)

// IsURL reports whether name is the URL of a remote image: http://,
// https:// or s3://.
func IsURL(name string) bool {
	for _, s := range []string{"http://", "https://", "s3://"} {
		if strings.HasPrefix(name, s) {
			return true
		}
	}
	return false
}

// Defaults of [Config].
const (
	defaultTimeout  = 30 * time.Second
	defaultAttempts = 5
	firstBackoff    = 100 * time.Millisecond
)

// Config configures how remote images are opened. The zero value means
// the defaults: the user's cache directory, 1 MiB chunks, no size bound,
// 8 GETs in flight per image.
type Config struct {
	// Cache configures the block cache. An empty Dir means
	// $XDG_CACHE_HOME/diskserve (or ~/.cache/diskserve).
	Cache cache.Config
	// Client makes the requests; nil means one with keep-alive
	// connections for the cache's parallelism, proxies from the
	// environment and the system's CA bundle.
	Client *http.Client
	// Timeout bounds each request; 0 means 30 s.
	Timeout time.Duration
	// Attempts is how often a request is tried before its error is
	// returned; 0 means 5.
	Attempts int
	// Logger receives warnings; nil discards them.
	Logger *slog.Logger
}

func (c *Config) timeout() time.Duration {
	if c.Timeout == 0 {
		return defaultTimeout
	}
	return c.Timeout
}

func (c *Config) attempts() int {
	if c.Attempts == 0 {
		return defaultAttempts
	}
	return c.Attempts
}

func (c *Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}

func (c *Config) client() *http.Client {
	if c.Client != nil {
		return c.Client
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = 2 * max(c.Cache.Fetches, cache.DefaultFetches)
	return &http.Client{Transport: t}
}

// DefaultCacheDir is where remote images are cached when no directory is
// given.
func DefaultCacheDir() (string, error) {
	dir, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("no cache directory (set XDG_CACHE_HOME or give --cache-dir): %w", err)
	}
	return filepath.Join(dir, "diskserve"), nil
}

// Open opens the remote image name (see [IsURL]) through its block cache,
// read-only.
func (c Config) Open(name string) (*cache.Disk, error) {
	if c.Cache.Dir == "" {
		dir, err := DefaultCacheDir()
		if err != nil {
			return nil, err
		}
		c.Cache.Dir = dir
	}
	if c.Cache.Logger == nil {
		c.Cache.Logger = c.Logger
	}
	ctx := context.Background()
	var (
		o   *object
		err error
	)
	if strings.HasPrefix(name, "s3://") {
		o, err = openS3(ctx, name, &c)
	} else {
		id := cache.Identity{Name: diskserve.DisplayName(name), Key: diskserve.DisplayName(name)}
		o, err = openObject(ctx, name, id, &c, nil)
	}
	if err != nil {
		return nil, err
	}
	d, err := cache.Open(o, c.Cache)
	if err != nil {
		o.Close()
		return nil, err
	}
	return d, nil
}
