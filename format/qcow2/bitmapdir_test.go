package qcow2

import (
	"os"
	"testing"
)

// goldenBitmapDir returns the header and the bitmap directory of the
// golden image with bitmaps (testdata/gen.sh).
func goldenBitmapDir(t testing.TB) (*header, []byte, int64) {
	t.Helper()
	b, err := os.ReadFile("../../testdata/qcow2/tiny-bitmaps.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	h, err := parseHeader(b[:4096], int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	if h.Bitmaps == nil {
		t.Fatal("the golden image has no bitmaps extension")
	}
	ext := h.Bitmaps
	return h, b[ext.DirOffset : ext.DirOffset+ext.DirSize], int64(len(b))
}

func TestParseBitmapDir(t *testing.T) {
	h, dir, size := goldenBitmapDir(t)
	bms, err := parseBitmapDir(dir, h, size)
	if err != nil {
		t.Fatal(err)
	}
	if len(bms) != 2 || bms[0].Name != "b0" || bms[0].Flags != bitmapAuto || bms[0].GranBits != 12 ||
		bms[1].Name != "b1" || bms[1].Flags != 0 {
		t.Fatalf("parsed %+v %+v; want b0 (auto, 4 KiB) and b1 (disabled)", *bms[0], *bms[1])
	}
	for _, tc := range []struct {
		name  string
		patch func(d []byte)
	}{
		{"unknown flag", func(d []byte) { d[15] |= 8 }},
		{"type 2", func(d []byte) { d[16] = 2 }},
		{"granularity 8", func(d []byte) { d[17] = 8 }},
		{"no name", func(d []byte) { d[18], d[19] = 0, 0 }},
		{"name past the directory", func(d []byte) { d[18] = 0xff }},
		{"table not aligned", func(d []byte) { d[7] |= 1 }},
		{"table too small", func(d []byte) { d[8], d[9], d[10], d[11] = 0, 0, 0, 0 }},
		{"same name twice", func(d []byte) { copy(d[32:], d[:32]) }},
	} {
		bad := append([]byte(nil), dir...)
		tc.patch(bad)
		if _, err := parseBitmapDir(bad, h, size); err == nil {
			t.Errorf("%s: parsed without an error", tc.name)
		}
	}
}

// FuzzBitmapDir feeds bitmap directories to the parser, which must refuse
// or accept them without panicking, and accept nothing outside the limits.
func FuzzBitmapDir(f *testing.F) {
	h, dir, size := goldenBitmapDir(f)
	f.Add(dir, uint32(2))
	f.Fuzz(func(t *testing.T, dir []byte, count uint32) {
		hh := *h
		ext := *h.Bitmaps
		ext.Count, ext.DirSize = count%64, uint64(len(dir))
		hh.Bitmaps = &ext
		bms, err := parseBitmapDir(dir, &hh, size)
		if err != nil {
			return
		}
		for _, b := range bms {
			if b.Name == "" || len(b.Name) > maxBitmapName || b.GranBits < minBitmapGranBits || b.GranBits > maxBitmapGranBits {
				t.Fatalf("accepted %+v", *b)
			}
		}
	})
}
