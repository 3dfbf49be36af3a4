package agent

import (
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
)

// staticServices maps the config's services: entries to the agent's.
func staticServices(svcs []config.StaticService) []Service {
	out := make([]Service, 0, len(svcs))
	for _, s := range svcs {
		// Validate has refused any other protocol, so the zero Kind never
		// reaches the gateway.
		kind, _ := protocol.ParseKind(s.Protocol)
		out = append(out, Service{ID: s.Name, Protocol: kind, Port: s.Port, Backend: s.Backend, PublicPort: s.PublicPort, Mode: protocol.ModeTunnel,
			ProxyProtocol: s.ProxyProtocol, Policy: s.SourcePolicy})
	}
	return out
}

// SetStatic replaces the static services (a reloaded config's services:
// list). The agent re-registers its full set; the gateway keeps the
// listeners of services that did not change and the agent keeps serving
// their open connections, so only added, changed and removed services are
// affected.
func (a *Agent) SetStatic(svcs []config.StaticService) {
	next := staticServices(svcs)
	a.mu.Lock()
	a.static = next
	a.notifyLocked()
	a.mu.Unlock()
}
