package format_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format"
	"github.com/diskserve/diskserve/format/composite"
	"github.com/diskserve/diskserve/format/zstd"
	"github.com/diskserve/diskserve/internal/disktest"
)

// TestHugeClaimsStayBounded opens small images of each format whose
// headers claim enormous tables (a 2^30-entry L1, 2^30 sparse chunks,
// 2^30 zstd frames, a composite of 2^40 bytes in a million components):
// each open fails, and none allocates more than a few MiB on the way.
func TestHugeClaimsStayBounded(t *testing.T) {
	dir := t.TempDir()
	read := func(p string) []byte {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	qcow2 := read("../testdata/qcow2/pattern.qcow2")
	binary.BigEndian.PutUint32(qcow2[36:], 1<<30) // l1_size
	simg := read("../testdata/sparse/pattern.simg")
	binary.LittleEndian.PutUint32(simg[20:], 1<<30) // total_chunks
	var z bytes.Buffer
	if err := zstd.Write(context.Background(), &z, disktest.NewMemory(make([]byte, 1<<20), true), zstd.WriteOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	zst := z.Bytes()
	binary.LittleEndian.PutUint32(zst[len(zst)-9:], 1<<30) // the seek table footer's frame count
	spec := &composite.Spec{Version: 2}
	for i := range 1 << 20 {
		spec.Components = append(spec.Components, composite.Component{Path: "x", Offset: int64(i) << 20})
	}
	spec.Length = 1 << 40
	for name, b := range map[string][]byte{"qcow2": qcow2, "android-sparse": simg, "zstd": zst, "composite": spec.Marshal()} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		d, err := format.Open(path, diskserve.Options{ReadOnly: true})
		runtime.ReadMemStats(&after)
		if err == nil {
			d.Close()
			t.Errorf("%s: a hostile image opened", name)
			continue
		}
		if grown := after.TotalAlloc - before.TotalAlloc; grown > uint64(len(b))+8<<20 {
			t.Errorf("%s: refusing it allocated %d bytes (%v)", name, grown, err)
		}
		t.Logf("%s: %v", name, err)
	}
}
