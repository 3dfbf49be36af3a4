// Package testgateway runs a real portway gateway inside the test process,
// on loopback, for the tests of what talks to it: the agent, the CLI, the
// end-to-end suite and the bench. For tests only.
package testgateway

import (
	"context"
	"testing"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/gateway"
	"github.com/portway/portway/internal/tunnel"
)

// Config returns a gateway configuration for a test: the tunnel listener
// on a free port of 127.0.0.1, public ports bound to and announced as
// 127.0.0.1, plain WebSocket (no TLS), the port state in a temporary
// directory, and agents allowed. The test adjusts the rest before Start.
func Config(t testing.TB, agents ...config.AgentIdentity) *config.GatewayFile {
	t.Helper()
	cfg := config.DefaultGateway()
	cfg.Listen = "127.0.0.1:0"
	cfg.PublicHost = "127.0.0.1"
	cfg.BindAddress = "127.0.0.1"
	cfg.StateFile = t.TempDir() + "/gateway.db"
	cfg.Insecure = true
	cfg.Agents = agents
	return cfg
}

// Start creates and starts a gateway from opts, failing the test when it
// cannot, and closes it when the test ends.
func Start(t testing.TB, opts gateway.Options) *gateway.Gateway {
	t.Helper()
	g, err := gateway.New(opts)
	if err != nil {
		t.Fatalf("testgateway: %v", err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatalf("testgateway: starting: %v", err)
	}
	t.Cleanup(g.Close)
	return g
}

// URL is the address an agent dials to reach g's tunnel listener.
func URL(g *gateway.Gateway) string { return "ws://" + g.TunnelAddr().String() + tunnel.Path }
