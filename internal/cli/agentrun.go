package cli

import (
	"context"
	"log/slog"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
)

// runAgent runs the agent, with Kubernetes discovery feeding it when
// kubernetes.enabled is set.
func runAgent(ctx context.Context, ag *agent.Agent, cfg *config.AgentFile, log *slog.Logger) error {
	return ag.Run(ctx)
}
