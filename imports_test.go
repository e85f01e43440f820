package diskserve_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImportGraph keeps the import graph one-way: the root (the
// contracts) imports no other package of the module; a format imports the
// root and leaf helpers under internal/ (ones that import nothing of the
// module), never another format; exporters and the async layer import no
// format.
func TestImportGraph(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", "./...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	const mod = "github.com/diskserve/diskserve"
	imports := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		for _, imp := range fields[1:] {
			if imp == mod || strings.HasPrefix(imp, mod+"/") {
				imports[fields[0]] = append(imports[fields[0]], imp)
			}
		}
		if _, ok := imports[fields[0]]; !ok {
			imports[fields[0]] = nil
		}
	}
	// A helper lives under internal/ (the module's or format's) and
	// imports nothing of the module but the root and other helpers.
	var helper func(pkg string) bool
	helper = func(pkg string) bool {
		if !strings.HasPrefix(pkg, mod+"/internal/") && !strings.HasPrefix(pkg, mod+"/format/internal/") {
			return false
		}
		for _, dep := range imports[pkg] {
			if dep != mod && !helper(dep) {
				return false
			}
		}
		return true
	}
	isFormat := func(pkg string) bool {
		return strings.HasPrefix(pkg, mod+"/format/") && !strings.HasPrefix(pkg, mod+"/format/internal/")
	}
	if len(imports) < 10 {
		t.Fatalf("go list found %d packages", len(imports))
	}
	for pkg, deps := range imports {
		for _, dep := range deps {
			switch {
			case pkg == mod:
				t.Errorf("the root imports %s", dep)
			case isFormat(pkg) && dep != mod && !helper(dep):
				t.Errorf("format %s imports %s, which is neither the root nor a helper", pkg, dep)
			case (strings.HasPrefix(pkg, mod+"/export/") || strings.HasPrefix(pkg, mod+"/async")) && (isFormat(dep) || dep == mod+"/format"):
				t.Errorf("%s imports the format %s", pkg, dep)
			}
		}
	}
}
