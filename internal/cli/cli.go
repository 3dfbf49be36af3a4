// Package cli implements the portway command line: gateway, agent, up,
// status, bench and version. Each command parses flags, builds the parts
// from internal packages and runs them until interrupted.
package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/spf13/cobra"
)

// app carries what every command needs.
type app struct {
	version   string
	stdout    io.Writer
	stderr    io.Writer
	getenv    func(string) string
	logLevel  string
	logFormat string
	// level is the loggers' level: --log-level, or a config file's
	// log_level, which a reload may change.
	level slog.LevelVar
}

// Main runs the portway command line until ctx ends and returns the process
// exit code.
func Main(ctx context.Context, args []string, version string, stdout, stderr io.Writer) int {
	a := &app{version: version, stdout: stdout, stderr: stderr, getenv: os.Getenv}
	root := &cobra.Command{
		Use:           "portway",
		Short:         "Reach TCP and UDP services in a private cluster through public ports of a gateway",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&a.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	root.PersistentFlags().StringVar(&a.logFormat, "log-format", "text", "log format: text or json")
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(a.gatewayCmd(), a.agentCmd(), a.upCmd(), a.statusCmd(), a.benchCmd(), a.benchRelayCmd(), a.benchEchoCmd(), a.versionCmd())

	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(stderr, "portway:", err)
		return 1
	}
	return 0
}

func (a *app) logger() (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(a.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %q is not debug, info, warn or error", a.logLevel)
	}
	a.level.Set(level)
	opts := &slog.HandlerOptions{Level: &a.level}
	switch strings.ToLower(a.logFormat) {
	case "text":
		return slog.New(slog.NewTextHandler(a.stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(a.stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format: %q is not text or json", a.logFormat)
}

// registry returns a metrics registry with the Go runtime and process
// collectors, for a gateway or agent run from the command line.
func registry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

func (a *app) versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintln(a.stdout, "portway", a.version)
			return nil
		},
	}
}
