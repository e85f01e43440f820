package remote

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/config"

	"github.com/diskserve/diskserve/remote/cache"
)

// unsignedPayload is the payload hash of requests without a body that
// S3 accepts.
const unsignedPayload = "UNSIGNED-PAYLOAD"

// awsConfig is the AWS configuration of the process, loaded once: the
// credential chain caches and refreshes credentials itself.
var awsConfig = sync.OnceValues(func() (aws.Config, error) {
	return config.LoadDefaultConfig(context.Background())
})

// openS3 opens s3://BUCKET/KEY[?versionId=V] with requests signed by the
// credentials of the standard AWS chain.
func openS3(ctx context.Context, name string, cfg *Config) (*object, error) {
	u, err := url.Parse(name)
	if err != nil {
		return nil, fmt.Errorf("%s: not a URL: %w", redactS3(name), err)
	}
	bucket, key := u.Host, strings.TrimPrefix(u.Path, "/")
	if bucket == "" || key == "" {
		return nil, fmt.Errorf("%s: an S3 image is named s3://BUCKET/KEY", redactS3(name))
	}
	version := u.Query().Get("versionId")
	for q := range u.Query() {
		if q != "versionId" {
			return nil, fmt.Errorf("%s: the only query an s3:// name takes is versionId, not %q", redactS3(name), q)
		}
	}
	ac, err := awsConfig()
	if err != nil {
		return nil, fmt.Errorf("%s: AWS configuration: %w", redactS3(name), err)
	}
	region := ac.Region
	if region == "" {
		region = "us-east-1"
	}
	endpoint, err := s3Endpoint(bucket, key, region)
	if err != nil {
		return nil, err
	}
	if version != "" {
		endpoint.RawQuery = "versionId=" + url.QueryEscape(version)
	}
	display := "s3://" + bucket + "/" + key
	// Keyed by bucket and key, not endpoint: the ETag and size that go
	// with the key tell versions apart, and hosts that reach one bucket
	// through different endpoints can share a cache.
	id := cache.Identity{Name: display, Key: display}
	if version != "" {
		id.Key += "?versionId=" + version
	}
	creds := ac.Credentials
	if creds != nil {
		if _, err := creds.Retrieve(ctx); err != nil {
			cfg.logger().Warn("no AWS credentials found: S3 requests go unsigned, which only public objects allow", "image", display, "err", err)
			creds = nil
		}
	}
	signer := v4.NewSigner(func(o *v4.SignerOptions) { o.DisableURIPathEscaping = true })
	sign := func(req *http.Request) error {
		req.Header.Set("X-Amz-Content-Sha256", unsignedPayload)
		if creds == nil {
			return nil
		}
		c, err := creds.Retrieve(req.Context())
		if err != nil {
			return fmt.Errorf("AWS credentials: %w", err)
		}
		return signer.SignHTTP(req.Context(), c, req, unsignedPayload, "s3", region, time.Now())
	}
	return openObject(ctx, endpoint.String(), id, cfg, sign)
}

// s3Endpoint returns the URL of an object: under AWS_ENDPOINT_URL_S3 or
// AWS_ENDPOINT_URL, path-style; otherwise AWS's virtual-hosted style, or
// path-style for bucket names with dots (which TLS certificates do not
// cover).
func s3Endpoint(bucket, key, region string) (*url.URL, error) {
	base := os.Getenv("AWS_ENDPOINT_URL_S3")
	if base == "" {
		base = os.Getenv("AWS_ENDPOINT_URL")
	}
	path := "/" + bucket + "/" + key
	if base == "" {
		if strings.Contains(bucket, ".") {
			base = "https://s3." + region + ".amazonaws.com"
		} else {
			base = "https://" + bucket + ".s3." + region + ".amazonaws.com"
			path = "/" + key
		}
	}
	u, err := url.Parse(base)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return nil, errors.New("the S3 endpoint " + base + " is not a URL")
	}
	u.Path = strings.TrimSuffix(u.Path, "/") + path
	u.RawPath = s3Escape(u.Path)
	return u, nil
}

// s3Escape percent-encodes a path as SigV4 wants it for S3: every byte
// but the unreserved ones and '/'.
func s3Escape(p string) string {
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		c := p[i]
		if 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || strings.IndexByte("-_.~/", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// redactS3 is an s3:// name without a query, for messages.
func redactS3(name string) string {
	n, _, _ := strings.Cut(name, "?")
	return n
}
