package vmdk

import (
	"fmt"
	"strconv"
	"strings"
)

// maxDescriptor bounds the descriptor text diskserve reads: qemu's limit.
const maxDescriptor = 1 << 20

// maxExtents bounds the extents of one disk (a 2 TiB twoGbMaxExtent disk
// has 1024).
const maxExtents = 4096

// A descriptor is the text that says what a VMDK disk is made of.
type descriptor struct {
	Version    int
	CID        uint32
	ParentCID  uint32
	CreateType string
	ParentHint string // parentFileNameHint: the parent's file, for a delta disk
	Extents    []extentLine
	DDB        map[string]string // ddb.* keys, without the prefix
}

// An extentLine is one line of the extent description:
// ACCESS SECTORS TYPE ["FILE" [OFFSET]].
type extentLine struct {
	Access  string // RW, RDONLY or NOACCESS
	Sectors int64
	Type    string // SPARSE, FLAT, ZERO, VMFS, VMFSSPARSE, ...
	File    string
	Offset  int64 // sectors into File where a flat extent starts
}

// isDescriptor reports whether head looks like a descriptor file, as qemu
// probes one: after comment lines and blanks, the first line is
// version=1, 2 or 3.
func isDescriptor(head []byte) bool {
	text := string(head)
	for {
		line, rest, whole := strings.Cut(text, "\n")
		if !whole {
			return false
		}
		switch t := strings.TrimSpace(strings.TrimSuffix(line, "\r")); t {
		case "version=1", "version=2", "version=3":
			return true
		case "":
		default:
			if t[0] != '#' {
				return false
			}
		}
		text = rest
	}
}

// parseDescriptor parses a descriptor's text.
func parseDescriptor(text string) (*descriptor, error) {
	d := &descriptor{DDB: map[string]string{}, ParentCID: 0xffffffff}
	seenVersion := false
	for n, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(strings.TrimRight(line, "\r\x00"))
		if line == "" || line[0] == '#' {
			continue
		}
		bad := func(format string, args ...any) error {
			return fmt.Errorf("descriptor line %d: %s", n+1, fmt.Sprintf(format, args...))
		}
		switch first := strings.Fields(line)[0]; first {
		case "RW", "RDONLY", "NOACCESS":
			if len(d.Extents) >= maxExtents {
				return nil, bad("more than %d extents", maxExtents)
			}
			e, err := parseExtent(line)
			if err != nil {
				return nil, bad("%v", err)
			}
			d.Extents = append(d.Extents, e)
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return nil, bad("%q is neither KEY=VALUE nor an extent", line)
		}
		key = strings.TrimSpace(key)
		value = unquote(strings.TrimSpace(value))
		switch {
		case key == "version":
			v, err := strconv.Atoi(value)
			if err != nil || v < 1 || v > 3 {
				return nil, bad("version %q is not 1, 2 or 3", value)
			}
			d.Version, seenVersion = v, true
		case key == "CID":
			cid, err := strconv.ParseUint(value, 16, 32)
			if err != nil {
				return nil, bad("CID %q is not hexadecimal", value)
			}
			d.CID = uint32(cid)
		case key == "parentCID":
			cid, err := strconv.ParseUint(value, 16, 32)
			if err != nil {
				return nil, bad("parentCID %q is not hexadecimal", value)
			}
			d.ParentCID = uint32(cid)
		case key == "createType":
			d.CreateType = value
		case key == "parentFileNameHint":
			d.ParentHint = value
		case strings.HasPrefix(key, "ddb."):
			d.DDB[strings.TrimPrefix(key, "ddb.")] = value
		}
	}
	if !seenVersion {
		return nil, fmt.Errorf("descriptor has no version line")
	}
	if len(d.Extents) == 0 {
		return nil, fmt.Errorf("descriptor has no extents")
	}
	return d, nil
}

// parseExtent parses ACCESS SECTORS TYPE ["FILE" [OFFSET]].
func parseExtent(line string) (extentLine, error) {
	var e extentLine
	fields := strings.Fields(line)
	if len(fields) < 3 {
		return e, fmt.Errorf("extent %q has no size and type", line)
	}
	e.Access, e.Type = fields[0], fields[2]
	var err error
	if e.Sectors, err = strconv.ParseInt(fields[1], 10, 64); err != nil || e.Sectors < 0 || e.Sectors > 1<<40 {
		return e, fmt.Errorf("extent size %q is not a number of sectors up to 2^40", fields[1])
	}
	if e.Type == "ZERO" {
		return e, nil
	}
	// The file name is quoted and may hold spaces.
	q1 := strings.IndexByte(line, '"')
	q2 := strings.LastIndexByte(line, '"')
	if q1 < 0 || q2 <= q1 {
		return e, fmt.Errorf("extent %q has no quoted file name", line)
	}
	e.File = line[q1+1 : q2]
	if e.File == "" {
		return e, fmt.Errorf("extent %q has an empty file name", line)
	}
	if rest := strings.Fields(line[q2+1:]); len(rest) > 0 {
		if e.Offset, err = strconv.ParseInt(rest[0], 10, 64); err != nil || e.Offset < 0 || e.Offset > 1<<40 {
			return e, fmt.Errorf("extent offset %q is not a number of sectors up to 2^40", rest[0])
		}
	}
	return e, nil
}

// unquote removes the double quotes around a descriptor value.
func unquote(s string) string {
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
		return s[1 : len(s)-1]
	}
	return s
}

// String formats the descriptor as qemu-img writes one.
func (d *descriptor) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Disk DescriptorFile\nversion=%d\nCID=%08x\nparentCID=%08x\ncreateType=\"%s\"\n", d.Version, d.CID, d.ParentCID, d.CreateType)
	if d.ParentHint != "" {
		fmt.Fprintf(&b, "parentFileNameHint=\"%s\"\n", d.ParentHint)
	}
	b.WriteString("\n# Extent description\n")
	for _, e := range d.Extents {
		fmt.Fprintf(&b, "%s %d %s", e.Access, e.Sectors, e.Type)
		if e.Type != "ZERO" {
			fmt.Fprintf(&b, " \"%s\"", e.File)
			if e.Type == "FLAT" || e.Type == "VMFS" {
				fmt.Fprintf(&b, " %d", e.Offset)
			}
		}
		b.WriteString("\n")
	}
	b.WriteString("\n# The Disk Data Base\n#DDB\n\n")
	for _, k := range ddbOrder {
		if v, ok := d.DDB[k]; ok {
			fmt.Fprintf(&b, "ddb.%s = \"%s\"\n", k, v)
		}
	}
	return b.String()
}

// ddbOrder is the order in which String writes the disk database.
var ddbOrder = []string{"virtualHWVersion", "longContentID", "uuid", "geometry.cylinders", "geometry.heads", "geometry.sectors", "adapterType", "toolsVersion"}
