package diskserve_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/diskserve/diskserve"
	"github.com/diskserve/diskserve/format/raw"
	"github.com/diskserve/diskserve/internal/disktest"
)

// capabilityNames returns the interface name of each capability, from
// the one declaration of the set.
func capabilityNames(t *testing.T) map[diskserve.Capabilities]string {
	names := map[diskserve.Capabilities]string{}
	for c := diskserve.Capabilities(1); c != 0; c <<= 1 {
		name := c.String()
		if strings.HasPrefix(name, "0x") {
			break
		}
		names[c] = name
	}
	if len(names) < 10 {
		t.Fatalf("only %d capabilities: %v", len(names), names)
	}
	return names
}

// TestCapabilityDocs checks that the DiskFile contract names every
// capability's interface, so that the doc cannot fall behind the list.
func TestCapabilityDocs(t *testing.T) {
	src, err := os.ReadFile("disk.go")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(src[:strings.Index(string(src), "type DiskFile interface")])
	for _, name := range capabilityNames(t) {
		if !strings.Contains(doc, "["+name+"]") {
			t.Errorf("the DiskFile doc does not name [%s]", name)
		}
	}
}

// TestWrappersForward holds the root's wrappers to the capability list:
// Passthrough forwards every capability and maps nothing; the guard of a
// probed raw image maps, by choice, past its first sector.
func TestWrappersForward(t *testing.T) {
	mem := disktest.NewMemory(make([]byte, 1<<20), false)
	disktest.CheckWrapper(t, diskserve.Passthrough{D: mem}, false)
	if got, want := diskserve.CapabilitiesOf(diskserve.Passthrough{D: mem}), diskserve.CapabilitiesOf(mem); got != want {
		t.Errorf("a Passthrough reports %v, the disk beneath %v", got, want)
	}

	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	probed, err := diskserve.Open(path, diskserve.Options{Formats: []diskserve.Format{raw.Format}, OpenFile: raw.OpenFile})
	if err != nil {
		t.Fatal(err)
	}
	defer probed.Close()
	disktest.CheckWrapper(t, probed, true)
	rawCaps := diskserve.CanFlush | diskserve.CanWriteZeroes | diskserve.CanPunchHole | diskserve.CanMapExtents | diskserve.CanResize | diskserve.CanDescribe | diskserve.CanMapHost | diskserve.CanLocateHost
	if got := diskserve.CapabilitiesOf(probed); got != rawCaps {
		t.Errorf("a probed raw image reports %v, want %v", got, rawCaps)
	}
}

func TestCapabilitiesString(t *testing.T) {
	names := capabilityNames(t)
	if got := (diskserve.CanFlush | diskserve.CanMapHost).String(); got != names[diskserve.CanFlush]+"|"+names[diskserve.CanMapHost] {
		t.Errorf("String = %q", got)
	}
}
