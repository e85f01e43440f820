package formatbench

import (
	"encoding/json"
	"fmt"
	"html"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
)

// Value is the figure a chart shows for r: IOPS for random patterns,
// MiB/s for sequential ones.
func Value(r Result) (v float64, unit string) {
	if strings.HasPrefix(r.Pattern, "rand") {
		return r.IOPS, "IOPS"
	}
	return r.MiBps, "MiB/s"
}

// WriteTable writes the report as an aligned text table, one row per
// pattern and depth, one column group per format.
func WriteTable(w io.Writer, rep *Report) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "pattern\tqd\tformat\tMiB/s\tIOPS\tp50 µs\tp99 µs\tp99.9 µs\t\n")
	for _, r := range rep.Results {
		if r.Skipped != "" {
			fmt.Fprintf(tw, "%s\t%d\t%s\t-\t-\t-\t-\t-\t\tskipped: %s\n", r.Pattern, r.QueueDep, r.Format, r.Skipped)
			continue
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%.1f\t%.0f\t%.1f\t%.1f\t%.1f\t\n", r.Pattern, r.QueueDep, r.Format, r.MiBps, r.IOPS, r.P50us, r.P99us, r.P999us)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "\n%d-byte images, %g s per run, %s engine, via %s. Ratios between formats are what to compare; absolute figures move with the machine's load.\n", rep.Size, rep.Runtime, rep.Engine, rep.Via)
	return err
}

// WriteJSON writes the report as indented JSON.
func WriteJSON(w io.Writer, rep *Report) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(rep)
}

// palette colours the formats in charts, in the order of Formats.
var palette = []string{"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f"}

// WriteSVG draws a grouped bar chart: one group per pattern and depth, one
// bar per format, each group scaled to its own largest bar (random
// patterns in IOPS, sequential ones in MiB/s), every bar labelled with its
// value. Each bar carries data-format, data-pattern, data-qd and
// data-value attributes, so tools can read the figures back.
func WriteSVG(w io.Writer, rep *Report) error {
	type group struct {
		pattern string
		qd      int
		bars    []Result
	}
	var order []*group // by pattern and depth, in the order first seen
	byKey := map[string]*group{}
	var formats []string
	for _, r := range rep.Results {
		k := fmt.Sprintf("%s/%d", r.Pattern, r.QueueDep)
		if byKey[k] == nil {
			byKey[k] = &group{pattern: r.Pattern, qd: r.QueueDep}
			order = append(order, byKey[k])
		}
		byKey[k].bars = append(byKey[k].bars, r)
		if !slices.Contains(formats, r.Format) {
			formats = append(formats, r.Format)
		}
	}
	const (
		barW, gap, chartH, top, labelH = 34, 28, 220, 40, 60
	)
	groupW := len(formats)*barW + gap
	width := max(560, 60+len(order)*groupW)
	height := top + chartH + labelH + 24*((len(formats)+3)/4) + 20
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="11">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="20" y="22" font-size="15" font-weight="bold">diskserve bench: %s engine, via %s, %d MiB images, %g s per run (random: IOPS, sequential: MiB/s)</text>`+"\n", html.EscapeString(rep.Engine), html.EscapeString(rep.Via), rep.Size>>20, rep.Runtime)
	base := top + chartH
	fmt.Fprintf(&b, `<line x1="40" y1="%d" x2="%d" y2="%d" stroke="#333"/>`+"\n", base, width-10, base)
	for gi, g := range order {
		x0 := 50 + gi*groupW
		var top float64
		for _, r := range g.bars {
			if v, _ := Value(r); v > top {
				top = v
			}
		}
		for _, r := range g.bars {
			fi := slices.Index(formats, r.Format)
			x := x0 + fi*barW
			v, unit := Value(r)
			if r.Skipped != "" {
				fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle" fill="#999">n/a</text>`+"\n", x+barW/2-2, base-4)
				continue
			}
			h := 0
			if top > 0 {
				h = int(v / top * float64(chartH-20))
			}
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="%s" data-format="%s" data-pattern="%s" data-qd="%d" data-value="%s"><title>%s %s qd%d: %s %s</title></rect>`+"\n",
				x, base-h, barW-4, h, colour(r.Format), r.Format, r.Pattern, r.QueueDep, Label(v), r.Format, r.Pattern, r.QueueDep, Label(v), unit)
			fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle" font-size="9">%s</text>`+"\n", x+barW/2-2, base-h-3, Label(v))
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle" font-weight="bold">%s</text>`+"\n", x0+len(formats)*barW/2, base+16, g.pattern)
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">QD %d</text>`+"\n", x0+len(formats)*barW/2, base+30, g.qd)
	}
	for i, f := range formats {
		x, y := 40+(i%4)*150, base+labelH+(i/4)*24
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="14" height="14" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n", x, y, colour(f), x+20, y+11, html.EscapeString(f))
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// Label formats a figure as charts show it: whole numbers from 100 up,
// one decimal below.
func Label(v float64) string {
	if v >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

// WriteHTML writes a page with the chart and the table.
func WriteHTML(w io.Writer, rep *Report) error {
	var svg, table strings.Builder
	if err := WriteSVG(&svg, rep); err != nil {
		return err
	}
	if err := WriteTable(&table, rep); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>diskserve bench</title></head>\n<body>\n%s<pre>%s</pre>\n</body></html>\n", svg.String(), html.EscapeString(table.String()))
	return err
}

// colour is the colour of format f in charts.
func colour(f string) string {
	return palette[max(0, slices.Index(Formats, f))%len(palette)]
}
