package qcow2

import (
	"os"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// TestMetadataCacheOption opens an image with the default metadata cache
// and with Options.MetadataCache, and checks the tables each may hold.
func TestMetadataCacheOption(t *testing.T) {
	b, err := os.ReadFile("../../testdata/qcow2/pattern.qcow2") // 64 KiB clusters
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		bytes int64
		want  int
	}{
		{0, defaultMetaCache / 65536},
		{4 << 20, 64},
		{1, metaCacheMinTables},
	} {
		opts := diskserve.Options{Formats: []diskserve.Format{Format}, ReadOnly: true, MetadataCache: tc.bytes,
			OpenFile: func(string, bool) (diskserve.DiskFile, error) { return disktest.NewMemory(b, true), nil }}
		d, err := diskserve.Open("img", opts)
		if err != nil {
			t.Fatal(err)
		}
		if got := d.(*Disk).meta.max; got != tc.want {
			t.Errorf("MetadataCache %d: the cache holds %d tables, want %d", tc.bytes, got, tc.want)
		}
		d.Close()
	}
}
