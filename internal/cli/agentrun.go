package cli

import (
	"context"
	"log/slog"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
)

// runAgent builds the agent from opts and runs it until ctx ends, with
// Kubernetes discovery feeding it when kubernetes.enabled and
// tunnels.enabled are both set. getenv reads KUBECONFIG.
func runAgent(ctx context.Context, opts agent.Options, getenv func(string) string) error {
	return runAgentWith(ctx, opts, getenv, nil)
}

// runAgentWith is runAgent that passes the agent, once built, to onAgent
// (when not nil), which may then reload its static services.
func runAgentWith(ctx context.Context, opts agent.Options, getenv func(string) string, onAgent func(*agent.Agent)) error {
	cfg := opts.Config
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
		opts.Logger = log
	}
	if !discoveryWanted(cfg, log) {
		ag, err := agent.New(opts)
		if err != nil {
			return err
		}
		if onAgent != nil {
			onAgent(ag)
		}
		return ag.Run(ctx)
	}
	return runWithDiscovery(ctx, opts, getenv, onAgent)
}

// discoveryWanted reports whether to run Kubernetes discovery, logging why
// not when kubernetes.enabled is set but the tunnels: block turns it off.
func discoveryWanted(cfg *config.AgentFile, log *slog.Logger) bool {
	if !cfg.Kubernetes.Enabled {
		return false
	}
	t := cfg.Tunnels
	switch {
	case !t.Enabled:
		log.Info("Kubernetes discovery off: tunnels.enabled is false")
		return false
	case !t.Discovery.TCP.Enabled && !t.Discovery.UDP.Enabled:
		log.Info("Kubernetes discovery off: tunnels.discovery.tcp.enabled and tunnels.discovery.udp.enabled are false")
		return false
	}
	return true
}
