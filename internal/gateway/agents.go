package gateway

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/tunnel"
)

// agentState is one agent identity: its live instances (agent processes,
// each with one session) and the public services they registered. It
// outlives sessions, so a reconnect finds its services' ports again. It is
// data: the gateway's methods (register, detach, shutdownAgent, withdraw)
// act on it under its mu.
type agentState struct {
	name        string
	maxServices int

	// live counts the instances, written under mu and read without it
	// (the connected-agents gauge).
	live atomic.Int64

	// regMu serialises the agent's registrations (of every instance) from
	// end to end, including the allocation store calls and binds made
	// without mu, so that two sessions of one agent never allocate for it
	// at once.
	regMu sync.Mutex

	mu sync.Mutex
	// instances are the live instances by instance id. A session of an
	// instance already here replaces the older one's session.
	instances map[string]*instance
	services  map[protocol.ServiceKey]publicService
}

// instance is one live agent process of an identity: its session, and the
// services it carries. Its fields other than active are written under
// agentState.mu; the connection and datagram paths read only sess (fixed
// at creation) and active.
type instance struct {
	id     string
	sess   *tunnel.Session
	remote string
	since  time.Time
	// active counts the connections and UDP sessions sent to it that
	// have not ended: new ones go to the instance with the fewest.
	active atomic.Int64
	// held are the services whose holders include it.
	held map[protocol.ServiceKey]bool
	// warned are the services refused for a conflicting definition (and
	// logged, once).
	warned map[protocol.ServiceKey]bool
	// retry is signalled when a service this instance was refused for a
	// conflict has been withdrawn (its other instances left): the
	// session's goroutine runs its last registration again, so the
	// service becomes this instance's without waiting for the agent to
	// register anew. Capacity 1, sent to without blocking.
	retry chan struct{}
}

func newAgentState(name string, maxServices int) *agentState {
	return &agentState{name: name, maxServices: maxServices,
		instances: map[string]*instance{}, services: map[protocol.ServiceKey]publicService{}}
}

// maxInstanceID bounds the instance id an agent may send; a longer one is
// cut, so a peer cannot make the gateway keep an unbounded string.
const maxInstanceID = 128

// instanceID is the instance id s's agent sent, cut to maxInstanceID.
func instanceID(s *tunnel.Session) string {
	id := s.Instance()
	if len(id) > maxInstanceID {
		id = id[:maxInstanceID]
	}
	return id
}

// attach adds s as a live instance and returns it, with the session it
// replaces: the older session of the same instance, which carried the
// same services, so they move to the new session at once and nothing is
// withdrawn.
func (a *agentState) attach(s *tunnel.Session, remote string) (*instance, *tunnel.Session) {
	id := instanceID(s)
	in := &instance{id: id, sess: s, remote: remote, since: time.Now(),
		held: map[protocol.ServiceKey]bool{}, warned: map[protocol.ServiceKey]bool{}, retry: make(chan struct{}, 1)}
	a.mu.Lock()
	defer a.mu.Unlock()
	old := a.instances[id]
	a.instances[id] = in
	a.live.Store(int64(len(a.instances)))
	if old == nil {
		return in, nil
	}
	for k := range old.held {
		if ps := a.services[k]; ps != nil {
			ps.base().swapHolder(old, in)
			in.held[k] = true
		}
	}
	return in, old.sess
}

// connected reports whether any instance is live. It takes no lock.
func (a *agentState) connected() bool { return a.live.Load() > 0 }

// lookup returns s's instance if s is still its live session. The caller
// holds a.mu.
func (a *agentState) lookup(s *tunnel.Session) *instance {
	if in := a.instances[instanceID(s)]; in != nil && in.sess == s {
		return in
	}
	return nil
}

// liveInstances returns a's live instances, copied under a.mu.
func (a *agentState) liveInstances() []*instance {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*instance, 0, len(a.instances))
	for _, in := range a.instances {
		out = append(out, in)
	}
	return out
}

// replacedBy reports whether the instance id now lives in a session other
// than s: a reconnect of the same instance took over.
func (a *agentState) replacedBy(id string, s *tunnel.Session) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	in := a.instances[id]
	return in != nil && in.sess != s
}

// detach forgets s if it is still the session of its instance: the
// instance stops getting new connections at once, and the services only
// it held are closed (their ports stay allocated for a reconnect). It
// reports whether s was live.
func (g *Gateway) detach(a *agentState, s *tunnel.Session) bool {
	a.mu.Lock()
	in := a.lookup(s)
	if in == nil {
		a.mu.Unlock()
		return false
	}
	delete(a.instances, in.id)
	a.live.Store(int64(len(a.instances)))
	withdrawn := g.release(a, in, nil)
	a.mu.Unlock()
	g.afterWithdraw(a.name, withdrawn)
	g.retryRefused(a, withdrawn)
	g.countInstances(a)
	return true
}

// shutdownAgent ends a's sessions and closes its public services (gateway
// shutdown).
func (g *Gateway) shutdownAgent(a *agentState) {
	a.mu.Lock()
	sessions := make([]*tunnel.Session, 0, len(a.instances))
	for id, in := range a.instances {
		sessions = append(sessions, in.sess)
		delete(a.instances, id)
	}
	a.live.Store(0)
	withdrawn := g.withdraw(a, nil)
	a.mu.Unlock()
	for _, s := range sessions {
		s.CloseWithError(protocol.CodeShutdown, "gateway shutting down")
	}
	g.afterWithdraw(a.name, withdrawn)
	g.countInstances(a)
}

// release takes in off the services it holds whose keys are not in keep
// (every one when keep is nil), and withdraws those it was the last holder
// of, which it returns. The caller holds a.mu and closes the returned
// services after unlocking (afterWithdraw).
func (g *Gateway) release(a *agentState, in *instance, keep map[protocol.ServiceKey]bool) []publicService {
	var gone map[protocol.ServiceKey]bool
	for k := range in.held {
		if keep[k] {
			continue
		}
		delete(in.held, k)
		ps := a.services[k]
		if ps == nil {
			continue
		}
		if ps.base().removeHolder(in) == 0 {
			if gone == nil {
				gone = map[protocol.ServiceKey]bool{}
			}
			gone[k] = true
		}
	}
	if gone == nil {
		return nil
	}
	return g.withdraw(a, func(k protocol.ServiceKey) bool { return !gone[k] })
}

// retryRefused signals the instances refused one of the withdrawn
// services for a conflicting definition: they may have it now. It is
// called after afterWithdraw has closed the services, so that their ports
// can be bound again, with no lock held.
func (g *Gateway) retryRefused(a *agentState, withdrawn []publicService) {
	if len(withdrawn) == 0 {
		return
	}
	gone := make(map[protocol.ServiceKey]bool, len(withdrawn))
	for _, ps := range withdrawn {
		gone[ps.base().key] = true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, in := range a.instances {
		if wantsAny(in, gone) {
			select {
			case in.retry <- struct{}{}:
			default:
			}
		}
	}
}

// wantsAny reports whether in was refused any of keys for a conflict.
func wantsAny(in *instance, keys map[protocol.ServiceKey]bool) bool {
	for k := range in.warned {
		if keys[k] {
			return true
		}
	}
	return false
}

// withdraw forgets a's services for which keep is false (every service
// when keep is nil) and returns them. The caller holds a.mu, and after
// unlocking closes the returned services and keeps their ports retained
// (afterWithdraw), which writes to the allocation store.
func (g *Gateway) withdraw(a *agentState, keep func(protocol.ServiceKey) bool) []publicService {
	var out []publicService
	for k, ps := range a.services {
		if keep != nil && keep(k) {
			continue
		}
		ps.base().setHolders(nil)
		delete(a.services, k)
		out = append(out, ps)
	}
	return out
}

// conflicts reports how svc differs from the definition spec another
// instance registered for the same service, or "" when they agree on what
// decides the public side: the port and the requested public port.
func conflicts(spec, svc *protocol.Service) string {
	switch {
	case spec.Port != svc.Port:
		return fmt.Sprintf("port %d, where another instance of this agent registered port %d", svc.Port, spec.Port)
	case spec.PublicPort != svc.PublicPort:
		return fmt.Sprintf("public_port %d, where another instance of this agent registered public_port %d", svc.PublicPort, spec.PublicPort)
	case spec.ProxyProtocol != svc.ProxyProtocol:
		// One backend would see headers from some connections only.
		return fmt.Sprintf("proxy_protocol %q, where another instance of this agent registered %q", svc.ProxyProtocol, spec.ProxyProtocol)
	case !slices.Equal(spec.AllowCIDRs, svc.AllowCIDRs) || !slices.Equal(spec.DenyCIDRs, svc.DenyCIDRs) ||
		spec.MaxConnectionsPerSource != svc.MaxConnectionsPerSource ||
		spec.MaxConnectionRatePerSource != svc.MaxConnectionRatePerSource ||
		spec.ConnectionBurstPerSource != svc.ConnectionBurstPerSource:
		// One public port has one source policy.
		return "allow_cidrs, deny_cidrs or per-source limits differ from another instance of this agent's"
	}
	return ""
}

// register reconciles the services of the instance whose session is sess
// with its full desired set: new services get a port and a socket, changed
// ones are updated, absent ones are released (withdrawn when no other
// instance holds them). A service another instance holds is shared when
// the definitions agree and refused for this instance when they conflict.
// Each service gets an endpoint or an error.
//
// It runs under a.regMu. Under a.mu it decides what to open; it then
// allocates (in the allocation store, bounded by the store timeout) and
// binds without a.mu, and takes a.mu again to install what it opened,
// unless the instance left meanwhile. Closing replaced and withdrawn
// services (which takes a UDP port's udpSessions.mu) and forgetting their
// metrics happen after unlocking.
func (g *Gateway) register(a *agentState, sess *tunnel.Session, reg *protocol.Register) *protocol.RegisterAck {
	ack := &protocol.RegisterAck{Seq: reg.Seq, Endpoints: make([]protocol.Endpoint, len(reg.Services))}
	a.regMu.Lock()
	defer a.regMu.Unlock()
	a.mu.Lock()
	in := a.lookup(sess)
	if in == nil {
		a.mu.Unlock()
		return sessionReplaced(ack, reg)
	}
	// toOpen is a service that needs a new port: new, or its requested
	// public port changed (old is then its current service).
	type toOpen struct {
		i   int
		svc protocol.Service
		pol *sourcePolicy
		old publicService
	}
	var open []toOpen
	keep := map[protocol.ServiceKey]bool{}
	ceil := g.conf().Ceiling(a.name)
	var conflictLogs []func()
	failed := 0
	// The quota counts the identity's services: those other instances
	// hold, and those this registration keeps that no other instance
	// holds (counted in own as they are accepted).
	others, own := 0, 0
	listed := make(map[protocol.ServiceKey]bool, len(reg.Services))
	for _, ps := range a.services {
		if ps.base().otherHolder(in) != nil {
			others++
		}
	}
	for i := range reg.Services {
		svc := reg.Services[i]
		ep := &ack.Endpoints[i]
		*ep = protocol.Endpoint{ID: svc.ID, Protocol: svc.Protocol}
		key := svc.Key()
		listed[key] = true
		old := a.services[key]
		var other *instance
		if old != nil {
			other = old.base().otherHolder(in)
		}
		if i >= a.maxServices || (other == nil && others+own >= a.maxServices) {
			ep.Error = fmt.Sprintf("over this agent's quota of %d services (gateway max_services)", a.maxServices)
			failed++
			continue
		}
		pol, err := checkService(&svc, ceil)
		if err != nil {
			// Not kept: a service already open under an earlier,
			// acceptable spec is withdrawn, not left running wider
			// than its agent now asks.
			ep.Error = err.Error()
			failed++
			continue
		}
		if other == nil {
			own++
		}
		if other != nil {
			// Shared with another instance: join it, or be refused.
			spec := old.base().spec.Load()
			if why := conflicts(spec, &svc); why != "" {
				ep.Error = "conflicting definition: " + why
				failed++
				if !in.warned[key] {
					in.warned[key] = true
					agent, remote, otherRemote, otherID := a.name, in.remote, other.remote, other.id
					conflictLogs = append(conflictLogs, func() {
						g.log.Error("conflicting service definitions from two instances of one agent; the newer one is refused",
							"agent", agent, "service", key.String(), "reason", why,
							"refused_instance", in.id, "refused_remote", remote,
							"serving_instance", otherID, "serving_remote", otherRemote)
					})
				}
				continue
			}
			delete(in.warned, key)
			keep[key] = true
			old.base().addHolder(in)
			in.held[key] = true
			keepService(old, &svc, pol, ep)
			continue
		}
		delete(in.warned, key)
		keep[key] = true
		if old != nil && (svc.PublicPort == 0 || svc.PublicPort == old.base().port) {
			keepService(old, &svc, pol, ep)
			continue
		}
		open = append(open, toOpen{i: i, svc: svc, pol: pol, old: old})
	}
	a.mu.Unlock()

	// The old socket of a moved service stays open until the new one is
	// bound: on failure the service keeps its old port and allocation.
	ctx, cancel := context.WithTimeout(context.Background(), g.storeTimeout)
	services := make([]publicService, len(open))
	errs := make([]error, len(open))
	for j := range open {
		services[j], errs[j] = g.openService(ctx, a, &open[j].svc, open[j].pol)
	}
	cancel()

	a.mu.Lock()
	if a.lookup(sess) != in {
		a.mu.Unlock()
		var orphans []publicService
		for _, ps := range services {
			if ps != nil {
				orphans = append(orphans, ps)
			}
		}
		g.afterWithdraw(a.name, orphans)
		return sessionReplaced(ack, reg)
	}
	var opened []string
	var replaced []publicService
	var moveFailed []string
	for j, o := range open {
		ep := &ack.Endpoints[o.i]
		key := o.svc.Key()
		if err := errs[j]; err != nil {
			if o.old != nil {
				keepService(o.old, &o.svc, o.pol, ep)
				moveFailed = append(moveFailed, fmt.Sprintf("%s: %v", key, err))
				continue
			}
			ep.Error = err.Error()
			failed++
			continue
		}
		ps := services[j]
		if o.old != nil {
			o.old.base().setHolders(nil)
			replaced = append(replaced, o.old)
		}
		ps.base().addHolder(in)
		in.held[key] = true
		a.services[key] = ps
		b := ps.base()
		ep.PublicPort, ep.Address = b.port, b.endpoint
		opened = append(opened, key.String()+"="+b.endpoint)
	}
	withdrawn := g.release(a, in, keep)
	for k := range in.warned {
		if !listed[k] {
			delete(in.warned, k) // no longer wanted
		}
	}
	a.mu.Unlock()
	for _, ps := range replaced {
		ps.close()
	}
	g.afterWithdraw(a.name, withdrawn)
	g.retryRefused(a, withdrawn)
	if len(opened) > 0 {
		g.metrics.PortAllocations.Set(float64(g.ports.count()))
	}
	g.countServices()
	g.log.Info("agent registered services", "agent", a.name, "instance", in.id, "services", len(reg.Services),
		"opened", opened, "withdrawn", len(withdrawn), "failed", failed)
	for _, m := range moveFailed {
		g.log.Warn("public_port change failed; service kept on its old port", "agent", a.name, "reason", m)
	}
	for _, f := range conflictLogs {
		f()
	}
	for _, ep := range ack.Endpoints {
		if ep.Error != "" {
			g.log.Warn("service not exposed", "agent", a.name, "service", ep.ID, "protocol", ep.Protocol, "reason", ep.Error)
		}
	}
	return ack
}

// sessionReplaced answers a registration of a session that is no longer
// one of the agent's live ones.
func sessionReplaced(ack *protocol.RegisterAck, reg *protocol.Register) *protocol.RegisterAck {
	for i, s := range reg.Services {
		ack.Endpoints[i] = protocol.Endpoint{ID: s.ID, Protocol: s.Protocol, Error: "session replaced"}
	}
	return ack
}

// keepService updates a service that keeps its port to svc, its latest
// spec, and answers with its endpoint.
func keepService(ps publicService, svc *protocol.Service, pol *sourcePolicy, ep *protocol.Endpoint) {
	b := ps.base()
	b.setSpec(svc, pol)
	ep.PublicPort, ep.Address = b.port, b.endpoint
}

// afterWithdraw closes withdrawn services, keeps their ports retained (in
// the allocation store too) and forgets their metrics. It is called with
// no lock held.
func (g *Gateway) afterWithdraw(agent string, withdrawn []publicService) {
	// Every socket first: a slow store must not keep ports open.
	for _, ps := range withdrawn {
		ps.close()
	}
	for _, ps := range withdrawn {
		b := ps.base()
		g.ports.retain(agent, b.key, b.port)
		g.metrics.ForgetService(agent, b.key.ID)
	}
	if len(withdrawn) > 0 {
		g.metrics.PortAllocations.Set(float64(g.ports.count()))
		g.countServices()
	}
}

// refreshState stamps the live allocations in the store while any is
// live. Without it, a gateway that ran for longer than port_retention
// without a change and then crashed would come back with stamps old
// enough to expire the ports of every agent that had not reconnected yet,
// and other replicas would take them for abandoned.
func (g *Gateway) refreshState() {
	if !g.ports.hasLive() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), g.storeTimeout)
	defer cancel()
	if err := g.ports.refresh(ctx); err != nil {
		g.log.Error("refreshing port allocations in the store", "err", err)
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

// countInstances sets a's instances gauge. It is called with no lock held.
func (g *Gateway) countInstances(a *agentState) {
	g.metrics.AgentInstances.WithLabelValues(a.name).Set(float64(a.live.Load()))
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
