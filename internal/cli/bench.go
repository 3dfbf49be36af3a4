package cli

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/portway/portway/internal/bench"
)

func (a *app) benchCmd() *cobra.Command {
	var o bench.Options
	var only []string
	var jsonOut bool
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure the tunnel against the direct path and a plain relay, on loopback",
		Long: `Measure the tunnel against the direct path and a plain one-hop relay, on loopback.

The bench starts a sink and an echo server in this process, and a gateway
and an agent as child processes of this binary (the relay-process path's
relay and the idle case's echo server are children too). It then measures,
alternating the paths in each run: throughput on 1 and 8 streams, 1-byte
round trips on one connection (with p50/p99 latency), new connections per
second, and the peak RSS and CPU time of the gateway and the agent. Then one
yamux stream through 20 ms of added round-trip time, the RSS cost of
10,000 idle tunneled connections, and 10,000 simulated agents on one gateway
(memory and heartbeat CPU per agent, registration rate, and a reconnect
storm). docs/benchmarks.md explains every figure.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := a.logger()
			if err != nil {
				return err
			}
			// Zero means "the default" to bench.Run; on the command
			// line it can only be a mistake.
			if o.Runs < 1 || o.Duration <= 0 || o.IdleConns < 1 {
				return fmt.Errorf("--runs, --duration and --idle-conns must be positive")
			}
			if len(only) == 1 && only[0] == "agents" {
				o.AgentsOnly = true
			} else if o.Paths, err = bench.ParsePaths(only); err != nil {
				return err
			}
			exe, err := os.Executable()
			if err != nil {
				return fmt.Errorf("bench: finding the portway binary to run the gateway and agent: %w", err)
			}
			o.Exec = bench.Exec{Path: exe}
			o.Logger = log
			rep, err := bench.Run(cmd.Context(), o)
			if err != nil {
				return err
			}
			if jsonOut {
				enc := json.NewEncoder(a.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(rep)
			}
			return rep.WriteTable(a.stdout)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.Runs, "runs", bench.DefaultRuns, "times each path is measured; the median and the spread are reported")
	f.DurationVar(&o.Duration, "duration", bench.DefaultDuration, "length of each measurement")
	f.StringSliceVar(&only, "only", nil, "measure only these paths: direct, relay, relay-process, yamux, wss, json, forwarded (repeatable or comma-separated)")
	f.BoolVar(&jsonOut, "json", false, "print one JSON object instead of the table")
	f.BoolVar(&o.SkipRTT, "skip-rtt", false, "leave out the 20 ms RTT case")
	f.BoolVar(&o.SkipIdle, "skip-idle", false, "leave out the idle connections case")
	f.IntVar(&o.IdleConns, "idle-conns", bench.DefaultIdleConns, "idle connections held in the memory-at-scale case")
	f.BoolVar(&o.SkipAgents, "skip-agents", false, "leave out the many-agents case (--only agents runs it alone)")
	f.IntVar(&o.Agents, "agents", bench.DefaultAgents, "simulated agents in the many-agents case")
	f.StringVar(&o.AgentsProtocol, "agents-protocol", "yamux", "tunnel mode of the simulated agents: yamux or json")
	return cmd
}

// benchAgentsCmd is the child process that simulates the many-agents
// case's agents.
func (a *app) benchAgentsCmd() *cobra.Command {
	var o bench.SimOptions
	cmd := &cobra.Command{
		Use:    "bench-agents",
		Short:  "The simulated agents of portway bench's many-agents case, as a process of their own",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return bench.ServeAgents(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.URL, "url", "", "the gateway's tunnel URL")
	f.StringVar(&o.Tokens, "tokens", "", `file of "name token" lines, one agent each`)
	f.StringVar(&o.Backend, "backend", "", "where every agent's service forwards")
	f.StringVar(&o.Control, "control", "", "where the control API listens")
	f.IntVar(&o.StartWorkers, "workers", 64, "agents connecting at once in the cold start")
	f.StringVar(&o.Protocol, "protocol", "yamux", "tunnel mode: yamux or json")
	return cmd
}

// benchRelayCmd is the child process of the bench's relay-process path.
func (a *app) benchRelayCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "bench-relay LISTEN=TARGET...",
		Short:  "The reference relay of portway bench, as a process of its own",
		Hidden: true,
		Args:   cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return bench.ServeRelays(cmd.Context(), args)
		},
	}
}

// benchEchoCmd is the child process that holds the backend side of the
// bench's idle connections.
func (a *app) benchEchoCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "bench-echo LISTEN",
		Short:  "The echo backend of portway bench's idle connections, as a process of its own",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return bench.ServeEcho(cmd.Context(), args[0])
		},
	}
}
