package gpt

import (
	"errors"
	"hash/crc32"
	"testing"
)

// table builds a sector with a header and its entry array, holding ps.
func table(ps []Partition) (sector, entries []byte) {
	entries = make([]byte, 128*EntrySize)
	for i, p := range ps {
		MarshalEntry(entries[i*EntrySize:], p)
	}
	h := Header{Current: 1, Backup: 1000, FirstUsable: 34, LastUsable: 966, Disk: GUID{9}, EntriesLBA: 2, Entries: 128, EntrySize: EntrySize, EntriesCRC: crc32.ChecksumIEEE(entries)}
	sector = make([]byte, SectorSize)
	h.Marshal(sector)
	return sector, entries
}

func TestRoundTrip(t *testing.T) {
	want := []Partition{{Type: GUID{1}, Unique: GUID{2}, First: 40, Last: 99, Name: "boot"}, {Type: GUID{3}, Unique: GUID{4}, First: 100, Last: 900, Name: "système, 36 code units at the most!"}}
	sector, entries := table(want)
	h, err := ParseHeader(sector)
	if err != nil {
		t.Fatal(err)
	}
	if h.Backup != 1000 || h.Disk != (GUID{9}) || h.EntriesLBA != 2 {
		t.Errorf("header %+v", h)
	}
	got, err := ParseEntries(h, entries)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("entries %+v, want %+v", got, want)
	}
}

func TestBadTables(t *testing.T) {
	sector, entries := table([]Partition{{Type: GUID{1}, First: 40, Last: 99}})
	if _, err := ParseHeader(make([]byte, SectorSize)); !errors.Is(err, ErrNoTable) {
		t.Errorf("a blank sector: %v", err)
	}
	bad := append([]byte(nil), sector...)
	bad[24]++
	if _, err := ParseHeader(bad); err == nil {
		t.Error("a header with a wrong CRC parsed")
	}
	h, _ := ParseHeader(sector)
	entries[40]++
	if _, err := ParseEntries(h, entries); err == nil {
		t.Error("entries with a wrong CRC parsed")
	}
	if _, err := ParseEntries(h, entries[:100]); err == nil {
		t.Error("a short entry array parsed")
	}
	huge := Header{Entries: 1 << 20, EntrySize: EntrySize}
	huge.Marshal(bad)
	if _, err := ParseHeader(bad); err == nil {
		t.Error("a header claiming a million entries parsed")
	}
}

// FuzzParse parses a sector and an entry array, with the CRCs fixed up so
// that the fuzzer gets past them half of the time.
func FuzzParse(f *testing.F) {
	sector, entries := table([]Partition{{Type: GUID{1}, First: 40, Last: 99, Name: "a"}})
	f.Add(sector, entries[:2*EntrySize], true)
	f.Fuzz(func(t *testing.T, sector, entries []byte, fix bool) {
		if fix && len(sector) >= HeaderSize {
			sector[16], sector[17], sector[18], sector[19] = 0, 0, 0, 0
			le.PutUint32(sector[88:], crc32.ChecksumIEEE(entries))
			if n := le.Uint32(sector[12:]); n >= HeaderSize && int(n) <= len(sector) && n <= maxHeaderLength {
				le.PutUint32(sector[16:], crc32.ChecksumIEEE(sector[:n]))
			}
		}
		h, err := ParseHeader(sector)
		if err != nil {
			return
		}
		if h.EntriesLen() > MaxEntries*MaxEntrySize {
			t.Fatalf("header claims %d bytes of entries", h.EntriesLen())
		}
		ps, err := ParseEntries(h, entries)
		if err == nil && len(ps) > int(h.Entries) {
			t.Fatalf("%d partitions from %d entries", len(ps), h.Entries)
		}
	})
}
