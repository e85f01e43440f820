package blockmap

import (
	"bytes"
	"fmt"
	"sync"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/internal/disktest"
)

// logFile is an image file in memory that logs the writes, resizes and
// syncs made to it.
type logFile struct {
	mu    sync.Mutex
	b     []byte
	log   []string
	reads []string
}

func (f *logFile) Size() int64    { f.mu.Lock(); defer f.mu.Unlock(); return int64(len(f.b)) }
func (f *logFile) ReadOnly() bool { return false }
func (f *logFile) Close() error   { return nil }

func (f *logFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, eof := diskserve.ClipRead(int64(len(f.b)), off, p)
	f.reads = append(f.reads, fmt.Sprintf("read %d+%d", off, len(p)))
	return copy(p, f.b[off:]), eof
}

func (f *logFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, fmt.Sprintf("write %d", off))
	return copy(f.b[off:], p), nil
}

func (f *logFile) Resize(n int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.b = append(f.b, make([]byte, n-int64(len(f.b)))...)
	return nil
}

func (f *logFile) Flush() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, "sync")
	return nil
}

func (f *logFile) take() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.log
	f.log = nil
	return l
}

// testTable keeps one uint64 entry per block at the start of the file
// (0: unallocated), and blocks after the table.
type testTable struct {
	f       *logFile
	entries []int64
	free    int64
}

func (t *testTable) Lookup(i int64) Block {
	if t.entries[i] == 0 {
		return Block{State: Unallocated}
	}
	return Block{State: Data, Host: t.entries[i]}
}

func (t *testTable) Reserve(int64) (int64, error) {
	host := t.free
	t.free += 4096
	return host, nil
}

func (t *testTable) Record(i, host int64) error {
	var b [8]byte
	copy(b[:], fmt.Sprintf("%08x", host/4096))
	_, err := t.f.WriteAt(b[:], i*8)
	return err
}

func (t *testTable) Set(i int64, b Block) { t.entries[i] = b.Host }

func newTestDisk(blocks int64) (*Disk, *logFile) {
	f := &logFile{b: make([]byte, 4096)}
	t := &testTable{f: f, entries: make([]int64, blocks), free: 4096}
	return New(Config{Format: "test", Path: "test.img", File: f, Size: blocks * 4096, BlockSize: 4096, Table: t}), f
}

// TestRecordAfterDataIsDurable: a block's entry reaches the file only at
// a flush, after a sync that makes its data durable, and is made durable
// by a second sync; an allocation alone writes no entry.
func TestRecordAfterDataIsDurable(t *testing.T) {
	d, f := newTestDisk(4)
	f.take()
	if _, err := d.WriteAt(bytes.Repeat([]byte{7}, 100), 4096*2+10); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(bytes.Repeat([]byte{8}, 100), 10); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(f.take()); got != "[write 4106 write 8202]" {
		t.Fatalf("allocations wrote %s, want the new bytes of the two blocks and no entry", got)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(f.take()); got != "[sync write 16 write 0 sync]" {
		t.Fatalf("flush did %s, want a sync, the entries in allocation order, a sync", got)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(f.take()); got != "[sync]" {
		t.Fatalf("a flush with nothing allocated did %s", got)
	}
}

// TestConformance runs the conformance suite on the engine over a table
// in memory.
func TestConformance(t *testing.T) {
	d, _ := newTestDisk(64)
	disktest.Check(t, d, make([]byte, 64*4096))
}

// TestPendingBounded: a client that never flushes has its entries
// recorded every maxPending allocations.
func TestPendingBounded(t *testing.T) {
	d, f := newTestDisk(maxPending + 10)
	for i := range int64(maxPending + 1) {
		if _, err := d.WriteAt([]byte{1}, i*4096); err != nil {
			t.Fatal(err)
		}
	}
	records := 0
	for _, op := range f.take() {
		if op == "sync" {
			records++
		}
	}
	if records != 2 || len(d.pending) != 1 {
		t.Fatalf("%d syncs and %d pending after %d allocations", records, len(d.pending), maxPending+1)
	}
}

// refusingTable refuses to place block 0 and places the others.
type refusingTable struct{ *testTable }

func (t refusingTable) Reserve(i int64) (int64, error) {
	if i == 0 {
		return 0, fmt.Errorf("no place for block 0")
	}
	return t.testTable.Reserve(i)
}

// TestRefusedPlaceLeavesWritesWorking: a table that cannot place one
// block fails that write only; other blocks are still written.
func TestRefusedPlaceLeavesWritesWorking(t *testing.T) {
	f := &logFile{b: make([]byte, 4096)}
	tt := &testTable{f: f, entries: make([]int64, 4), free: 4096}
	d := New(Config{Format: "test", Path: "test.img", File: f, Size: 4 * 4096, BlockSize: 4096, Table: refusingTable{tt}})
	if _, err := d.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("a write into a block the table cannot place succeeded")
	}
	if _, err := d.WriteAt([]byte{2}, 4096); err != nil {
		t.Fatalf("a write into another block after the refusal: %v", err)
	}
	got := make([]byte, 1)
	if _, err := d.ReadAt(got, 4096); err != nil || got[0] != 2 {
		t.Fatalf("read back %v, %v", got, err)
	}
}

// TestStoredRunReadInOneCall: blocks stored one after another in the file
// are read in one call, and a block stored elsewhere in another.
func TestStoredRunReadInOneCall(t *testing.T) {
	d, f := newTestDisk(6)
	want := make([]byte, 6*4096)
	for _, i := range []int64{0, 1, 2, 5, 3} { // block 3 lands after block 5
		p := bytes.Repeat([]byte{byte(i + 1)}, 4096)
		copy(want[i*4096:], p)
		if _, err := d.WriteAt(p, i*4096); err != nil {
			t.Fatal(err)
		}
	}
	f.mu.Lock()
	f.reads = nil
	f.mu.Unlock()
	got := make([]byte, 4*4096-100)
	if _, err := d.ReadAt(got, 100); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want[100:4*4096]) {
		t.Fatal("blocks 0-3 do not read as written")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if got := fmt.Sprint(f.reads); got != "[read 4196+12188 read 20480+4096]" {
		t.Fatalf("the read of blocks 0-3 made %s, want blocks 0-2 in one read and block 3 in another", got)
	}
}

// mappedFile is a logFile that maps every range onto itself, as a raw
// file does.
type mappedFile struct{ *logFile }

func (f mappedFile) MapHost(off, n int64, write bool) (diskserve.HostRange, bool) {
	return diskserve.HostRange{FD: 99, Off: off}, true
}

// TestMapHost maps reads inside a stored block or a run of them onto the
// file, and nothing else: not a write, not an unallocated block, not a
// range across blocks stored apart.
func TestMapHost(t *testing.T) {
	f := mappedFile{&logFile{b: make([]byte, 4096)}}
	tab := &testTable{f: f.logFile, entries: make([]int64, 6), free: 4096}
	d := New(Config{Format: "test", Path: "test.img", File: f, Size: 6 * 4096, BlockSize: 4096, Table: tab})
	for _, i := range []int64{0, 1, 2, 5, 3} { // block 3 lands after block 5
		if _, err := d.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 4096), i*4096); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		off, n int64
		write  bool
		host   int64 // -1: not mapped
	}{
		{100, 200, false, 4096 + 100},        // inside block 0
		{4000, 2 * 4096, false, 4096 + 4000}, // blocks 0-2, stored in a row
		{4000, 3 * 4096, false, -1},          // on into block 3, stored apart
		{2*4096 + 10, 3000, false, 3*4096 + 10},
		{2*4096 + 10, 4096, false, -1}, // block 2 into block 3, stored apart
		{3 * 4096, 4096, false, 5 * 4096},
		{4 * 4096, 10, false, -1}, // unallocated
		{100, 200, true, -1},      // a write
	} {
		r, ok := d.MapHost(c.off, c.n, c.write)
		switch {
		case c.host < 0 && ok:
			t.Errorf("%d+%d (write %v) mapped to %d, want no mapping", c.off, c.n, c.write, r.Off)
		case c.host >= 0 && (!ok || r.Off != c.host):
			t.Errorf("%d+%d mapped to %d (%v), want %d", c.off, c.n, r.Off, ok, c.host)
		}
	}
}
