// Command diskserve opens, inspects and serves virtual disk images.
//
// Run `diskserve --help` for the subcommands. Flags follow qemu-img's where
// the same idea exists: -f FORMAT, --output=human|json.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// version is the release this binary was built from; release builds set it
// with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

func main() {
	if err := newRootCommand().Execute(); err != nil {
		var code exitCode
		if errors.As(err, &code) { // the command has said why
			os.Exit(int(code))
		}
		fmt.Fprintf(os.Stderr, "diskserve: %v\n", err)
		os.Exit(1)
	}
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
	root.AddCommand(newBenchCommand(), newBitmapCommand(), newCacheCommand(), newCheckCommand(), newCompareCommand(), newControlCommand(), newConvertCommand(), newCreateCommand(), newInfoCommand(), newMapCommand(), newMountCommand(), newServeCommand(), newSnapshotCommand(), newBundleCommand())
	return root
}
