package cli

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/portway/portway/internal/config"
)

// TestDiscoveryWanted: discovery runs only with kubernetes.enabled,
// tunnels.enabled and at least one protocol's discovery enabled, and says
// why when the tunnels: block turns it off.
func TestDiscoveryWanted(t *testing.T) {
	cases := []struct {
		name string
		edit func(*config.AgentFile)
		want bool
		log  string
	}{
		{"kubernetes off", func(c *config.AgentFile) { c.Kubernetes.Enabled = false }, false, ""},
		{"all on", func(*config.AgentFile) {}, true, ""},
		{"tunnels off", func(c *config.AgentFile) { c.Tunnels.Enabled = false }, false, "tunnels.enabled is false"},
		{"both protocols off", func(c *config.AgentFile) {
			c.Tunnels.Discovery.TCP.Enabled = false
			c.Tunnels.Discovery.UDP.Enabled = false
		}, false, "tunnels.discovery.tcp.enabled and tunnels.discovery.udp.enabled are false"},
		{"udp only", func(c *config.AgentFile) { c.Tunnels.Discovery.TCP.Enabled = false }, true, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := config.DefaultAgent()
			cfg.Kubernetes.Enabled = true
			c.edit(cfg)
			var buf bytes.Buffer
			got := discoveryWanted(cfg, slog.New(slog.NewTextHandler(&buf, nil)))
			if got != c.want {
				t.Errorf("discoveryWanted = %v, want %v", got, c.want)
			}
			if c.log == "" && buf.Len() > 0 || !strings.Contains(buf.String(), c.log) {
				t.Errorf("log %q, want it to say %q", buf.String(), c.log)
			}
		})
	}
}
