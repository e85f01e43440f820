package composite

import (
	"errors"
	"fmt"
	"sort"

	"google.golang.org/protobuf/encoding/protowire"
)

// Magic starts every composite disk file; a protobuf CompositeDisk message
// follows it to the end of the file.
const Magic = "composite_disk\x1d"

// Version is the newest spec version this package reads (crosvm's
// COMPOSITE_DISK_VERSION).
const Version = 2

// Limits on what a spec may claim.
const (
	maxSpecLen    = 16 << 20 // a spec is a few hundred bytes per component
	maxComponents = 4096
	maxPathLen    = 4096
)

// The fields of crosvm's cdisk_spec.proto (proto3).
const (
	fieldCompositeVersion    = 1 // uint64
	fieldCompositeComponents = 2 // repeated ComponentDisk
	fieldCompositeLength     = 3 // uint64
	fieldComponentPath       = 1 // string
	fieldComponentOffset     = 2 // uint64: guest offset
	fieldComponentRW         = 3 // enum: 0 READ_ONLY, 1 READ_WRITE
	fieldComponentFileOffset = 4 // uint64: offset in the component's file
)

// A Spec is a decoded composite disk description.
type Spec struct {
	Version    uint64
	Length     int64
	Components []Component // sorted by Offset
}

// A Component is one image of a composite: guest bytes [Offset, Offset+Len)
// come from the component's image at FileOffset.
type Component struct {
	Path       string
	Offset     int64
	Len        int64
	FileOffset int64
	Writable   bool
}

// ParseSpec decodes and validates the protobuf message that follows the
// magic. Unknown fields are skipped, as protobuf requires; fields left out
// take their zero value. The components are sorted by offset and must
// tile [0, Length) without gaps or overlaps.
func ParseSpec(b []byte) (*Spec, error) {
	if len(b) > maxSpecLen {
		return nil, fmt.Errorf("spec of %d bytes, more than %d", len(b), maxSpecLen)
	}
	s := &Spec{}
	var length uint64
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, u uint64) error {
		switch {
		case num == fieldCompositeVersion && typ == protowire.VarintType:
			s.Version = u
		case num == fieldCompositeLength && typ == protowire.VarintType:
			length = u
		case num == fieldCompositeComponents && typ == protowire.BytesType:
			if len(s.Components) == maxComponents {
				return fmt.Errorf("more than %d components", maxComponents)
			}
			c, err := parseComponent(v)
			if err != nil {
				return fmt.Errorf("component %d: %w", len(s.Components), err)
			}
			s.Components = append(s.Components, c)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	switch {
	case s.Version > Version:
		return nil, fmt.Errorf("version %d is newer than %d", s.Version, Version)
	case len(s.Components) == 0:
		return nil, errors.New("no components")
	case length > 1<<62:
		return nil, fmt.Errorf("length %d is too large", length)
	}
	s.Length = int64(length)
	sort.SliceStable(s.Components, func(i, j int) bool { return s.Components[i].Offset < s.Components[j].Offset })
	for i := range s.Components {
		c := &s.Components[i]
		end := s.Length
		if i+1 < len(s.Components) {
			end = s.Components[i+1].Offset
		}
		switch {
		case i == 0 && c.Offset != 0:
			return nil, fmt.Errorf("the first component (%q) starts at %d, not 0", c.Path, c.Offset)
		case end <= c.Offset:
			return nil, fmt.Errorf("component %q at offset %d is empty or overlaps the next one, which starts at %d", c.Path, c.Offset, end)
		}
		c.Len = end - c.Offset
	}
	return s, nil
}

func parseComponent(b []byte) (Component, error) {
	var c Component
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, u uint64) error {
		switch {
		case num == fieldComponentPath && typ == protowire.BytesType:
			if len(v) > maxPathLen {
				return fmt.Errorf("path of %d bytes", len(v))
			}
			c.Path = string(v)
		case num == fieldComponentOffset && typ == protowire.VarintType:
			if u > 1<<62 {
				return fmt.Errorf("offset %d is too large", u)
			}
			c.Offset = int64(u)
		case num == fieldComponentRW && typ == protowire.VarintType:
			c.Writable = u == 1
		case num == fieldComponentFileOffset && typ == protowire.VarintType:
			if u > 1<<62 {
				return fmt.Errorf("file offset %d is too large", u)
			}
			c.FileOffset = int64(u)
		}
		return nil
	})
	if err == nil && c.Path == "" {
		err = errors.New("no file path")
	}
	return c, err
}

// eachField calls fn for every field of a protobuf message: v holds the
// bytes of a length-delimited field, u the value of a varint.
func eachField(b []byte, fn func(num protowire.Number, typ protowire.Type, v []byte, u uint64) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("bad field tag: %w", protowire.ParseError(n))
		}
		b = b[n:]
		var v []byte
		var u uint64
		switch typ {
		case protowire.VarintType:
			u, n = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			v, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return fmt.Errorf("field %d: %w", num, protowire.ParseError(n))
		}
		b = b[n:]
		if err := fn(num, typ, v, u); err != nil {
			return err
		}
	}
	return nil
}

// Marshal encodes s, magic first, in crosvm's encoding: default values are
// left out, as proto3 does.
func (s *Spec) Marshal() []byte {
	b := []byte(Magic)
	if s.Version != 0 {
		b = protowire.AppendTag(b, fieldCompositeVersion, protowire.VarintType)
		b = protowire.AppendVarint(b, s.Version)
	}
	for _, c := range s.Components {
		var m []byte
		m = protowire.AppendTag(m, fieldComponentPath, protowire.BytesType)
		m = protowire.AppendString(m, c.Path)
		if c.Offset != 0 {
			m = protowire.AppendTag(m, fieldComponentOffset, protowire.VarintType)
			m = protowire.AppendVarint(m, uint64(c.Offset))
		}
		if c.Writable {
			m = protowire.AppendTag(m, fieldComponentRW, protowire.VarintType)
			m = protowire.AppendVarint(m, 1)
		}
		if c.FileOffset != 0 {
			m = protowire.AppendTag(m, fieldComponentFileOffset, protowire.VarintType)
			m = protowire.AppendVarint(m, uint64(c.FileOffset))
		}
		b = protowire.AppendTag(b, fieldCompositeComponents, protowire.BytesType)
		b = protowire.AppendBytes(b, m)
	}
	if s.Length != 0 {
		b = protowire.AppendTag(b, fieldCompositeLength, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(s.Length))
	}
	return b
}
