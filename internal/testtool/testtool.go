// Package testtool runs the real tools that diskserve's interop tests
// compare against (qemu-img, qemu-io, nbdinfo, ...).
//
// A test that needs a tool calls [Need]. When the tool is missing the test
// is skipped, unless DISKSERVE_REQUIRE_INTEROP=1 is set (as CI sets it),
// in which case it fails: a missing tool must not turn interop coverage
// into silence.
package testtool

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// RequireEnv is the environment variable that turns a missing tool from a
// skip into a failure.
const RequireEnv = "DISKSERVE_REQUIRE_INTEROP"

// Need returns the path of the named tool, or skips (or fails, under
// [RequireEnv]) the test when it is not installed.
func Need(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%s is required (%s=1) but not installed: %v", name, RequireEnv, err)
	}
	t.Skipf("%s not installed: %v", name, err)
	return ""
}

// Run runs the named tool with args and returns its standard output,
// failing the test with the tool's standard error if it exits non-zero.
func Run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(Need(t, name), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.Bytes())
	}
	return out
}
