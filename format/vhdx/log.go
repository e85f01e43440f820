package vhdx

import (
	"fmt"

	"github.com/diskserve/diskserve"
)

const (
	logSector    = 4 * kib
	maxLogLength = 64 * mib // the largest log diskserve reads into memory
)

// A logEntry is a valid entry of the log, and what it writes.
type logEntry struct {
	off, length int64 // in the log
	tail        int64 // where the oldest entry still needed starts
	seq         uint64
	flushedEnd  int64 // the file's size when the entry was written, at least
	lastEnd     int64 // the file's size the entry's writes need
	writes      []logWrite
}

// A logWrite is one descriptor of an entry: 4 KiB of data, or a run of
// zeroes, at an offset of the file.
type logWrite struct {
	off  int64
	data []byte // nil for zeroes
	n    int64
}

// parseEntry decodes the log entry at off of log, or returns ok false if
// there is no valid entry of the log identified by id there.
func parseEntry(log []byte, off int64, id guid) (e logEntry, ok bool) {
	b := log[off:]
	if len(b) < logSector || string(b[:4]) != "loge" {
		return e, false
	}
	length := int64(le.Uint32(b[8:]))
	if length < logSector || length%logSector != 0 || length > int64(len(b)) {
		return e, false
	}
	if checksum(b[:length], 4) != le.Uint32(b[4:]) || guid(b[32:48]) != id {
		return e, false
	}
	e = logEntry{off: off, length: length, tail: int64(le.Uint32(b[12:])), seq: le.Uint64(b[16:]),
		flushedEnd: int64(le.Uint64(b[48:])), lastEnd: int64(le.Uint64(b[56:]))}
	count := int64(le.Uint32(b[24:]))
	descLen := (64 + 32*count + logSector - 1) / logSector * logSector
	if e.seq == 0 || e.tail%logSector != 0 || e.tail >= int64(len(log)) || descLen > length {
		return e, false
	}
	data := descLen
	for k := range count {
		d := b[64+32*k:]
		if le.Uint64(d[24:]) != e.seq {
			return e, false
		}
		w := logWrite{off: int64(le.Uint64(d[16:]))}
		switch string(d[:4]) {
		case "zero":
			w.n = int64(le.Uint64(d[8:]))
			if w.n%logSector != 0 {
				return e, false
			}
		case "desc":
			if data+logSector > length {
				return e, false
			}
			s := b[data : data+logSector]
			if string(s[:4]) != "data" || uint64(le.Uint32(s[4:]))<<32|uint64(le.Uint32(s[4092:])) != e.seq {
				return e, false
			}
			w.n, w.data = logSector, make([]byte, logSector)
			copy(w.data, d[8:16])       // the sector's first 8 bytes, kept in the descriptor
			copy(w.data[8:], s[8:4092]) // its middle
			copy(w.data[4092:], d[4:8]) // its last 4, kept in the descriptor
			data += logSector
		default:
			return e, false
		}
		if w.off%logSector != 0 || w.off < 0 || w.off > 1<<50 || w.n > 1<<40 {
			return e, false
		}
		e.writes = append(e.writes, w)
	}
	return e, true
}

// activeSequence finds the entries to replay, oldest first: the valid
// sequence of consecutive entries whose newest has the highest sequence
// number, from its tail on. It returns nil for a log with none.
func activeSequence(log []byte, id guid) ([]logEntry, error) {
	entries := map[int64]logEntry{}
	for off := int64(0); off+logSector <= int64(len(log)); off += logSector {
		if e, ok := parseEntry(log, off, id); ok {
			entries[off] = e
		}
	}
	follow := func(from logEntry) []logEntry {
		seq := []logEntry{from}
		for cur := from; len(seq) <= len(entries); {
			next, ok := entries[(cur.off+cur.length)%int64(len(log))]
			if !ok || next.seq != cur.seq+1 {
				break
			}
			seq = append(seq, next)
			cur = next
		}
		return seq
	}
	var head *logEntry
	for _, e := range entries {
		s := follow(e)
		if last := s[len(s)-1]; head == nil || last.seq > head.seq {
			head = &last
		}
	}
	if head == nil {
		return nil, nil
	}
	tail, ok := entries[head.tail]
	if !ok {
		return nil, fmt.Errorf("the newest log entry (sequence %d) names a tail at %d that is not a valid entry", head.seq, head.tail)
	}
	s := follow(tail)
	if s[len(s)-1].seq != head.seq {
		return nil, fmt.Errorf("the log entries from the tail (sequence %d) do not lead to the newest (sequence %d)", tail.seq, head.seq)
	}
	return s, nil
}

// replayLog applies the log's active sequence to the file and empties the
// log: the headers then name no log. It is what Hyper-V and qemu do when
// they open an image that was not closed cleanly.
func (d *Disk) replayLog(c diskserve.DiskFile) error {
	h := d.hdr
	if h.LogLength == 0 || h.LogLength > maxLogLength || h.LogLength%mib != 0 || h.LogOffset%mib != 0 || h.LogOffset < mib {
		return corrupt(-1, "the log (%d bytes at %d) is not where a log can be", h.LogLength, h.LogOffset)
	}
	log := make([]byte, h.LogLength)
	if err := diskserve.ReadFullAt(c, log, int64(h.LogOffset)); err != nil {
		return corrupt(int64(h.LogOffset), "read log: %v", err)
	}
	seq, err := activeSequence(log, h.LogGUID)
	if err != nil {
		return corrupt(int64(h.LogOffset), "%v", err)
	}
	if len(seq) > 0 {
		head := seq[len(seq)-1]
		if c.Size() < head.flushedEnd {
			return corrupt(-1, "the file (%d bytes) is shorter than the log says it was (%d): it was truncated", c.Size(), head.flushedEnd)
		}
		for _, e := range seq {
			for _, w := range e.writes {
				if err := d.applyLogWrite(c, w); err != nil {
					return fmt.Errorf("replay log entry %d: %w", e.seq, err)
				}
			}
		}
		if c.Size() < head.lastEnd {
			if err := diskserve.Resize(c, head.lastEnd); err != nil {
				return err
			}
		}
		if err := diskserve.Flush(c); err != nil {
			return err
		}
	}
	d.hdr.LogGUID = guid{}
	d.replayed = len(seq)
	return d.writeHeaders(c)
}

// applyLogWrite writes one descriptor's data or zeroes into the file.
func (d *Disk) applyLogWrite(c diskserve.DiskFile, w logWrite) error {
	if end := w.off + w.n; c.Size() < end {
		if err := diskserve.Resize(c, end); err != nil {
			return err
		}
	}
	if w.data != nil {
		_, err := c.WriteAt(w.data, w.off)
		return err
	}
	return diskserve.WriteZeroes(c, w.off, w.n, 0)
}
