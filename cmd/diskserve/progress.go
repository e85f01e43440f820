package main

import (
	"os"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// newProgress returns what a command tells the bytes it has covered of
// total, drawing a bar named what on standard error when show is set and
// standard error is a terminal (nil otherwise), and the function that
// ends the bar.
func newProgress(show bool, total int64, what string) (progress func(int64), done func()) {
	if !show || !term.IsTerminal(int(os.Stderr.Fd())) {
		return nil, func() {}
	}
	bar := progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionSetDescription(what),
		progressbar.OptionShowBytes(true),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionFullWidth(),
		progressbar.OptionClearOnFinish())
	return func(n int64) { bar.Add64(n) }, func() { bar.Finish() }
}
