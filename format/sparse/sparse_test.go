package sparse_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/format/sparse"
	"github.com/diskserve/diskserve/internal/disktest"
	"github.com/diskserve/diskserve/internal/testtool"
)

func options() diskserve.Options {
	return diskserve.Options{Formats: []diskserve.Format{sparse.Format, raw.Format}, OpenFile: raw.OpenFile, ReadOnly: true}
}

// memOptions opens image from memory under any name.
func memOptions(image []byte) diskserve.Options {
	return diskserve.Options{
		Formats:  []diskserve.Format{sparse.Format},
		ReadOnly: true,
		OpenFile: func(string, bool) (diskserve.DiskFile, error) { return disktest.NewMemory(image, true), nil },
	}
}

func readAll(t *testing.T, d diskserve.DiskFile) []byte {
	t.Helper()
	b, err := io.ReadAll(io.NewSectionReader(d, 0, d.Size()))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rawInput writes a raw file of size bytes with random data, uniform
// blocks, zero blocks and holes.
func rawInput(t *testing.T, dir string, size int64) string {
	t.Helper()
	b := make([]byte, size)
	rnd := rand.New(rand.NewPCG(1, 2))
	for off := int64(0); off < size; off += 4096 {
		switch rnd.IntN(4) {
		case 0: // random
			for i := off; i < min(size, off+4096); i++ {
				b[i] = byte(rnd.Uint32())
			}
		case 1: // uniform 32-bit pattern
			for i := off; i < min(size, off+4096); i += 4 {
				copy(b[i:min(size, i+4)], []byte{0x11, 0x22, 0x33, 0x44})
			}
		}
	}
	path := filepath.Join(dir, "in.raw")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	f.Truncate(size + 3<<20) // a hole at the end
	f.Close()
	return path
}

// TestInteropImg2simg converts raw files with img2simg at several block
// sizes and reads them back: the bytes must be those simg2img expands.
func TestInteropImg2simg(t *testing.T) {
	dir := t.TempDir()
	in := rawInput(t, dir, 5<<20+1000) // the last block is partial and padded
	for _, bs := range []string{"1024", "4096", "65536"} {
		t.Run(bs, func(t *testing.T) {
			simg := filepath.Join(t.TempDir(), "out.simg")
			testtool.Run(t, "img2simg", in, simg, bs)
			back := filepath.Join(t.TempDir(), "back.raw")
			testtool.Run(t, "simg2img", simg, back)
			want, err := os.ReadFile(back)
			if err != nil {
				t.Fatal(err)
			}
			d, err := diskserve.Open(simg, options())
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if got := readAll(t, d); !bytes.Equal(got, want) {
				t.Fatalf("read %d bytes, simg2img expands %d; equal %v", len(got), len(want), bytes.Equal(got, want))
			}
			disktest.Check(t, d, want)
			if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions != 0 {
				t.Fatalf("check: %+v %v", r, err)
			}
		})
	}
}

// image builds a sparse image by hand: header sizes, chunks and all.
type image struct {
	fileHdr, chunkHdr int
	blkSz             uint32
	totalBlks         uint32 // 0: the sum of the chunks
	chunks            [][]byte
	blocks            uint32
	expanded          []byte
}

func newImage(blkSz uint32) *image { return &image{fileHdr: 28, chunkHdr: 12, blkSz: blkSz} }

func (m *image) chunk(typ uint16, blocks uint32, data []byte) {
	h := make([]byte, m.chunkHdr)
	binary.LittleEndian.PutUint16(h, typ)
	binary.LittleEndian.PutUint32(h[4:], blocks)
	binary.LittleEndian.PutUint32(h[8:], uint32(m.chunkHdr+len(data)))
	m.chunks = append(m.chunks, append(h, data...))
	if typ != 0xCAC4 {
		m.blocks += blocks
	}
}

func (m *image) raw(data []byte) {
	m.chunk(0xCAC1, uint32(len(data))/m.blkSz, data)
	m.expanded = append(m.expanded, data...)
}

func (m *image) fill(blocks uint32, pattern [4]byte) {
	m.chunk(0xCAC2, blocks, pattern[:])
	m.expanded = append(m.expanded, bytes.Repeat(pattern[:], int(blocks*m.blkSz/4))...)
}

func (m *image) dontCare(blocks uint32) {
	m.chunk(0xCAC3, blocks, nil)
	m.expanded = append(m.expanded, make([]byte, blocks*m.blkSz)...)
}

// crc adds a CRC32 chunk of the data so far, off by wrong.
func (m *image) crc(wrong uint32) {
	m.chunk(0xCAC4, 0, binary.LittleEndian.AppendUint32(nil, crc32.ChecksumIEEE(m.expanded)+wrong))
}

func (m *image) bytes() []byte {
	h := make([]byte, m.fileHdr)
	copy(h, sparse.Magic)
	binary.LittleEndian.PutUint16(h[4:], 1)
	binary.LittleEndian.PutUint16(h[8:], uint16(m.fileHdr))
	binary.LittleEndian.PutUint16(h[10:], uint16(m.chunkHdr))
	binary.LittleEndian.PutUint32(h[12:], m.blkSz)
	total := m.totalBlks
	if total == 0 {
		total = m.blocks
	}
	binary.LittleEndian.PutUint32(h[16:], total)
	binary.LittleEndian.PutUint32(h[20:], uint32(len(m.chunks)))
	for _, c := range m.chunks {
		h = append(h, c...)
	}
	return h
}

// sample is an image with every chunk type, a CRC32 chunk in the middle
// and one at the end.
func sample(fileHdr, chunkHdr int) *image {
	m := newImage(1024)
	m.fileHdr, m.chunkHdr = fileHdr, chunkHdr
	data := make([]byte, 3*1024)
	for i := range data {
		data[i] = byte(i*13 + 7)
	}
	m.raw(data)
	m.fill(2, [4]byte{0xde, 0xad, 0xbe, 0xef})
	m.crc(0)
	m.dontCare(3)
	m.fill(1, [4]byte{})
	m.raw(data[:1024])
	m.crc(0)
	return m
}

func TestHandMade(t *testing.T) {
	for _, tc := range []struct {
		name              string
		fileHdr, chunkHdr int
	}{{"standard headers", 28, 12}, {"larger headers", 40, 20}} {
		t.Run(tc.name, func(t *testing.T) {
			m := sample(tc.fileHdr, tc.chunkHdr)
			d, err := diskserve.Open("img", memOptions(m.bytes()))
			if err != nil {
				t.Fatal(err)
			}
			disktest.Check(t, d, m.expanded)
			if r, err := diskserve.Check(d, diskserve.RepairNone); err != nil || r.Corruptions != 0 {
				t.Fatalf("check of valid CRCs: %+v %v", r, err)
			}
			ext, _ := diskserve.Extents(d, nil, 0, d.Size())
			want := []diskserve.Extent{
				{Off: 0, Len: 5 * 1024},
				{Off: 5 * 1024, Len: 3 * 1024, Flags: diskserve.ExtentHole | diskserve.ExtentZero},
				{Off: 8 * 1024, Len: 1024, Flags: diskserve.ExtentZero},
				{Off: 9 * 1024, Len: 1024},
			}
			if len(ext) != len(want) {
				t.Fatalf("extents %+v, want %+v", ext, want)
			}
			for i := range want {
				if ext[i] != want[i] {
					t.Fatalf("extents %+v, want %+v", ext, want)
				}
			}
		})
	}
}

func TestWrongCRC(t *testing.T) {
	m := newImage(4096)
	m.raw(bytes.Repeat([]byte{7}, 4096))
	m.crc(1)
	m.fill(1, [4]byte{1, 2, 3, 4})
	d, err := diskserve.Open("img", memOptions(m.bytes()))
	if err != nil {
		t.Fatal(err)
	}
	r, err := diskserve.Check(d, diskserve.RepairNone)
	if err != nil || r.Corruptions != 1 || !strings.Contains(r.Messages[0], "chunk 1") {
		t.Fatalf("check of a wrong CRC: %+v %v", r, err)
	}
	opts := memOptions(m.bytes())
	opts.Verify = true
	if _, err := diskserve.Open("img", opts); !errors.Is(err, diskserve.ErrCorrupt) || !strings.Contains(err.Error(), "checksum verification failed: chunk 1") {
		t.Fatalf("open with Verify of a wrong CRC: %v", err)
	}
	opts = memOptions(sample(28, 12).bytes())
	opts.Verify = true
	if d, err := diskserve.Open("img", opts); err != nil {
		t.Fatalf("open with Verify of valid CRCs: %v", err)
	} else {
		d.Close()
	}
}

func TestCorrupt(t *testing.T) {
	for _, tc := range []struct {
		name  string
		build func() []byte
		want  string
	}{
		{"RAW size", func() []byte {
			m := newImage(1024)
			m.chunk(0xCAC1, 2, make([]byte, 1024))
			return m.bytes()
		}, "chunk 0: RAW chunk of 2 blocks holds 1024 bytes"},
		{"FILL size", func() []byte { m := newImage(1024); m.chunk(0xCAC2, 1, make([]byte, 8)); return m.bytes() }, "chunk 0: FILL chunk holds 8 bytes"},
		{"DONT_CARE with data", func() []byte {
			m := newImage(1024)
			m.fill(1, [4]byte{1})
			m.chunk(0xCAC3, 1, make([]byte, 4))
			return m.bytes()
		}, "chunk 1: DONT_CARE chunk holds 4 bytes"},
		{"unknown type", func() []byte { m := newImage(1024); m.chunk(0xCAC9, 1, nil); return m.bytes() }, "chunk 0: unknown chunk type 0xcac9"},
		{"blocks do not add up", func() []byte {
			m := newImage(1024)
			m.fill(2, [4]byte{})
			m.totalBlks = 3
			return m.bytes()
		}, "expand to 2 blocks, the header says 3"},
		{"chunks past the header's blocks", func() []byte {
			m := newImage(1024)
			m.fill(5, [4]byte{})
			m.totalBlks = 3
			return m.bytes()
		}, "chunk 0: chunks expand past the 3 blocks"},
		{"huge chunk count", func() []byte {
			b := newImage(1024).bytes()
			binary.LittleEndian.PutUint32(b[20:], 1<<30)
			return b
		}, "1073741824 chunks cannot fit"},
		{"truncated chunk", func() []byte { m := newImage(1024); m.raw(make([]byte, 2048)); return m.bytes()[:100] }, "chunk 0: total size 2060"},
		{"block size", func() []byte { return newImage(1022).bytes() }, "block size 1022"},
		{"small chunk header", func() []byte { m := newImage(1024); m.chunkHdr = 8; return m.bytes() }, "chunk header size 8"},
		{"truncated header", func() []byte { return []byte(sparse.Magic + "\x01\x00") }, "header truncated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := diskserve.Open("img", memOptions(tc.build()))
			if !errors.Is(err, diskserve.ErrCorrupt) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "open img: android-sparse: ") {
				t.Fatalf("error %v, want a corrupt-image error containing %q", err, tc.want)
			}
		})
	}
}

func TestReadWriteRefused(t *testing.T) {
	opts := memOptions(sample(28, 12).bytes())
	opts.ReadOnly = false
	if _, err := diskserve.Open("img", opts); !errors.Is(err, diskserve.ErrUnsupported) || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("read-write open: %v", err)
	}
}

// FuzzOpen opens arbitrary bytes as a sparse image; whatever opens must
// read within bounds, tile its extents, and read the same in pieces as in
// one go.
func FuzzOpen(f *testing.F) {
	f.Add(sample(28, 12).bytes(), false)
	f.Add(sample(40, 20).bytes(), true)
	if b, err := os.ReadFile("../../testdata/sparse/pattern.simg"); err == nil {
		f.Add(b, true)
	}
	f.Fuzz(func(t *testing.T, b []byte, fix bool) {
		d, err := diskserve.Open("img", memOptions(b))
		if err != nil {
			return
		}
		n := min(d.Size(), 1<<20)
		whole := make([]byte, n)
		if got, err := d.ReadAt(whole, 0); int64(got) != n {
			t.Fatalf("read %d of %d: %v", got, n, err)
		}
		piece := make([]byte, 777)
		for off := int64(0); off < n; off += int64(len(piece)) {
			k, _ := d.ReadAt(piece, off)
			if !bytes.Equal(piece[:min(int64(k), n-off)], whole[off:min(off+int64(k), n)]) {
				t.Fatalf("piece at %d differs", off)
			}
		}
		ext, err := diskserve.Extents(d, nil, 0, n)
		if err != nil {
			t.Fatal(err)
		}
		disktest.CheckExtents(t, ext, whole, 0, n)
		// With the checksums fixed up to match the data, the fuzzer gets
		// past them: a verified open must then succeed and read the same.
		if fix && d.Size() <= 1<<20 && fixChecksums(b, whole) {
			opts := memOptions(b)
			opts.Verify = true
			v, err := diskserve.Open("img", opts)
			if err != nil {
				t.Fatalf("the image with its checksums fixed does not verify: %v", err)
			}
			if got := readAll(t, v); !bytes.Equal(got, whole) {
				t.Fatal("the verified image reads differently")
			}
		}
	})
}

// fixChecksums sets, in the sparse image b whose expanded data is data,
// every CRC32 chunk and the image checksum (where it is not 0) to what the
// data gives, and reports whether it walked every chunk.
func fixChecksums(b, data []byte) bool {
	le := binary.LittleEndian
	fileHdr, chunkHdr, blkSz := int64(le.Uint16(b[8:])), int64(le.Uint16(b[10:])), int64(le.Uint32(b[12:]))
	pos, out := fileHdr, int64(0)
	for range le.Uint32(b[20:]) {
		if pos+chunkHdr > int64(len(b)) {
			return false
		}
		typ, blocks, total := le.Uint16(b[pos:]), int64(le.Uint32(b[pos+4:])), int64(le.Uint32(b[pos+8:]))
		if typ == 0xCAC4 {
			le.PutUint32(b[pos+chunkHdr:], crc32.ChecksumIEEE(data[:out]))
		} else {
			out += blocks * blkSz
		}
		pos += total
	}
	if le.Uint32(b[24:]) != 0 {
		le.PutUint32(b[24:], crc32.ChecksumIEEE(data))
	}
	return true
}
