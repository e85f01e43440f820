package vhdx

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
)

// FuzzLocator decodes arbitrary parent locators: it must not panic, and a
// locator it accepts must have a parent_linkage and encode back to one
// that decodes the same.
func FuzzLocator(f *testing.F) {
	f.Add(encodeLocator([]string{"parent_linkage", "relative_path"}, []string{"{5f752bfa-efaa-644c-aae8-5dfff6de973c}", `..\base.vhdx`}))
	f.Add(encodeLocator([]string{"parent_linkage", "parent_linkage", "absolute_win32_path"}, []string{"{a}", "{b}", `C:\x.vhdx`}))
	f.Fuzz(func(t *testing.T, b []byte) {
		kv, err := parseLocator(b)
		if err != nil {
			return
		}
		if kv["parent_linkage"] == "" {
			t.Fatal("accepted a locator without parent_linkage")
		}
		var keys, values []string
		for k, v := range kv {
			keys, values = append(keys, k), append(values, v)
		}
		again, err := parseLocator(encodeLocator(keys, values))
		if err != nil || !reflect.DeepEqual(again, kv) {
			t.Fatalf("%q encodes to a locator read back as %q, %v", kv, again, err)
		}
	})
}

// TestSelfParent opens a differencing disk whose locator names the disk
// itself, with its own data write GUID as the linkage: the open must end
// at the nesting depth limit with an error, not recurse for ever.
func TestSelfParent(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "self.vhdx")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	o, err := parseOptions(nil, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := create(f, o); err != nil {
		t.Fatal(err)
	}
	f.Close()
	d, err := readParent(img)
	if err != nil {
		t.Fatal(err)
	}
	o.locator, err = childLocator(img, "self.vhdx", d.hdr.DataWriteGUID)
	if err != nil {
		t.Fatal(err)
	}
	// Rewrite the disk as a differencing disk, keeping its headers (and
	// so its GUID).
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	f, err = os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := create(f, o); err != nil {
		t.Fatal(err)
	}
	f.Close()
	nb, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	copy(nb[header1Off:region1Off], b[header1Off:region1Off])
	if err := os.WriteFile(img, nb, 0o644); err != nil {
		t.Fatal(err)
	}

	opts := diskserve.Options{ReadOnly: true, Formats: []diskserve.Format{Format, raw.Format}, OpenFile: raw.OpenFile, MaxDepth: 8}
	if _, err := diskserve.Open(img, opts); !errors.Is(err, diskserve.ErrNestingDepth) {
		t.Fatalf("open of a disk that is its own parent: %v", err)
	}
}
