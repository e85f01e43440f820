// Package bundle reads, writes and verifies the manifest of a snapshot
// bundle (`diskserve bundle save`): a directory holding the data of a
// disk at one point in time and a manifest.json that says what it is and
// gives a SHA-256 digest of every chunk of the guest-visible bytes, so
// that a bundle is checked before it is used.
package bundle

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/diskserve/diskserve"
)

// Version is the manifest version this package writes and the only one
// it reads.
const Version = 1

// ChunkSize is the span each digest covers (the last chunk may be
// shorter).
const ChunkSize = 4 << 20

// ManifestName is the manifest's file name inside a bundle.
const ManifestName = "manifest.json"

// A Manifest describes a bundle.
type Manifest struct {
	Version          int       `json:"manifest_version"`
	Created          time.Time `json:"created"`
	DiskserveVersion string    `json:"diskserve_version"`
	Source           Source    `json:"source"`
	Data             Data      `json:"data"`
	ChunkSize        int64     `json:"chunk_size"`
	Digests          []string  `json:"sha256_chunks"` // hex, one per chunk, in order
}

// Source is the image the bundle was saved from.
type Source struct {
	Path        string  `json:"path"`
	Format      string  `json:"format"`
	VirtualSize int64   `json:"virtual_size"`
	Chain       []Image `json:"chain"` // the image, then its backing files, outermost first
}

// An Image is one image of a chain.
type Image struct {
	Path   string `json:"path"`
	Format string `json:"format"`
}

// Data is the file in the bundle that holds the disk.
type Data struct {
	File   string `json:"file"`   // name inside the bundle
	Format string `json:"format"` // raw or qcow2
	How    string `json:"how"`    // hardlink, qcow2 or qcow2-compressed
}

// ChainOf lists info's image and its backing files.
func ChainOf(info diskserve.Info) []Image {
	var chain []Image
	for i := &info; i != nil; i = i.Backing {
		chain = append(chain, Image{Path: i.Filename, Format: i.Format})
	}
	return chain
}

// Digests returns the SHA-256 of every ChunkSize chunk of d, computed on
// several goroutines.
func Digests(ctx context.Context, d diskserve.DiskFile) ([]string, error) {
	n := (d.Size() + ChunkSize - 1) / ChunkSize
	out := make([]string, n)
	err := eachChunk(ctx, d, func(i int64, sum string) error {
		out[i] = sum
		return nil
	})
	return out, err
}

// Check verifies d against m: its size, then every chunk's digest in
// parallel. The error names the first chunk (lowest offset) that differs.
func Check(ctx context.Context, m *Manifest, d diskserve.DiskFile) error {
	if d.Size() != m.Source.VirtualSize {
		return fmt.Errorf("the data holds %d bytes, the manifest says %d", d.Size(), m.Source.VirtualSize)
	}
	var mu sync.Mutex
	first := int64(-1)
	err := eachChunk(ctx, d, func(i int64, sum string) error {
		if sum != m.Digests[i] {
			mu.Lock()
			if first < 0 || i < first {
				first = i
			}
			mu.Unlock()
		}
		return nil
	})
	if err != nil {
		return err
	}
	if first >= 0 {
		return fmt.Errorf("chunk %d (bytes %d to %d) does not match its digest: the data is damaged", first, first*ChunkSize, min((first+1)*ChunkSize, d.Size()))
	}
	return nil
}

// eachChunk hashes every chunk of d and calls fn, from several goroutines,
// with its index and digest.
func eachChunk(ctx context.Context, d diskserve.DiskFile, fn func(i int64, sum string) error) error {
	n := (d.Size() + ChunkSize - 1) / ChunkSize
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	next := make(chan int64)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			buf := make([]byte, ChunkSize)
			for i := range next {
				b := buf[:min(ChunkSize, d.Size()-i*ChunkSize)]
				if err := diskserve.ReadFullAt(d, b, i*ChunkSize); err != nil {
					cancel(fmt.Errorf("read chunk %d: %w", i, err))
					continue
				}
				sum := sha256.Sum256(b)
				if err := fn(i, hex.EncodeToString(sum[:])); err != nil {
					cancel(err)
				}
			}
		})
	}
feed:
	for i := range n {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	return context.Cause(ctx)
}

// Write writes m as dir's manifest and syncs it.
func Write(dir string, m *Manifest) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, ManifestName))
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	return errors.Join(err, f.Sync(), f.Close())
}

// Read reads dir's manifest and checks each field a restore relies on,
// naming the first that is wrong.
func Read(dir string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestName))
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, ManifestName), err)
	}
	bad := func(format string, a ...any) (*Manifest, error) {
		return nil, fmt.Errorf("%s: %s", filepath.Join(dir, ManifestName), fmt.Sprintf(format, a...))
	}
	switch {
	case m.Version != Version:
		return bad("manifest_version is %d; this diskserve reads version %d", m.Version, Version)
	case m.Source.VirtualSize < 0:
		return bad("source.virtual_size is %d", m.Source.VirtualSize)
	case m.ChunkSize != ChunkSize:
		return bad("chunk_size is %d, want %d", m.ChunkSize, ChunkSize)
	case int64(len(m.Digests)) != (m.Source.VirtualSize+ChunkSize-1)/ChunkSize:
		return bad("%d chunk digests for %d bytes of %d-byte chunks", len(m.Digests), m.Source.VirtualSize, ChunkSize)
	case m.Data.Format != "raw" && m.Data.Format != "qcow2":
		return bad("data.format is %q, not raw or qcow2", m.Data.Format)
	case m.Data.File == "" || filepath.Base(m.Data.File) != m.Data.File:
		return bad("data.file %q is not a file name inside the bundle", m.Data.File)
	}
	for i, d := range m.Digests {
		if s, err := hex.DecodeString(d); err != nil || len(s) != sha256.Size {
			return bad("chunk %d's digest %q is not a SHA-256", i, d)
		}
	}
	return &m, nil
}
