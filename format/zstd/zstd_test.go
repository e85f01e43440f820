package zstd_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	seekable "github.com/SaveTheRbtz/zstd-seekable-format-go/pkg"
	"github.com/cespare/xxhash/v2"
	kzstd "github.com/klauspost/compress/zstd"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/zstd"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/testtool"
)

// content returns n bytes of disk-like data: random runs, text-like runs
// and long runs of zeroes.
func content(n int) []byte {
	b := make([]byte, n)
	rnd := rand.New(rand.NewPCG(5, 6))
	for off := 0; off < n; off += 64 << 10 {
		end := min(n, off+64<<10)
		switch rnd.IntN(3) {
		case 0:
			for i := off; i < end; i++ {
				b[i] = byte(rnd.Uint32())
			}
		case 1:
			for i := off; i < end; i++ {
				b[i] = "diskserve "[i%10]
			}
		}
	}
	return b
}

func memOptions(image []byte) diskserve.Options {
	return diskserve.Options{
		Formats:  []diskserve.Format{zstd.Format},
		ReadOnly: true,
		OpenFile: func(string, bool) (diskserve.DiskFile, error) { return disktest.NewMemory(image, true), nil },
	}
}

func open(t *testing.T, image []byte) diskserve.DiskFile {
	t.Helper()
	d, err := diskserve.Open("img", memOptions(image))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// referenceImage writes data with the SaveTheRbtz library, one frame per
// frameSize bytes.
func referenceImage(t *testing.T, data []byte, frameSize int) []byte {
	t.Helper()
	enc, err := kzstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	var out bytes.Buffer
	w, err := seekable.NewWriter(&out, enc)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += frameSize {
		if _, err := w.Write(data[off:min(len(data), off+frameSize)]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// zstdCLI decompresses image with the zstd command line tool.
func zstdCLI(t *testing.T, image []byte) []byte {
	t.Helper()
	in := filepath.Join(t.TempDir(), "img.zst")
	if err := os.WriteFile(in, image, 0o644); err != nil {
		t.Fatal(err)
	}
	return testtool.Run(t, "zstd", "-d", "-c", "-q", in)
}

func TestReferenceWriter(t *testing.T) {
	data := content(5<<20 + 4321)
	for _, fs := range []int{1024, 128 << 10, 1 << 20} {
		t.Run(strings.TrimSuffix(strings.TrimSuffix(fmtSize(fs), "0"), "."), func(t *testing.T) {
			img := referenceImage(t, data, fs)
			if !bytes.Equal(zstdCLI(t, img), data) {
				t.Fatal("zstd -d does not give back the data: the test is wrong")
			}
			d := open(t, img)
			disktest.Check(t, d, data)
			if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions != 0 {
				t.Fatalf("check: %+v %v", r, err)
			}
		})
	}
}

func fmtSize(n int) string {
	switch {
	case n >= 1<<20:
		return string(rune('0'+n>>20)) + "MiB"
	case n >= 1<<10:
		return itoa(n>>10) + "KiB"
	}
	return itoa(n) + "B"
}

func itoa(n int) string {
	s := ""
	for ; n > 0; n /= 10 {
		s = string(rune('0'+n%10)) + s
	}
	return s
}

func TestWrite(t *testing.T) {
	data := append(content(3<<20+17), make([]byte, 2<<20)...) // ends with a run of zeroes longer than any frame
	data = append(data, content(1000)...)
	for _, o := range []zstd.WriteOptions{
		{},
		{FrameSize: 64 << 10, Level: 19, NoChecksum: true, Workers: 1},
		{FrameSize: 1 << 20, Level: 1},
	} {
		var out bytes.Buffer
		if err := zstd.Write(context.Background(), &out, disktest.NewMemory(data, true), o, nil); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(zstdCLI(t, out.Bytes()), data) {
			t.Fatalf("%+v: zstd -d does not give back the source", o)
		}
		d := open(t, out.Bytes())
		disktest.Check(t, d, data)
		// zero frames are reported as such
		ext, _ := diskserve.Extents(d, nil, 0, d.Size())
		zero := false
		for _, e := range ext {
			zero = zero || e.Flags&diskserve.ExtentZero != 0
		}
		if !zero {
			t.Errorf("%+v: no frame of zeroes reported", o)
		}
	}
}

func TestCorrupt(t *testing.T) {
	good := referenceImage(t, content(1<<20), 64<<10)
	frames := 16
	footer := len(good) - 9
	table := footer - frames*12 - 8
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	for _, tc := range []struct {
		name  string
		image []byte
		want  string
	}{
		{"plain zstd stream", func() []byte {
			enc, _ := kzstd.NewWriter(nil)
			return enc.EncodeAll(content(100000), nil)
		}(), "no seek table"},
		{"truncated table", good[:len(good)-20], "no seek table"},
		{"table cut short", append(bytes.Clone(good[:table+8]), good[footer:]...), "seek table header"},
		{"table larger than the file", mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[footer:], 40000); return b }), "does not fit"},
		{"huge frame count", mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[footer:], 1<<30); return b }), "1073741824 frames"},
		{"reserved bits", mutate(func(b []byte) []byte { b[footer+4] |= 0x10; return b }), "reserved bits"},
		{"wrong table header", mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[table+4:], 7); return b }), "seek table header"},
		{"wrong compressed size", mutate(func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[table+8:], binary.LittleEndian.Uint32(b[table+8:])+1)
			return b
		}), "add up to"},
		{"frame too large", mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[table+12:], 1<<31); return b }), "more than 1073741824"},
		{"too short", []byte{0x28, 0xb5, 0x2f, 0xfd, 0}, "no seek table"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := diskserve.Open("img", memOptions(tc.image))
			if !errors.Is(err, diskserve.ErrCorrupt) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "open img: zstd: ") {
				t.Fatalf("error %v, want a corrupt-image error containing %q", err, tc.want)
			}
		})
	}
	// Errors found when reading, and by check.
	for _, tc := range []struct {
		name   string
		mutate func(b []byte)
		want   string
	}{
		{"bad checksum", func(b []byte) { b[table+8+8] ^= 1 }, "frame 0: checksum"},
		{"wrong decompressed size", func(b []byte) {
			binary.LittleEndian.PutUint32(b[table+12:], binary.LittleEndian.Uint32(b[table+12:])-1)
			binary.LittleEndian.PutUint32(b[table+12+12:], binary.LittleEndian.Uint32(b[table+12+12:])+1)
		}, "frame 0 decompresses to 65536 bytes, the seek table says 65535"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := bytes.Clone(good)
			tc.mutate(b)
			d := open(t, b)
			if _, err := d.ReadAt(make([]byte, 100), 0); !errors.Is(err, diskserve.ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("read: %v, want %q", err, tc.want)
			}
			if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions == 0 || !strings.Contains(r.Messages[0], tc.want) {
				t.Fatalf("check: %+v %v", r, err)
			}
		})
	}
}

func TestReadWriteRefused(t *testing.T) {
	opts := memOptions(referenceImage(t, content(1000), 100))
	opts.ReadOnly = false
	if _, err := diskserve.Open("img", opts); !errors.Is(err, diskserve.ErrUnsupported) || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("read-write open: %v", err)
	}
}

// FuzzOpen opens arbitrary bytes as a seekable zstd image; whatever opens
// must read within bounds and the same in pieces as in one go.
func FuzzOpen(f *testing.F) {
	enc, _ := kzstd.NewWriter(nil)
	defer enc.Close()
	for _, fs := range []int{100, 4096} {
		var out bytes.Buffer
		w, _ := seekable.NewWriter(&out, enc)
		data := content(20000)
		for off := 0; off < len(data); off += fs {
			w.Write(data[off:min(len(data), off+fs)])
		}
		w.Close()
		f.Add(out.Bytes(), false)
		f.Add(out.Bytes(), true)
	}
	f.Fuzz(func(t *testing.T, b []byte, fix bool) {
		if fix {
			fixChecksums(b) // so that the fuzzer gets past them
		}
		d, err := diskserve.Open("img", memOptions(b))
		if err != nil {
			return
		}
		defer d.Close()
		n := min(d.Size(), 1<<20)
		whole, err := io.ReadAll(io.NewSectionReader(d, 0, n))
		if err != nil {
			return // a frame that does not decompress: reported, fine
		}
		piece := make([]byte, 999)
		for off := int64(0); off < n; off += int64(len(piece)) {
			k, err := d.ReadAt(piece, off)
			if err != nil && err != io.EOF {
				t.Fatalf("piece at %d: %v after the whole read worked", off, err)
			}
			if !bytes.Equal(piece[:min(int64(k), n-off)], whole[off:min(off+int64(k), n)]) {
				t.Fatalf("piece at %d differs", off)
			}
		}
	})
}

// fixChecksums sets the checksum of every frame in the seek table of b to
// that of what the frame decompresses to, where it decompresses.
func fixChecksums(b []byte) {
	le := binary.LittleEndian
	if len(b) < 17 || le.Uint32(b[len(b)-4:]) != 0x8F92EAB1 || b[len(b)-5]&0x80 == 0 {
		return
	}
	n := int64(le.Uint32(b[len(b)-9:]))
	table := int64(len(b)) - 9 - 12*n
	if n > 1<<16 || table < 8 {
		return
	}
	dec, _ := kzstd.NewReader(nil, kzstd.WithDecoderMaxMemory(1<<20))
	defer dec.Close()
	off := int64(0)
	for i := range n {
		e := b[table+12*i:]
		comp := int64(le.Uint32(e))
		if off+comp > table-8 {
			return
		}
		if data, err := dec.DecodeAll(b[off:off+comp], nil); err == nil {
			le.PutUint32(e[8:], uint32(xxhash.Sum64(data)))
		}
		off += comp
	}
}

// TestFixChecksums checks the fuzz target's fix-up: an image whose frame
// checksums were spoiled reads again once they are fixed.
func TestFixChecksums(t *testing.T) {
	b := referenceImage(t, content(100000), 4096)
	footer := len(b) - 9
	frames := int(binary.LittleEndian.Uint32(b[footer:]))
	table := footer - frames*12
	for i := range frames {
		b[table+12*i+8] ^= 0xff
	}
	if _, err := open(t, bytes.Clone(b)).ReadAt(make([]byte, 100), 0); err == nil {
		t.Fatal("spoiled checksums went unnoticed")
	}
	fixChecksums(b)
	if _, err := open(t, b).ReadAt(make([]byte, 100000), 0); err != nil {
		t.Fatalf("after the fix-up: %v", err)
	}
}
