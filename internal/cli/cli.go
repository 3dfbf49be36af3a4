// Package cli implements the portway command line: gateway, agent, up,
// status, bench, token and version. Each command parses flags, builds the parts
// from internal packages and runs them until interrupted.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/spf13/cobra"

	"github.com/portway/portway/internal/agent"
)

// app carries what every command needs.
type app struct {
	version   string
	build     Build
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
	return MainBuild(ctx, args, Build{Version: version}, stdout, stderr)
}

// MainBuild is Main for a binary that knows more about its build than its
// version (scripts/release.sh stamps the commit too).
func MainBuild(ctx context.Context, args []string, build Build, stdout, stderr io.Writer) int {
	build = build.fill()
	a := &app{version: build.Version, build: build, stdout: stdout, stderr: stderr, getenv: os.Getenv}
	root := &cobra.Command{
		Use:           "portway",
		Short:         "Reach TCP and UDP services in a private cluster through public ports of a gateway",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
	}
	// --version prints what `portway version` does. It is a flag of our
	// own, not cobra's Version: that prints through text/template, whose
	// calls of methods by name keep the linker from dropping any unused
	// method, which cost 30 MB of binary and 10 MiB of RSS.
	var showVersion bool
	root.Flags().BoolVar(&showVersion, "version", false, "print the version, commit, Go version and build tags")
	root.RunE = func(cmd *cobra.Command, _ []string) error {
		if showVersion {
			fmt.Fprint(a.stdout, build.String())
			return nil
		}
		return cmd.Help()
	}
	root.PersistentFlags().StringVar(&a.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	root.PersistentFlags().StringVar(&a.logFormat, "log-format", "text", "log format: text or json")
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(a.gatewayCmd(), a.agentCmd(), a.upCmd(), a.statusCmd(), a.benchCmd(), a.benchRelayCmd(), a.benchEchoCmd(), a.benchAgentsCmd(), a.versionCmd(), a.tokenCmd())

	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(stderr, "portway:", err)
		if errors.Is(err, agent.ErrAuthRejected) {
			return agent.AuthExitCode
		}
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
