//go:build !nokubernetes

package cli

import (
	"context"

	"golang.org/x/sync/errgroup"
	"k8s.io/klog/v2"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/discovery"
)

// runWithDiscovery runs the agent with Kubernetes discovery feeding it.
func runWithDiscovery(ctx context.Context, opts agent.Options, getenv func(string) string, onAgent func(*agent.Agent)) error {
	cfg, log := opts.Config, opts.Logger
	restCfg, source, err := discovery.RESTConfig(cfg.Kubernetes.Kubeconfig, getenv)
	if err != nil {
		return err
	}
	// Managed Gateways live, by default, in the agent's own namespace.
	var namespace string
	if len(cfg.Tunnels.Discovery.GatewayNamespaces) == 0 {
		ns, nsSource, err := discovery.AgentNamespace(getenv)
		if err != nil {
			return err
		}
		log.Info("managed Gateways confined to the agent's namespace", "namespace", ns, "from", nsSource)
		namespace = ns
	}
	// client-go logs through klog (informer retries, for one); send it to
	// the agent's log so that it has one format.
	klog.SetSlogLogger(log.With("component", "client-go"))
	log.Info("Kubernetes discovery enabled", "api", restCfg.Host, "config", source)

	// The agent reports endpoints to discovery, which is built after it;
	// the agent calls OnEndpoints only once Run has started.
	var d *discovery.Discoverer
	opts.OnEndpoints = func(eps []agent.Endpoint) { d.SetEndpoints(discoveryEndpoints(eps)) }
	ag, err := agent.New(opts)
	if err != nil {
		return err
	}
	if onAgent != nil {
		onAgent(ag)
	}
	m := ag.Metrics()
	d, err = discovery.New(discovery.Options{
		Namespace:  namespace,
		Config:     restCfg,
		Tunnels:    cfg.Tunnels,
		Logger:     log,
		Publish:    func(svcs []discovery.Service) { ag.SetDiscovered(agentServices(svcs)) },
		Discovered: m.Discovered,
		Syncs:      m.Syncs,
	})
	if err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return ag.Run(gctx) })
	g.Go(func() error { return d.Run(gctx) })
	return g.Wait()
}

// agentServices maps discovered services to the agent's.
func agentServices(svcs []discovery.Service) []agent.Service {
	out := make([]agent.Service, len(svcs))
	for i, s := range svcs {
		out[i] = agent.Service{
			ID: s.ID, Protocol: s.Protocol, Port: s.Port, Backend: s.Backend,
			IdleTimeout: s.IdleTimeout, Mode: s.Mode,
			ProxyProtocol: s.ProxyProtocol, Policy: s.Policy,
		}
	}
	return out
}

// discoveryEndpoints maps the agent's endpoints back for the write-back.
func discoveryEndpoints(eps []agent.Endpoint) []discovery.Endpoint {
	out := make([]discovery.Endpoint, len(eps))
	for i, e := range eps {
		out[i] = discovery.Endpoint{ID: e.Service.ID, Protocol: e.Service.Protocol, Address: e.Address, Error: e.Error}
	}
	return out
}
