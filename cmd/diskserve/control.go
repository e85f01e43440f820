package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/diskserve/diskserve/internal/control"
)

func newControlCommand() *cobra.Command {
	var socket, output string
	cmd := &cobra.Command{
		Use:   "control --socket PATH list|overlay|commit|metrics",
		Short: "Talk to a running diskserve serve --control",
		Long: `control is the client of the API that diskserve serve --control unix:PATH
serves: list the exports with their image chains, sizes and attached
clients; put a live overlay on an export (the export moves onto a new
qcow2 overlay whose backing file is its current image, which then stays as
it was at that instant; clients stay attached); commit the top overlay
back into its backing image, live, and delete it; print the Prometheus
metrics.`,
	}
	cmd.PersistentFlags().StringVar(&socket, "socket", "", "the control socket (required)")
	client := func() (*control.Client, error) {
		if socket == "" {
			return nil, errors.New("--socket PATH is required")
		}
		return control.NewClient(strings.TrimPrefix(socket, "unix:")), nil
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "List the exports",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := client()
			if err != nil {
				return err
			}
			exports, err := c.Exports()
			if err != nil {
				return err
			}
			if output == "json" {
				e := json.NewEncoder(os.Stdout)
				e.SetIndent("", "  ")
				return e.Encode(exports)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "EXPORT\tSIZE\tCLIENTS\tCHAIN")
			for _, e := range exports {
				var chain []string
				for _, i := range e.Chain {
					chain = append(chain, i.Path+" ("+i.Format+")")
				}
				fmt.Fprintf(tw, "%q\t%s\t%d\t%s\n", e.Name, humanSize(e.Size), e.Clients, strings.Join(chain, " <- "))
			}
			return tw.Flush()
		},
	}
	list.Flags().StringVar(&output, "output", "human", "human or json")
	var export string
	overlay := &cobra.Command{
		Use:   "overlay [--export NAME] OVERLAY.qcow2",
		Short: "Move an export onto a new overlay, keeping its image as it is now",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := client()
			if err != nil {
				return err
			}
			path, err := filepath.Abs(args[0])
			if err != nil {
				return err
			}
			return c.Overlay(export, path)
		},
	}
	overlay.Flags().StringVarP(&export, "export", "x", "", "the export (default: the default export)")
	metrics := &cobra.Command{
		Use:   "metrics",
		Short: "Print the metrics in Prometheus text format",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := client()
			if err != nil {
				return err
			}
			text, err := c.Metrics()
			fmt.Print(text)
			return err
		},
	}
	var commitExport string
	commit := &cobra.Command{
		Use:   "commit [--export NAME]",
		Short: "Merge an export's top overlay into its backing image, live, and drop it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := client()
			if err != nil {
				return err
			}
			return c.Commit(commitExport)
		},
	}
	commit.Flags().StringVarP(&commitExport, "export", "x", "", "the export (default: the default export)")
	cmd.AddCommand(list, overlay, commit, metrics)
	return cmd
}
