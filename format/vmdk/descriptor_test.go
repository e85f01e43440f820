package vmdk

import (
	"strings"
	"testing"
)

// FuzzDescriptor parses arbitrary descriptor text: it must not panic,
// must keep to its bounds, and what it parses must survive being written
// and parsed again.
func FuzzDescriptor(f *testing.F) {
	f.Add("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\nRW 4194304 SPARSE \"a-s001.vmdk\"\nRW 2048 SPARSE \"a-s002.vmdk\"\n\nddb.adapterType = \"lsilogic\"\n")
	f.Add("version=1\r\nCID=fffffffe\r\nparentCID=87654321\r\nparentFileNameHint=\"../base image.vmdk\"\r\nRW 8 FLAT \"x y-flat.vmdk\" 16\r\nRDONLY 8 ZERO\r\n")
	f.Fuzz(func(t *testing.T, text string) {
		d, err := parseDescriptor(text)
		if err != nil {
			return
		}
		if len(d.Extents) == 0 || len(d.Extents) > maxExtents {
			t.Fatalf("%d extents", len(d.Extents))
		}
		for _, e := range d.Extents {
			if e.Sectors < 0 || e.Offset < 0 || e.Type != "ZERO" && e.File == "" {
				t.Fatalf("extent %+v", e)
			}
			if strings.ContainsAny(e.File, "\"\n") || strings.ContainsAny(e.Type, " \"") {
				return // not something String can write back
			}
		}
		if strings.ContainsAny(d.CreateType+d.ParentHint, "\"\n\r") {
			return
		}
		again, err := parseDescriptor(d.String())
		if err != nil {
			t.Fatalf("the descriptor written back does not parse: %v\n%s", err, d.String())
		}
		if len(again.Extents) != len(d.Extents) || again.CID != d.CID || again.ParentCID != d.ParentCID || again.CreateType != d.CreateType {
			t.Fatalf("written back and parsed again: %+v, was %+v", again, d)
		}
	})
}

// TestIsDescriptor probes as qemu does: comment lines and blanks, then a
// version line ended by a newline.
func TestIsDescriptor(t *testing.T) {
	for text, want := range map[string]bool{
		"# Disk DescriptorFile\nversion=1\n": true,
		"\n  \n# x\r\nversion=3\r\n":         true,
		"version=1":                          false, // no newline yet: a guest's partial write
		"version=4\n":                        false,
		"# Disk DescriptorFile\nCID=1\n":     false,
		"QFI\xfb":                            false,
	} {
		if got := isDescriptor([]byte(text)); got != want {
			t.Errorf("isDescriptor(%q) = %v", text, got)
		}
	}
}
