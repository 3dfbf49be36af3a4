package gateway

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/tunnel"
)

// agentState is one agent identity: its live session (at most one) and the
// public services it registered. It outlives sessions, so a reconnect
// finds its services' ports again. It is data: the gateway's methods
// (register, detach, shutdownAgent, withdraw) act on it under its mu.
type agentState struct {
	name        string
	maxServices int

	// sess is the live session. It is written under mu (so that attach,
	// detach and register agree on which session is live) and read
	// without it: the per-connection and per-datagram paths must never
	// wait for a registration.
	sess atomic.Pointer[tunnel.Session]

	mu       sync.Mutex
	remote   string
	since    time.Time
	services map[protocol.ServiceKey]publicService
}

func newAgentState(name string, maxServices int) *agentState {
	return &agentState{name: name, maxServices: maxServices, services: map[protocol.ServiceKey]publicService{}}
}

// attach makes s the agent's live session and returns the one it replaces.
func (a *agentState) attach(s *tunnel.Session, remote string) *tunnel.Session {
	a.mu.Lock()
	defer a.mu.Unlock()
	old := a.sess.Swap(s)
	a.remote, a.since = remote, time.Now()
	return old
}

// session returns the live session, or nil. It takes no lock.
func (a *agentState) session() *tunnel.Session { return a.sess.Load() }

// detach forgets s if it is still a's live session, closing the agent's
// public services (their ports stay allocated for a reconnect). It reports
// whether s was the live session.
func (g *Gateway) detach(a *agentState, s *tunnel.Session) bool {
	a.mu.Lock()
	if !a.sess.CompareAndSwap(s, nil) {
		a.mu.Unlock()
		return false
	}
	withdrawn := g.withdraw(a, nil)
	a.mu.Unlock()
	g.afterWithdraw(a.name, withdrawn)
	return true
}

// shutdownAgent ends a's session and closes its public services (gateway
// shutdown).
func (g *Gateway) shutdownAgent(a *agentState) {
	a.mu.Lock()
	s := a.sess.Swap(nil)
	withdrawn := g.withdraw(a, nil)
	a.mu.Unlock()
	if s != nil {
		s.CloseWithError(protocol.CodeShutdown, "gateway shutting down")
	}
	g.afterWithdraw(a.name, withdrawn)
}

// withdraw forgets a's services whose keys are not in keep (every service
// when keep is nil), keeping their ports retained, and returns them. The
// caller holds a.mu, and closes the returned services after unlocking
// (afterWithdraw).
func (g *Gateway) withdraw(a *agentState, keep map[protocol.ServiceKey]bool) []publicService {
	var out []publicService
	for k, ps := range a.services {
		if keep[k] {
			continue
		}
		g.ports.retain(a.name, k)
		delete(a.services, k)
		out = append(out, ps)
	}
	return out
}

// register reconciles the agent's public services with its full desired
// set: new services get a port and a socket, changed ones are updated,
// absent ones are withdrawn. Each service gets an endpoint or an error.
//
// Under a.mu it decides, allocates (ports.mu is taken inside) and opens
// the new services; closing replaced and withdrawn services (which takes
// a UDP port's udpSessions.mu) and forgetting their metrics happen after
// unlocking.
func (g *Gateway) register(a *agentState, sess *tunnel.Session, reg *protocol.Register) *protocol.RegisterAck {
	ack := &protocol.RegisterAck{Seq: reg.Seq, Endpoints: make([]protocol.Endpoint, len(reg.Services))}
	a.mu.Lock()
	if a.sess.Load() != sess {
		a.mu.Unlock()
		for i, s := range reg.Services {
			ack.Endpoints[i] = protocol.Endpoint{ID: s.ID, Protocol: s.Protocol, Error: "session replaced"}
		}
		return ack
	}
	keep := map[protocol.ServiceKey]bool{}
	var opened []string
	var replaced []publicService
	var moveFailed []string
	failed := 0
	for i := range reg.Services {
		svc := reg.Services[i]
		ep := &ack.Endpoints[i]
		*ep = protocol.Endpoint{ID: svc.ID, Protocol: svc.Protocol}
		if i >= a.maxServices {
			ep.Error = fmt.Sprintf("over this agent's quota of %d services (gateway max_services)", a.maxServices)
			failed++
			continue
		}
		key := svc.Key()
		keep[key] = true
		old := a.services[key]
		if old != nil && (svc.PublicPort == 0 || svc.PublicPort == old.base().port) {
			keepService(old, &svc, ep)
			continue
		}
		// New, or its requested public port changed. The old socket
		// stays open until the new one is bound: on failure the service
		// keeps its old port and allocation.
		ps, err := g.openService(a, &svc)
		if err != nil {
			if old != nil {
				keepService(old, &svc, ep)
				moveFailed = append(moveFailed, fmt.Sprintf("%s: %v", key, err))
				continue
			}
			ep.Error = err.Error()
			failed++
			continue
		}
		if old != nil {
			replaced = append(replaced, old)
		}
		a.services[key] = ps
		b := ps.base()
		ep.PublicPort, ep.Address = b.port, b.endpoint
		opened = append(opened, key.String()+"="+b.endpoint)
	}
	withdrawn := g.withdraw(a, keep)
	a.mu.Unlock()
	for _, ps := range replaced {
		ps.close()
	}
	g.afterWithdraw(a.name, withdrawn)
	if len(opened) > 0 || len(withdrawn) > 0 {
		g.saveState()
	}
	g.countServices()
	g.log.Info("agent registered services", "agent", a.name, "services", len(reg.Services),
		"opened", opened, "withdrawn", len(withdrawn), "failed", failed)
	for _, m := range moveFailed {
		g.log.Warn("public_port change failed; service kept on its old port", "agent", a.name, "reason", m)
	}
	for _, ep := range ack.Endpoints {
		if ep.Error != "" {
			g.log.Warn("service not exposed", "agent", a.name, "service", ep.ID, "protocol", ep.Protocol, "reason", ep.Error)
		}
	}
	return ack
}

// keepService updates a service that keeps its port to svc, its latest
// spec, and answers with its endpoint.
func keepService(ps publicService, svc *protocol.Service, ep *protocol.Endpoint) {
	b := ps.base()
	b.spec.Store(svc)
	ep.PublicPort, ep.Address = b.port, b.endpoint
}

// afterWithdraw closes withdrawn services and forgets their metrics. It is
// called with no lock held.
func (g *Gateway) afterWithdraw(agent string, withdrawn []publicService) {
	for _, ps := range withdrawn {
		ps.close()
		g.metrics.ForgetService(agent, ps.base().key.ID)
	}
	if len(withdrawn) > 0 {
		g.saveState()
		g.countServices()
	}
}

func (g *Gateway) saveState() {
	if err := g.ports.save(context.Background()); err != nil {
		g.log.Error("saving port allocations", "err", err)
	}
	g.metrics.PortAllocations.Set(float64(g.ports.count()))
}

// refreshState saves the allocations while any is live: a save stamps live
// allocations with its time. Without it, a gateway that ran for longer than
// port_retention without a change and then crashed would come back with
// stamps old enough to expire the ports of every agent that had not
// reconnected yet.
func (g *Gateway) refreshState() {
	if g.ports.hasLive() {
		g.saveState()
	}
}

// every calls f every d until the gateway closes, in a goroutine of the
// gateway's wait group.
func (g *Gateway) every(d time.Duration, f func()) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-g.done:
				return
			case <-t.C:
				f()
			}
		}
	}()
}

// stateRefreshInterval is a 24th of port_retention, between a minute and
// an hour: stamps never lag by more than that.
func stateRefreshInterval(retention time.Duration) time.Duration {
	return min(max(retention/24, time.Minute), time.Hour)
}

// countServices sets the services gauge. Concurrent calls are coalesced
// (Gateway.counts): it walks every agent.
func (g *Gateway) countServices() {
	g.counts.do(func() error {
		g.countServicesNow()
		return nil
	})
}

func (g *Gateway) countServicesNow() {
	var tcp, udp int
	for _, a := range g.agentList() {
		a.mu.Lock()
		for k := range a.services {
			if k.Kind == protocol.KindUDP {
				udp++
			} else {
				tcp++
			}
		}
		a.mu.Unlock()
	}
	g.metrics.Services.WithLabelValues(protocol.KindTCP.String()).Set(float64(tcp))
	g.metrics.Services.WithLabelValues(protocol.KindUDP.String()).Set(float64(udp))
}
