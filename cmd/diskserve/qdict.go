package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"slices"
)

// qemu-img prints its JSON from QAPI objects held in QDicts, and a QDict
// lists its keys in the order of its hash table: by the bucket of each
// key's hash, the latest key first within a bucket. writeQemuJSON prints
// in that order, so that diskserve's output is qemu-img's byte for byte,
// not only the same object.

// qdictBuckets is the number of buckets of a QDict.
const qdictBuckets = 512

// qdictBucket returns the bucket of key in a QDict: the hash qemu's QDict
// uses (Samba's tdb hash) modulo the bucket count.
func qdictBucket(key string) uint32 {
	value := 0x238F13AF * uint32(len(key))
	for i := 0; i < len(key); i++ {
		value += uint32(key[i]) << (i * 5 % 24)
	}
	return (1103515243*value + 12345) % qdictBuckets
}

// writeQemuJSON writes v as JSON indented by four spaces, as qemu-img
// does, with the keys of every object in QDict order (a key that shares
// its bucket with another comes before the keys encoded before it).
func writeQemuJSON(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var tree jsonValue
	if err := tree.decode(dec); err != nil {
		return err
	}
	var compact bytes.Buffer
	tree.encode(&compact)
	var out bytes.Buffer
	if err := json.Indent(&out, compact.Bytes(), "", "    "); err != nil {
		return err
	}
	out.WriteByte('\n')
	_, err = w.Write(out.Bytes())
	return err
}

// A jsonValue is a decoded JSON value whose objects keep their keys in
// order: an object's fields, an array's elements, or a scalar's encoding.
type jsonValue struct {
	fields   []jsonField // an object
	elements []jsonValue // an array
	object   bool
	array    bool
	scalar   json.RawMessage
}

type jsonField struct {
	key   string
	value jsonValue
}

func (v *jsonValue) decode(dec *json.Decoder) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			v.object = true
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return err
				}
				var f jsonField
				f.key = k.(string)
				if err := f.value.decode(dec); err != nil {
					return err
				}
				v.fields = append(v.fields, f)
			}
		case '[':
			v.array = true
			for dec.More() {
				var e jsonValue
				if err := e.decode(dec); err != nil {
					return err
				}
				v.elements = append(v.elements, e)
			}
		default:
			return fmt.Errorf("unexpected %v", t)
		}
		_, err := dec.Token() // the closing delimiter
		return err
	default:
		v.scalar, err = marshalRaw(t)
		return err
	}
}

// marshalRaw encodes v as JSON without Go's escapes of <, > and &, which
// qemu-img does not make.
func marshalRaw(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// encode writes v compactly, each object's keys in QDict order.
func (v *jsonValue) encode(b *bytes.Buffer) {
	switch {
	case v.object:
		fields := slices.Clone(v.fields)
		slices.Reverse(fields) // the latest first within a bucket
		slices.SortStableFunc(fields, func(a, b jsonField) int {
			return int(qdictBucket(a.key)) - int(qdictBucket(b.key))
		})
		b.WriteByte('{')
		for i, f := range fields {
			if i > 0 {
				b.WriteByte(',')
			}
			k, _ := marshalRaw(f.key)
			b.Write(k)
			b.WriteByte(':')
			f.value.encode(b)
		}
		b.WriteByte('}')
	case v.array:
		b.WriteByte('[')
		for i := range v.elements {
			if i > 0 {
				b.WriteByte(',')
			}
			v.elements[i].encode(b)
		}
		b.WriteByte(']')
	default:
		b.Write(v.scalar)
	}
}
