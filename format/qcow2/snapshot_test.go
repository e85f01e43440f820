package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/testtool"
)

// TestSnapshotWorkload interleaves random writes, zeroes, punches,
// compressed writes and growth with creating, applying and deleting
// internal snapshots, and keeps a model of the active layer and of every
// snapshot. After each snapshot operation diskserve's check must find no
// error and no leak; at the end the reopened image must read as the model,
// every snapshot as the model of its moment (through diskserve and
// qemu-img), and qemu-img check must call the image clean.
func TestSnapshotWorkload(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts qcow2.CreateOptions
	}{
		{"defaults", qcow2.CreateOptions{}},
		{"512 B clusters, 8-bit refcounts", qcow2.CreateOptions{ClusterSize: 512, RefcountBits: 8}},
		{"4 KiB clusters, 64-bit refcounts, zstd", qcow2.CreateOptions{ClusterSize: 4096, RefcountBits: 64, Compression: "zstd"}},
		{"version 2", qcow2.CreateOptions{Compat: "0.10"}},
		{"overlay", qcow2.CreateOptions{BackingFile: "base.raw", BackingFormat: "raw"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			size := int64(6 << 20)
			want := make([]byte, size)
			if tc.opts.BackingFile != "" {
				base := bytes.Repeat([]byte("backing!"), int(size/8))
				if err := os.WriteFile(filepath.Join(dir, "base.raw"), base, 0o644); err != nil {
					t.Fatal(err)
				}
				copy(want, base)
			}
			tc.opts.Size = size
			img := filepath.Join(dir, "img.qcow2")
			if err := qcow2.Create(img, tc.opts); err != nil {
				t.Fatal(err)
			}
			models := map[string][]byte{} // snapshot name: its content
			rnd := rand.New(rand.NewPCG(uint64(len(tc.name)), 5))
			d := openRW(t, img)
			for step := range 24 {
				disktest.Workload(t, d, want, uint64(step), 12)
				if tc.opts.RefcountBits == 0 || tc.opts.RefcountBits >= 16 {
					// Packed compressed clusters count a reference per
					// piece: narrow refcounts would overflow when shared.
					writeCompressed(t, d, want, rnd)
				}
				if step%7 == 3 && tc.opts.BackingFile == "" { // qemu pads a grown overlay with zeroes, not backing data
					grown := int64(len(want)) + 1<<20 + 4096
					err := diskserve.Resize(d, grown)
					if tc.opts.Compat == "0.10" && len(models) > 0 {
						if !errors.Is(err, diskserve.ErrUnsupported) || !strings.Contains(err.Error(), "version 2 image with internal snapshots") {
							t.Fatalf("resize of a version 2 image with snapshots: %v", err)
						}
					} else if err != nil {
						t.Fatal(err)
					} else {
						want = append(want, make([]byte, grown-int64(len(want)))...)
					}
				}
				names := slices.Sorted(maps.Keys(models))
				switch op := rnd.IntN(5); {
				case op < 3 || len(names) == 0:
					name := fmt.Sprintf("s%d", step)
					s, err := diskserve.CreateSnapshot(d, name)
					if err != nil {
						t.Fatalf("step %d: create: %v", step, err)
					}
					if s.Name != name || s.DiskSize != uint64(len(want)) {
						t.Fatalf("step %d: created %+v", step, s)
					}
					models[name] = bytes.Clone(want)
				case op == 3:
					name := names[rnd.IntN(len(names))]
					if err := diskserve.ApplySnapshot(d, name); err != nil {
						t.Fatalf("step %d: apply %s: %v", step, name, err)
					}
					want = bytes.Clone(models[name])
					if d.Size() != int64(len(want)) {
						t.Fatalf("step %d: size %d after applying %s, want %d", step, d.Size(), name, len(want))
					}
				default:
					name := names[rnd.IntN(len(names))]
					if err := diskserve.DeleteSnapshot(d, name); err != nil {
						t.Fatalf("step %d: delete %s: %v", step, name, err)
					}
					delete(models, name)
				}
				if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions+r.Leaks != 0 {
					t.Fatalf("step %d: check: %v %q", step, err, r.Messages)
				}
				if got := make([]byte, len(want)); diskserve.ReadFullAt(d, got, 0) != nil || !bytes.Equal(got, want) {
					t.Fatalf("step %d: the active layer differs from the model at byte %d", step, firstDiff(got, want))
				}
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, openFile(t, img)); !bytes.Equal(got, want) {
				t.Fatalf("reopened, the active layer differs from the model at byte %d", firstDiff(got, want))
			}
			for name, model := range models {
				opts := options()
				opts.Snapshot = name
				s, err := diskserve.Open(img, opts)
				if err != nil {
					t.Fatal(err)
				}
				got := readAll(t, s)
				s.Close()
				if !bytes.Equal(got, model) {
					t.Fatalf("snapshot %s differs from its model at byte %d", name, firstDiff(got, model))
				}
			}
			testtool.QemuCheck(t, img)
			// qemu-img applies each snapshot (on a copy) with the content
			// and size of its moment, and checks the result clean.
			for name, model := range models {
				applied := filepath.Join(dir, "applied.qcow2")
				b, err := os.ReadFile(img)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(applied, b, 0o644); err != nil {
					t.Fatal(err)
				}
				testtool.Run(t, "qemu-img", "snapshot", "-a", name, applied)
				testtool.QemuCheck(t, applied)
				if got := testtool.QemuRaw(t, applied); !bytes.Equal(got, model) {
					t.Fatalf("qemu-img applies snapshot %s unlike its model (%d bytes, want %d), from byte %d", name, len(got), len(model), firstDiff(got, model))
				}
			}
		})
	}
}

// writeCompressed writes a few clusters of d compressed, and to want.
func writeCompressed(t *testing.T, d diskserve.DiskFile, want []byte, rnd *rand.Rand) {
	t.Helper()
	cs := diskserve.Describe(d).ClusterSize
	for range 3 {
		off := rnd.Int64N(int64(len(want))) &^ (cs - 1)
		p := bytes.Repeat([]byte{byte(rnd.IntN(255) + 1), 0, 0, 0}, int(cs/4))[:min(cs, int64(len(want))-off)]
		if err := d.(*qcow2.Disk).WriteCompressed(p, off); err != nil {
			t.Fatalf("WriteCompressed(%d): %v", off, err)
		}
		copy(want[off:], p)
	}
}

// TestSnapshotRefusals: names that exist or are empty, unknown snapshots,
// read-only images and refcounts too narrow to share clusters are refused
// with errors that say so, and leave the image clean.
func TestSnapshotRefusals(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	if err := qcow2.Create(img, qcow2.CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	d := openRW(t, img)
	if _, err := diskserve.CreateSnapshot(d, "a"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		op   func() error
		want string
	}{
		{func() error { _, err := diskserve.CreateSnapshot(d, "a"); return err }, `snapshot 1 is called "a" already`},
		{func() error { _, err := diskserve.CreateSnapshot(d, ""); return err }, "the name is empty"},
		{func() error { return diskserve.ApplySnapshot(d, "b") }, `no snapshot "b" (snapshots: a)`},
		{func() error { return diskserve.DeleteSnapshot(d, "2") }, `no snapshot "2" (snapshots: a)`},
	} {
		if err := tc.op(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("got %v, want an error with %q", err, tc.want)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	ro := openFile(t, img)
	if _, err := diskserve.CreateSnapshot(ro, "b"); !errors.Is(err, diskserve.ErrReadOnly) {
		t.Errorf("create on a read-only image: %v", err)
	}
	narrow := filepath.Join(dir, "rc1.qcow2")
	if err := qcow2.Create(narrow, qcow2.CreateOptions{Size: 1 << 20, RefcountBits: 1}); err != nil {
		t.Fatal(err)
	}
	n := openRW(t, narrow)
	if _, err := diskserve.CreateSnapshot(n, "a"); !errors.Is(err, diskserve.ErrUnsupported) || !strings.Contains(err.Error(), "refcount_bits=16") {
		t.Errorf("create with 1-bit refcounts: %v", err)
	}
	n.Close()
	testtool.QemuCheck(t, img)
	testtool.QemuCheck(t, narrow)
}
