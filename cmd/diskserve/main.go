// Command diskserve opens, inspects and serves virtual disk images.
//
// Run `diskserve --help` for the subcommands. Flags follow qemu-img's where
// the same idea exists: -f FORMAT, --output=human|json.
package main

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/spf13/cobra"
)

// version is the release this binary was built from; release builds set it
// with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

func main() {
	root := newRootCommand()
	root.SetArgs(negativeSize(os.Args[1:]))
	if err := root.Execute(); err != nil {
		var code exitCode
		if errors.As(err, &code) { // the command has said why
			os.Exit(int(code))
		}
		fmt.Fprintf(os.Stderr, "diskserve: %v\n", err)
		os.Exit(1)
	}
}

// negativeSize lets `resize IMAGE -1G` shrink by 1G, as qemu-img takes
// it, rather than read -1G as flags: it puts "--" before a last argument
// of resize that is a minus sign and a digit.
func negativeSize(args []string) []string {
	n := len(args)
	if n < 2 || args[0] != "resize" || slices.Contains(args, "--") {
		return args
	}
	if last := args[n-1]; len(last) > 1 && last[0] == '-' && last[1] >= '0' && last[1] <= '9' {
		return append(args[:n-1:n-1], "--", last)
	}
	return args
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "diskserve",
		Short: "Open, inspect and serve virtual disk images",
		Long: `diskserve opens virtual disk images (raw, qcow2, crosvm composite,
Android sparse and seekable zstd), reports on them, converts them, serves
them over NBD and mounts them as files through FUSE.`,
		Version:       version,
		SilenceUsage:  true, // errors are one line; --help shows usage
		SilenceErrors: true, // main prints them
	}
	root.CompletionOptions.DisableDefaultCmd = true
	root.AddCommand(newAmendCommand(), newBenchCommand(), newBitmapCommand(), newCacheCommand(), newCheckCommand(), newCommitCommand(), newCompareCommand(), newControlCommand(), newConvertCommand(), newCreateCommand(), newInfoCommand(), newMeasureCommand(), newRebaseCommand(), newResizeCommand(), newMapCommand(), newMountCommand(), newServeCommand(), newSnapshotCommand(), newBundleCommand())
	return root
}
