package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/diskserve/diskserve/format/sparse"
	"github.com/diskserve/diskserve/format/zstd"
	"github.com/diskserve/diskserve/internal/formatbench"
	"github.com/diskserve/diskserve/internal/testtool"
)

// TestBench measures every format briefly, then checks the JSON report,
// the table, and an SVG drawn from the same report: it renders (to PNG,
// with rsvg-convert) and carries the JSON's figures.
func TestBench(t *testing.T) {
	dir := t.TempDir()
	out := mustRun(t, "bench", "--size", "16M", "--runtime", "150ms", "--qd", "1,4", "--output", "json", "--dir", dir)
	var rep formatbench.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("bench --output json: %v\n%s", err, out)
	}
	if want := len(formatbench.Formats) * 4 * 2; len(rep.Results) != want {
		t.Fatalf("%d results, want %d", len(rep.Results), want)
	}
	for _, r := range rep.Results {
		readOnly := r.Format == sparse.Name || r.Format == zstd.Name
		switch {
		case readOnly && strings.HasSuffix(r.Pattern, "write"):
			if r.Skipped == "" {
				t.Errorf("%s %s was not skipped", r.Format, r.Pattern)
			}
		case r.Skipped != "" || r.Ops == 0 || r.IOPS <= 0 || r.P50us <= 0 || r.P99us < r.P50us || r.P999us < r.P99us:
			t.Errorf("implausible result %+v", r)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("bench left %d entries in --dir", len(entries))
	}

	saved := filepath.Join(dir, "report.json")
	os.WriteFile(saved, []byte(out), 0o644)
	table := mustRun(t, "bench", "--from-json", saved)
	for _, f := range formatbench.Formats {
		if !strings.Contains(table, f) {
			t.Errorf("the table lacks %s:\n%s", f, table)
		}
	}
	svg := mustRun(t, "bench", "--from-json", saved, "--output", "svg")
	bars := regexp.MustCompile(`data-format="([^"]+)" data-pattern="([^"]+)" data-qd="(\d+)" data-value="([^"]+)"`).FindAllStringSubmatch(svg, -1)
	values := map[string]string{}
	for _, m := range bars {
		values[m[1]+"/"+m[2]+"/"+m[3]] = m[4]
	}
	measured := 0
	for _, r := range rep.Results {
		if r.Skipped != "" {
			continue
		}
		measured++
		v, _ := formatbench.Value(r)
		key := r.Format + "/" + r.Pattern + "/" + strconv.Itoa(r.QueueDep)
		if got, want := values[key], formatbench.Label(v); got != want {
			t.Errorf("SVG bar %s is %q, JSON says %q", key, got, want)
		}
	}
	if len(bars) != measured {
		t.Errorf("%d bars for %d measurements", len(bars), measured)
	}
	svgPath, png := filepath.Join(dir, "chart.svg"), filepath.Join(dir, "chart.png")
	os.WriteFile(svgPath, []byte(svg), 0o644)
	testtool.Run(t, "rsvg-convert", "-o", png, svgPath)
	if b, err := os.ReadFile(png); err != nil || len(b) < 1000 || string(b[1:4]) != "PNG" {
		t.Fatalf("rsvg-convert made no PNG: %v, %d bytes", err, len(b))
	}
	html := mustRun(t, "bench", "--from-json", saved, "--output", "html")
	if !strings.Contains(html, "<svg") || !strings.Contains(html, "<pre>") {
		t.Error("the HTML page lacks the chart or the table")
	}
	for _, via := range []string{"nbd", "fuse"} {
		t.Run("via-"+via, func(t *testing.T) {
			if via == "fuse" {
				testtool.Need(t, "fusermount3")
			}
			out := mustRun(t, "bench", "-f", "qcow2,zstd", "--size", "8M", "--runtime", "100ms", "--qd", "4", "--via", via, "--output", "json", "--dir", t.TempDir())
			var rep formatbench.Report
			if err := json.Unmarshal([]byte(out), &rep); err != nil || rep.Via != via || len(rep.Results) != 2*4 {
				t.Fatalf("bench --via %s: %v\n%s", via, err, out)
			}
			for _, r := range rep.Results {
				if r.Skipped == "" && (r.Ops == 0 || r.IOPS <= 0) {
					t.Errorf("implausible result %+v", r)
				}
			}
		})
	}
	if _, stderr, code := run(t, nil, "bench", "-f", "qed"); code == 0 || !strings.Contains(stderr, `unknown format "qed"`) {
		t.Errorf("bench -f qed: exit %d, %s", code, stderr)
	}
}
