//go:build nokubernetes

package cli

import (
	"context"
	"strings"
	"testing"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
)

// A build without the Kubernetes libraries says so when asked for
// discovery, naming the key.
func TestNoKubernetesBuild(t *testing.T) {
	cfg := config.DefaultAgent()
	cfg.Gateway = config.GatewayConn{URL: "ws://127.0.0.1:1/v1/tunnel", Token: "t", Protocol: "auto"}
	cfg.Kubernetes.Enabled = true
	err := runAgent(context.Background(), agent.Options{Config: cfg}, func(string) string { return "" })
	if err == nil || !strings.Contains(err.Error(), "kubernetes.enabled") || !strings.Contains(err.Error(), "nokubernetes") {
		t.Fatalf("err = %v", err)
	}
}
