package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/remote"
	"github.com/diskserve/diskserve/remote/cache"
)

// remoteFlags configure how images named by URL (s3://, https://,
// http://) are fetched and cached.
type remoteFlags struct {
	cacheDir     string
	cacheSize    string
	chunkSize    string
	fetches      int
	prefetch     string
	prefetchRate string
	timeout      time.Duration
	allowURLs    []string
}

// register declares the flags; --allow-url only with confine, since it
// qualifies --confine.
func (f *remoteFlags) register(fs *pflag.FlagSet, confine bool) {
	fs.StringVar(&f.cacheDir, "cache-dir", "", "block cache of images named by URL (s3://, https://, http://); default $XDG_CACHE_HOME/diskserve")
	fs.StringVar(&f.cacheSize, "cache-size", "0", "most bytes the cache keeps of each remote image, evicting least recently read data first (0: no bound)")
	fs.StringVar(&f.chunkSize, "chunk-size", "1M", "unit in which remote images are fetched and cached, 64K to 64M (an existing cache keeps its own)")
	fs.IntVar(&f.fetches, "fetches", cache.DefaultFetches, "GETs in flight at most, per remote image")
	fs.StringVar(&f.prefetch, "prefetch", "none", "none, or all: fill the cache with the whole remote image in the background")
	fs.StringVar(&f.prefetchRate, "prefetch-rate", "256M", "bytes per second at most that --prefetch=all fetches")
	fs.DurationVar(&f.timeout, "remote-timeout", 30*time.Second, "time a request for remote data may take before it is tried again")
	if confine {
		fs.StringArrayVar(&f.allowURLs, "allow-url", nil, "with --confine, admit backing files and components at URLs under PREFIX (repeatable)")
	}
}

// config returns the remote configuration the flags ask for.
func (f *remoteFlags) config(log *slog.Logger) (remote.Config, error) {
	cfg := remote.Config{Timeout: f.timeout, Logger: log}
	cfg.Cache.Dir = f.cacheDir
	var err error
	if cfg.Cache.Limit, err = diskserve.ParseSize(f.cacheSize); err != nil {
		return cfg, fmt.Errorf("--cache-size: %w", err)
	}
	if cfg.Cache.ChunkSize, err = diskserve.ParseSize(f.chunkSize); err != nil || !cache.ValidChunkSize(cfg.Cache.ChunkSize) {
		return cfg, fmt.Errorf("--chunk-size %s: a power of two from 64K to 64M", f.chunkSize)
	}
	if f.fetches < 1 {
		return cfg, fmt.Errorf("--fetches %d: at least 1", f.fetches)
	}
	cfg.Cache.Fetches = f.fetches
	switch f.prefetch {
	case "none":
	case "all":
		cfg.Cache.Prefetch = true
	default:
		return cfg, fmt.Errorf("--prefetch %s: none or all", f.prefetch)
	}
	if cfg.Cache.PrefetchRate, err = diskserve.ParseSize(f.prefetchRate); err != nil || cfg.Cache.PrefetchRate <= 0 {
		return cfg, fmt.Errorf("--prefetch-rate %s: a positive size per second", f.prefetchRate)
	}
	return cfg, nil
}

// entries lists the caches under the directory the flags name, or the
// default one.
func (f *remoteFlags) entries() ([]cache.Entry, error) {
	root := f.cacheDir
	if root == "" {
		var err error
		if root, err = remote.DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	return cache.List(root)
}

func newCacheCommand() *cobra.Command {
	var f remoteFlags
	cmd := &cobra.Command{
		Use:   "cache",
		Short: "List, verify and prune the block caches of remote images",
		Long: `Images named by URL are read through a block cache on local disk, one
directory per version of each object, reused by later runs and shared by
processes on the host. These commands look after it.`,
	}
	var output string
	list := &cobra.Command{
		Use:   "list [--cache-dir DIR] [--output=human|json]",
		Short: "List the cached images: URL, version, size, how much is cached",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			entries, err := f.entries()
			if err != nil {
				return err
			}
			if output == "json" {
				type jsonEntry struct {
					Dir          string    `json:"dir"`
					URL          string    `json:"url"`
					Validator    string    `json:"validator"`
					Size         int64     `json:"size"`
					ChunkSize    int64     `json:"chunk-size"`
					ChunksCached int64     `json:"chunks-cached"`
					BytesCached  int64     `json:"bytes-cached"`
					Used         time.Time `json:"used"`
					InUse        bool      `json:"in-use"`
				}
				out := []jsonEntry{}
				for _, e := range entries {
					out = append(out, jsonEntry{e.Dir, e.Meta.Name, e.Meta.Validator, e.Meta.Size, e.Meta.ChunkSize, e.Chunks, e.Bytes, e.Used, e.InUse})
				}
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "    ")
				return enc.Encode(out)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "URL\tSIZE\tCACHED\tCHUNKS\tUSED\tDIR")
			for _, e := range entries {
				n := (e.Meta.Size + e.Meta.ChunkSize - 1) / e.Meta.ChunkSize
				used := e.Used.Format(time.DateTime)
				if e.InUse {
					used = "in use"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%s\t%s\n", e.Meta.Name, humanSize(e.Meta.Size), humanSize(e.Bytes), e.Chunks, n, used, e.Dir)
			}
			return tw.Flush()
		},
	}
	list.Flags().StringVar(&output, "output", "human", "human or json")
	verify := &cobra.Command{
		Use:   "verify [--cache-dir DIR]",
		Short: "Check every cached chunk against the checksum taken when it was fetched",
		Long: `verify reads every chunk the caches hold and checks it against the
CRC-32C recorded when it was fetched. It exits 1 if any chunk fails; run
prune --all (or delete the directory) to start that image's cache over.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			entries, err := f.entries()
			if err != nil {
				return err
			}
			failed := false
			for _, e := range entries {
				bad, err := cache.Verify(e.Dir)
				switch {
				case err != nil:
					return err
				case len(bad) > 0:
					failed = true
					fmt.Printf("%s: %d chunks damaged (first: %d) in %s\n", e.Meta.Name, len(bad), bad[0], e.Dir)
				default:
					fmt.Printf("%s: %d chunks good\n", e.Meta.Name, e.Chunks)
				}
			}
			if failed {
				return errors.New("damaged chunks found")
			}
			return nil
		},
	}
	var all bool
	var olderThan time.Duration
	prune := &cobra.Command{
		Use:   "prune [--cache-dir DIR] (--all | --older-than DURATION)",
		Short: "Delete the caches no process uses, all of them or those unused for DURATION",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !all && olderThan == 0 {
				return errors.New("say which caches to delete: --all or --older-than DURATION")
			}
			entries, err := f.entries()
			if err != nil {
				return err
			}
			for _, e := range entries {
				if !all && time.Since(e.Used) < olderThan {
					continue
				}
				removed, err := cache.Remove(e.Dir)
				switch {
				case err != nil:
					return err
				case removed:
					fmt.Printf("removed %s (%s of %s)\n", e.Dir, humanSize(e.Bytes), e.Meta.Name)
				default:
					fmt.Printf("kept %s: in use\n", e.Dir)
				}
			}
			return nil
		},
	}
	prune.Flags().BoolVar(&all, "all", false, "every cache no process uses")
	prune.Flags().DurationVar(&olderThan, "older-than", 0, "caches not fetched into for this long")
	cmd.PersistentFlags().StringVar(&f.cacheDir, "cache-dir", "", "the cache directory (default $XDG_CACHE_HOME/diskserve)")
	cmd.AddCommand(list, verify, prune)
	return cmd
}
