package main

import (
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/remote/cache"
)

func newInfoCommand() *cobra.Command {
	var (
		flags imageFlags
		chain bool
	)
	cmd := &cobra.Command{
		Use:   "info [-f FORMAT] [--output=human|json] [--backing-chain] IMAGE",
		Short: "Show an image's format, sizes and format-specific facts",
		Long: `info opens IMAGE read-only and shows its format, virtual size, allocated
size and the facts its format records, as qemu-img info does: for the
images qemu-img reads, both outputs are qemu-img's byte for byte (its
keys, in its order, and its sizes, "1.03 MiB"), but for facts qemu-img
does not report, which diskserve adds: the adapter type of VMDK disks, the
subformat, creator and geometry of VHD, the sector sizes of VHDX, the
type of VDI, and images opened from URLs. Composite disks list their
components.

--backing-chain shows every image of the backing chain in turn, as
qemu-img does: one after the other (a blank line between them), or a JSON
array, the top image first.`,
		Args: oneImage,
		RunE: func(cmd *cobra.Command, args []string) error {
			return flags.withImage(args, true, func(d diskserve.DiskFile) error {
				info := diskserve.Describe(d)
				if info.Filename == "" {
					info.Filename = args[0]
				}
				remotes := remoteInfos()
				if chain {
					return writeChain(cmd.OutOrStdout(), info, flags.output == "json")
				}
				if flags.output == "json" {
					j := newInfoJSON(info)
					j.Remote = remotes
					return writeQemuJSON(cmd.OutOrStdout(), j)
				}
				writeInfo(cmd.OutOrStdout(), info, "")
				writeRemotes(cmd.OutOrStdout(), remotes)
				return nil
			})
		},
	}
	flags.register(cmd.Flags())
	cmd.Flags().BoolVar(&chain, "backing-chain", false, "show every image of the backing chain, one after the other")
	return cmd
}

// writeChain prints info and its backing images one after the other.
func writeChain(w io.Writer, info diskserve.Info, asJSON bool) error {
	var chain []infoJSON
	for i := &info; i != nil; i = i.Backing {
		one := *i
		one.Backing = nil
		if asJSON {
			j := newInfoJSON(one)
			if i.Backing != nil {
				j.FullBackingFilename = i.Backing.Filename
			}
			chain = append(chain, j)
			continue
		}
		if i != &info {
			fmt.Fprintln(w)
		}
		writeInfo(w, one, "")
	}
	if asJSON {
		return writeQemuJSON(w, chain)
	}
	return nil
}

// infoJSON is the shape of `qemu-img info --output=json`.
type infoJSON struct {
	VirtualSize         int64           `json:"virtual-size"`
	Filename            string          `json:"filename"`
	ClusterSize         int64           `json:"cluster-size,omitempty"`
	Format              string          `json:"format"`
	ActualSize          *int64          `json:"actual-size,omitempty"`
	DirtyFlag           bool            `json:"dirty-flag"`
	BackingFilename     string          `json:"backing-filename,omitempty"`
	FullBackingFilename string          `json:"full-backing-filename,omitempty"`
	BackingFormat       string          `json:"backing-filename-format,omitempty"`
	Snapshots           []snapshotJSON  `json:"snapshots,omitempty"`
	FormatSpecific      *formatSpecific `json:"format-specific,omitempty"`
	Children            []childJSON     `json:"children,omitempty"`
	Remote              []remoteJSON    `json:"remote,omitempty"` // diskserve's: the remote images opened
}

// remoteJSON is an image named by URL, in the top image's chain, and
// what its block cache holds.
type remoteJSON struct {
	URL          string `json:"url"`
	Validator    string `json:"validator"`
	Size         int64  `json:"size"`
	Cache        string `json:"cache"`
	ChunkSize    int64  `json:"chunk-size"`
	Chunks       int64  `json:"chunks"`
	ChunksCached int64  `json:"chunks-cached"`
	BytesCached  int64  `json:"bytes-cached"`
}

// remoteInfos describes the remote images open in the process: those of
// the image info opened.
func remoteInfos() []remoteJSON {
	var out []remoteJSON
	cache.Each(func(d *cache.Disk) {
		st := d.State()
		id := d.Identity()
		out = append(out, remoteJSON{id.Name, id.Validator, d.Size(), d.Dir(), d.ChunkSize(), d.Chunks(), st.Chunks, st.Bytes})
	})
	return out
}

func writeRemotes(w io.Writer, remotes []remoteJSON) {
	for _, r := range remotes {
		fmt.Fprintf(w, "Remote image: %s\n", r.URL)
		fmt.Fprintf(w, "    version: %s\n", r.Validator)
		fmt.Fprintf(w, "    size: %s (%d bytes)\n", humanSize(r.Size), r.Size)
		fmt.Fprintf(w, "    cache: %s\n", r.Cache)
		fmt.Fprintf(w, "    cached: %d of %d chunks of %s, %s of data\n", r.ChunksCached, r.Chunks, humanSize(r.ChunkSize), humanSize(r.BytesCached))
	}
}

type formatSpecific struct {
	Type string         `json:"type"`
	Data map[string]any `json:"data"`
}

// snapshotJSON is one element of qemu-img info's "snapshots".
type snapshotJSON struct {
	ICount      *uint64 `json:"icount,omitempty"`
	ID          string  `json:"id"`
	Name        string  `json:"name"`
	VMStateSize uint64  `json:"vm-state-size"`
	DateSec     int64   `json:"date-sec"`
	DateNsec    int     `json:"date-nsec"`
	VMClockSec  int64   `json:"vm-clock-sec"`
	VMClockNsec int64   `json:"vm-clock-nsec"`
}

type childJSON struct {
	Name string   `json:"name"`
	Info infoJSON `json:"info"`
}

func newInfoJSON(info diskserve.Info) infoJSON {
	j := infoJSON{
		VirtualSize:     info.VirtualSize,
		Filename:        info.Filename,
		ClusterSize:     info.ClusterSize,
		Format:          info.Format,
		ActualSize:      actualSize(info),
		DirtyFlag:       info.Dirty,
		BackingFilename: info.BackingFile,
		BackingFormat:   info.BackingFormat,
	}
	for _, sn := range info.Snapshots {
		j.Snapshots = append(j.Snapshots, snapshotJSON{
			ID: sn.ID, Name: sn.Name, VMStateSize: sn.VMStateSize, ICount: sn.ICount,
			DateSec: sn.Date.Unix(), DateNsec: sn.Date.Nanosecond(),
			VMClockSec: int64(sn.VMClock / time.Second), VMClockNsec: int64(sn.VMClock % time.Second),
		})
	}
	if len(info.Specific) > 0 {
		j.FormatSpecific = &formatSpecific{Type: info.Format, Data: info.Specific}
	}
	if info.Backing != nil {
		j.FullBackingFilename = info.Backing.Filename
	}
	for i, c := range info.Children {
		j.Children = append(j.Children, childJSON{Name: fmt.Sprintf("component %d", i), Info: newInfoJSON(c)})
	}
	return j
}

// actualSize returns the space the image's files occupy on disk (its
// file and info.Files, each once), as qemu-img's "disk size", or nil if
// its file cannot be examined.
func actualSize(info diskserve.Info) *int64 {
	var n int64
	seen := map[string]bool{}
	for i, path := range append([]string{info.Filename}, info.Files...) {
		if seen[path] {
			continue
		}
		seen[path] = true
		var sys *syscall.Stat_t
		if st, err := os.Stat(path); err == nil {
			sys, _ = st.Sys().(*syscall.Stat_t)
		}
		switch {
		case sys != nil:
			n += sys.Blocks * 512
		case i == 0:
			return nil
		}
	}
	return &n
}

// writeInfo prints info in qemu-img's human layout, indenting nested images.
func writeInfo(w io.Writer, info diskserve.Info, indent string) {
	p := func(format string, args ...any) { fmt.Fprintf(w, indent+format+"\n", args...) }
	p("image: %s", info.Filename)
	p("file format: %s", info.Format)
	p("virtual size: %s (%d bytes)", humanSize(info.VirtualSize), info.VirtualSize)
	if n := actualSize(info); n != nil {
		p("disk size: %s", humanSize(*n))
	}
	if info.ClusterSize != 0 {
		p("cluster_size: %d", info.ClusterSize)
	}
	if info.BackingFile != "" {
		p("backing file: %s", info.BackingFile)
		if info.BackingFormat != "" {
			p("backing file format: %s", info.BackingFormat)
		}
	}
	if info.Dirty {
		p("dirty flag: true")
	}
	if len(info.Snapshots) > 0 {
		p("Snapshot list:")
		writeSnapshots(w, info.Snapshots, indent)
	}
	if len(info.Specific) > 0 {
		p("Format specific information:")
		writeSpecific(w, info.Specific, indent+"    ")
	}
	for i, c := range info.Children {
		p("Component %d:", i)
		writeInfo(w, c, indent+"    ")
	}
}

// writeSnapshots prints the table of snapshots qemu-img prints, its
// columns as wide.
func writeSnapshots(w io.Writer, snaps []diskserve.Snapshot, indent string) {
	fmt.Fprintf(w, "%s%-10s%-17s%8s%20s%13s%11s\n", indent, "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
	for _, sn := range snaps {
		c := sn.VMClock
		clock := fmt.Sprintf("%02d:%02d:%02d.%03d", int(c.Hours()), int(c.Minutes())%60, int(c.Seconds())%60, c.Milliseconds()%1000)
		icount := ""
		if sn.ICount != nil {
			icount = strconv.FormatUint(*sn.ICount, 10)
		}
		fmt.Fprintf(w, "%s%-9s %-16s %8s%20s%13s%11s\n", indent, sn.ID, sn.Name, humanSize(int64(sn.VMStateSize)),
			sn.Date.Local().Format("2006-01-02 15:04:05"), clock, icount)
	}
}

// writeSpecific prints format-specific facts, a key per line, lists and
// maps nested as qemu-img info nests them ("[0]:" for the first element),
// in QDict order (see writeQemuJSON), with spaces for the hyphens of the
// JSON keys, as qemu-img prints them ("lazy refcounts: false").
func writeSpecific(w io.Writer, m map[string]any, indent string) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Sort(sort.Reverse(sort.StringSlice(keys))) // the latest first within a bucket, as JSON's
	sort.SliceStable(keys, func(i, j int) bool { return qdictBucket(keys[i]) < qdictBucket(keys[j]) })
	for _, key := range keys {
		k := strings.ReplaceAll(key, "-", " ")
		switch v := m[key].(type) {
		case []map[string]any:
			fmt.Fprintf(w, "%s%s:\n", indent, k)
			for i, e := range v {
				fmt.Fprintf(w, "%s    [%d]:\n", indent, i)
				writeSpecific(w, e, indent+"        ")
			}
		case []string:
			fmt.Fprintf(w, "%s%s:\n", indent, k)
			for i, e := range v {
				fmt.Fprintf(w, "%s    [%d]: %s\n", indent, i, e)
			}
		default:
			fmt.Fprintf(w, "%s%s: %v\n", indent, k, v)
		}
	}
}
