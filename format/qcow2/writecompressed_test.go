package qcow2_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/diskserve/diskserve/format/qcow2"
	"github.com/diskserve/diskserve/internal/testtool"
)

// compressedWriter is the method convert -c uses.
type compressedWriter interface {
	WriteCompressed(p []byte, off int64) error
}

// TestWriteCompressed writes compressible, incompressible and partial
// clusters compressed, with both compression types and several cluster
// sizes, overwrites some of them compressed and plainly, and has qemu-img
// read the image back byte for byte and check it clean.
func TestWriteCompressed(t *testing.T) {
	testtool.Need(t, "qemu-img")
	for _, tc := range []struct {
		cs   int64
		comp string
	}{{65536, "zlib"}, {65536, "zstd"}, {4096, "zlib"}, {2 << 20, "zstd"}, {512, "zlib"}} {
		t.Run(fmt.Sprintf("%s-%d", tc.comp, tc.cs), func(t *testing.T) {
			size := 40*tc.cs + 1536 // a partial last cluster where clusters are larger
			img := diskserveCreate(t, t.TempDir(), qcow2.CreateOptions{Size: size, ClusterSize: tc.cs, Compression: tc.comp})
			d := openRW(t, img)
			w := d.(compressedWriter)
			want := make([]byte, size)
			rnd := rand.New(rand.NewPCG(uint64(tc.cs), 3))
			cluster := func(ci int64) []byte {
				off := ci * tc.cs
				p := want[off:min(off+tc.cs, size)]
				switch ci % 3 {
				case 0: // text: compresses well
					copy(p, bytes.Repeat([]byte(fmt.Sprintf("cluster %d of a compressed image. ", ci)), int(tc.cs)))
				case 1: // random: does not compress
					for i := range p {
						p[i] = byte(rnd.Uint32())
					}
				case 2: // half random, half zero
					for i := range p[:len(p)/2] {
						p[i] = byte(rnd.Uint32())
					}
				}
				return p
			}
			for ci := int64(0); ci*tc.cs < size; ci++ {
				if ci%7 == 5 {
					continue // left unallocated
				}
				if err := w.WriteCompressed(cluster(ci), ci*tc.cs); err != nil {
					t.Fatalf("cluster %d: %v", ci, err)
				}
			}
			// Overwrite: compressed again, and plainly inside a
			// compressed cluster.
			if err := w.WriteCompressed(cluster(3), 3*tc.cs); err != nil {
				t.Fatal(err)
			}
			early := make([]byte, tc.cs)
			d.ReadAt(early, 6*tc.cs)
			if i := firstDiff(early, want[6*tc.cs:7*tc.cs]); i >= 0 {
				t.Fatalf("before the plain write, cluster 6 differs at %d: % x want % x", i, early[i:i+8], want[6*tc.cs+int64(i):6*tc.cs+int64(i)+8])
			}
			copy(want[6*tc.cs+5:], "plain write into a compressed cluster")
			if _, err := d.WriteAt(want[6*tc.cs+5:6*tc.cs+42], 6*tc.cs+5); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, size)
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("diskserve reads different bytes from offset %d (cluster %d): %q want %q", i, int64(i)/tc.cs, got[i:i+48], want[i:i+48])
			}
			if err := w.WriteCompressed(want[:10], 0); err == nil {
				t.Fatal("a partial cluster was accepted")
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			testtool.QemuCheck(t, img)
			if got := testtool.QemuRaw(t, img); !bytes.Equal(got, want) {
				i := firstDiff(got, want)
				t.Fatalf("qemu-img reads different bytes from offset %d (cluster %d): %d bytes, want %d", i, int64(i)/tc.cs, len(got), len(want))
			}
			st, _ := os.Stat(img)
			if st.Size() > size*3/4 {
				t.Errorf("image of %d bytes for %d bytes of data, a third of it compressible", st.Size(), size)
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// TestWriteCompressedNarrowRefcounts packs highly compressible clusters
// into an image whose refcounts count at most 3: each host cluster takes as
// many pieces as its refcount can count, then packing goes on in the next.
func TestWriteCompressedNarrowRefcounts(t *testing.T) {
	img := diskserveCreate(t, t.TempDir(), qcow2.CreateOptions{Size: 64 << 10, ClusterSize: 512, RefcountBits: 2})
	d := openRW(t, img)
	want := bytes.Repeat([]byte("squeeze "), 8<<10)
	for off := int64(0); off < int64(len(want)); off += 512 {
		if err := d.(compressedWriter).WriteCompressed(want[off:off+512], off); err != nil {
			t.Fatalf("WriteCompressed(%d): %v", off, err)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	testtool.QemuCheck(t, img)
	if got := testtool.QemuRaw(t, img); !bytes.Equal(got, want) {
		t.Fatalf("qemu-img reads byte %d unlike what was written", firstDiff(got, want))
	}
}
