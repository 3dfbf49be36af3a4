package gateway

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"maps"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/store"
)

// allocKey identifies the service an allocation belongs to.
type allocKey struct {
	agent string
	svc   protocol.ServiceKey
}

// portKey is a public port: TCP and UDP ports are separate spaces.
type portKey struct {
	kind protocol.Kind
	port int
}

type allocation struct {
	key      allocKey
	port     int
	live     bool // a listener is open for it
	lastUsed time.Time
}

// Why a retained allocation was given up before its port_retention ended:
// the reason label of portway_gateway_port_evictions_total.
const (
	// evictAgentCap: the agent held more retained allocations than its
	// max_retained_ports.
	evictAgentCap = metrics.ReasonAgentCap
	// evictRangeFull: port_range had no free port for a new service.
	evictRangeFull = metrics.ReasonRangeFull
)

// eviction is one retained allocation given up, reported after the lock.
type eviction struct {
	reason metrics.Reason
	agent  string
	svc    protocol.ServiceKey
	port   int
}

// ports allocates public ports per (agent, service) from the configured
// range and persists the allocations. A service gets its previous port
// back; a new one prefers 10000+port. Ports of one agent are never given to
// another while allocated or retained, with two bounds so that retained
// ports cannot crowd out live ones: an agent keeps at most maxRetained
// retained allocations (its oldest go first), and when the range is full a
// new service takes the oldest retained allocation, its own agent's first.
type ports struct {
	// saveMu orders saves: it is held from the snapshot to the end of the
	// write, so an older snapshot never lands after a newer one. It is
	// taken before mu, and mu is not held during the write.
	saveMu sync.Mutex
	// saves coalesces concurrent saves; its mu comes before saveMu.
	saves coalesced

	mu        sync.Mutex
	low, high int
	retention time.Duration
	now       func() time.Time
	// maxRetained returns an agent's cap on retained allocations; nil
	// means no cap. Set before use, read-only after.
	maxRetained func(agent string) int
	// onEvict is told of evictions, without mu held. Set before use.
	onEvict func([]eviction)
	byKey   map[allocKey]*allocation
	byPort  map[portKey]*allocation
	byAgent map[string]map[protocol.ServiceKey]*allocation
	evicted []eviction // since the last takeEvictions
	st      store.Store
}

func newPorts(low, high int, retention time.Duration, st store.Store) *ports {
	return &ports{
		low: low, high: high, retention: retention, now: time.Now, st: st,
		byKey: map[allocKey]*allocation{}, byPort: map[portKey]*allocation{},
		byAgent: map[string]map[protocol.ServiceKey]*allocation{},
	}
}

// load reads the persisted allocations. Allocations outside the current
// port range are dropped, and agents over their retained cap lose their
// oldest allocations (every loaded allocation is retained until its
// service registers again).
func (p *ports) load(ctx context.Context) error {
	allocs, err := p.st.Load(ctx)
	if err != nil {
		return err
	}
	p.mu.Lock()
	for _, a := range allocs {
		if !a.Protocol.Valid() || a.Port < p.low || a.Port > p.high {
			continue
		}
		key := allocKey{a.Agent, protocol.ServiceKey{ID: a.Service, Kind: a.Protocol}}
		if p.byKey[key] != nil {
			continue // listed twice: keep the first, so no port is orphaned
		}
		p.add(&allocation{key: key, port: a.Port, lastUsed: a.LastUsed})
	}
	for agent := range p.byAgent {
		p.enforceCap(agent)
	}
	ev := p.takeEvictions()
	p.mu.Unlock()
	p.report(ev)
	return nil
}

// errNoPort is returned when the range has no free port.
var errNoPort = errors.New("no free public port in port_range")

// bindFunc opens the public socket on a port, kept by the caller. It
// returns an error wrapping syscall.EADDRINUSE when another process holds
// the port. Once a bind succeeds, acquire returns that port.
type bindFunc func(port int) error

// maxBindFailures bounds how many ports held by other processes one
// allocation skips before giving up.
const maxBindFailures = 256

// acquire returns the port for a service, which bind has opened.
func (p *ports) acquire(agent string, svc *protocol.Service, bind bindFunc) (int, error) {
	p.mu.Lock()
	port, err := p.acquireLocked(agent, svc, bind)
	ev := p.takeEvictions()
	p.mu.Unlock()
	p.report(ev)
	return port, err
}

func (p *ports) acquireLocked(agent string, svc *protocol.Service, bind bindFunc) (int, error) {
	kind := svc.Protocol
	key := allocKey{agent, svc.Key()}
	p.expire()

	if svc.PublicPort != 0 {
		return p.acquireExact(key, kind, svc.PublicPort, bind)
	}
	failures := 0
	if a := p.byKey[key]; a != nil {
		if err := bind(a.port); err == nil {
			p.markLive(a)
			return a.port, nil
		} else if !errors.Is(err, syscall.EADDRINUSE) {
			return 0, err
		}
		// Another process took our port meanwhile: allocate a new one.
		failures++
		p.release(a)
	}
	preferred := 10000 + svc.Port
	if preferred < p.low || preferred > p.high {
		preferred = p.low
	}
	n := p.high - p.low + 1
	for i := 0; i < n; i++ {
		port := p.low + (preferred-p.low+i)%n
		if p.byPort[portKey{kind, port}] != nil {
			continue
		}
		if err := bind(port); err != nil {
			if !errors.Is(err, syscall.EADDRINUSE) {
				return 0, err
			}
			if failures++; failures >= maxBindFailures {
				return 0, errNoPort
			}
			continue
		}
		return p.assign(key, port)
	}
	return p.reclaim(key, kind, failures, bind)
}

// reclaim serves a new service when the range is full: it takes the oldest
// retained allocation of the service's own agent, else the oldest of
// anyone, rather than refuse while ports sit unused.
func (p *ports) reclaim(key allocKey, kind protocol.Kind, failures int, bind bindFunc) (int, error) {
	var tried map[int]bool // ports held by other processes: rare
	for failures < maxBindFailures {
		victim := oldestRetained(maps.Values(p.byAgent[key.agent]), kind, tried)
		if victim == nil {
			victim = oldestRetained(maps.Values(p.byKey), kind, tried)
		}
		if victim == nil {
			break
		}
		if err := bind(victim.port); err != nil {
			if !errors.Is(err, syscall.EADDRINUSE) {
				return 0, err
			}
			if tried == nil {
				tried = map[int]bool{}
			}
			tried[victim.port] = true
			failures++
			continue
		}
		p.evict(victim, evictRangeFull)
		return p.assign(key, victim.port)
	}
	return 0, errNoPort
}

// oldestRetained returns the least recently used retained allocation of
// kind among allocs, skipping the ports in skip.
func oldestRetained(allocs iter.Seq[*allocation], kind protocol.Kind, skip map[int]bool) *allocation {
	var best *allocation
	for a := range allocs {
		if a.live || a.key.svc.Kind != kind || skip[a.port] {
			continue
		}
		if best == nil || older(a, best) {
			best = a
		}
	}
	return best
}

// older orders allocations for eviction: least recently used first, then
// by port, so the order is the same on every run.
func older(a, b *allocation) bool {
	if !a.lastUsed.Equal(b.lastUsed) {
		return a.lastUsed.Before(b.lastUsed)
	}
	if a.port != b.port {
		return a.port < b.port
	}
	return a.key.svc.Kind < b.key.svc.Kind
}

func (p *ports) acquireExact(key allocKey, kind protocol.Kind, port int, bind bindFunc) (int, error) {
	if port < p.low || port > p.high {
		return 0, fmt.Errorf("public_port %d is outside the gateway's port_range %d-%d", port, p.low, p.high)
	}
	retained := p.byPort[portKey{kind, port}]
	if retained != nil && retained.key != key {
		if retained.key.agent != key.agent {
			return 0, fmt.Errorf("public_port %d is allocated to another agent", port)
		}
		if retained.live {
			return 0, fmt.Errorf("public_port %d is in use by this agent's %s", port, retained.key.svc)
		}
	} else {
		retained = nil
	}
	if err := bind(port); err != nil {
		// The retained allocation stays its service's until the port is
		// really taken over.
		if errors.Is(err, syscall.EADDRINUSE) {
			return 0, fmt.Errorf("public_port %d is held by another process on the gateway host", port)
		}
		return 0, err
	}
	if retained != nil {
		p.release(retained) // this agent's own retained port, now wanted by another of its services
	}
	if old := p.byKey[key]; old != nil && old.port != port {
		p.release(old)
	}
	return p.assign(key, port)
}

// assign records a new live allocation of port to key.
func (p *ports) assign(key allocKey, port int) (int, error) {
	a := &allocation{key: key, port: port}
	p.add(a)
	p.markLive(a)
	return port, nil
}

func (p *ports) markLive(a *allocation) {
	a.live = true
	a.lastUsed = p.now()
}

// retain marks a service's allocation as not live: its listener closed, its
// port kept for the retention period, or until the agent is over its cap.
func (p *ports) retain(agent string, svc protocol.ServiceKey) {
	p.mu.Lock()
	if a := p.byKey[allocKey{agent, svc}]; a != nil {
		a.live = false
		a.lastUsed = p.now()
		p.enforceCap(agent)
	}
	ev := p.takeEvictions()
	p.mu.Unlock()
	p.report(ev)
}

// enforceCap evicts the agent's oldest retained allocations beyond its cap.
func (p *ports) enforceCap(agent string) {
	if p.maxRetained == nil {
		return
	}
	limit := p.maxRetained(agent)
	var retained []*allocation
	for _, a := range p.byAgent[agent] {
		if !a.live {
			retained = append(retained, a)
		}
	}
	if len(retained) <= limit {
		return
	}
	sort.Slice(retained, func(i, j int) bool { return older(retained[i], retained[j]) })
	for _, a := range retained[:len(retained)-limit] {
		p.evict(a, evictAgentCap)
	}
}

// evict releases a retained allocation before its retention ended and
// records why.
func (p *ports) evict(a *allocation, why metrics.Reason) {
	p.release(a)
	p.evicted = append(p.evicted, eviction{reason: why, agent: a.key.agent, svc: a.key.svc, port: a.port})
}

// takeEvictions returns and forgets the evictions recorded so far. Caller
// holds p.mu.
func (p *ports) takeEvictions() []eviction {
	ev := p.evicted
	p.evicted = nil
	return ev
}

// report hands evictions to onEvict. Caller does not hold p.mu.
func (p *ports) report(ev []eviction) {
	if len(ev) > 0 && p.onEvict != nil {
		p.onEvict(ev)
	}
}

func (p *ports) add(a *allocation) {
	p.byKey[a.key] = a
	p.byPort[portKey{a.key.svc.Kind, a.port}] = a
	m := p.byAgent[a.key.agent]
	if m == nil {
		m = map[protocol.ServiceKey]*allocation{}
		p.byAgent[a.key.agent] = m
	}
	m[a.key.svc] = a
}

func (p *ports) release(a *allocation) {
	delete(p.byKey, a.key)
	delete(p.byPort, portKey{a.key.svc.Kind, a.port})
	if m := p.byAgent[a.key.agent]; m != nil {
		delete(m, a.key.svc)
		if len(m) == 0 {
			delete(p.byAgent, a.key.agent)
		}
	}
}

// expire forgets retained allocations older than the retention period.
func (p *ports) expire() {
	if p.retention <= 0 {
		return
	}
	cutoff := p.now().Add(-p.retention)
	for _, a := range p.byKey {
		if !a.live && a.lastUsed.Before(cutoff) {
			p.release(a)
		}
	}
}

// snapshot returns the allocations for persisting, live ones stamped now.
func (p *ports) snapshot() []store.Allocation {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	out := make([]store.Allocation, 0, len(p.byKey))
	for _, a := range p.byKey {
		last := a.lastUsed
		if a.live {
			last = now
		}
		out = append(out, store.Allocation{
			Agent: a.key.agent, Service: a.key.svc.ID, Protocol: a.key.svc.Kind,
			Port: a.port, LastUsed: last.UTC().Truncate(time.Second),
		})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Protocol != out[j].Protocol {
			return out[i].Protocol < out[j].Protocol
		}
		return out[i].Port < out[j].Port
	})
	return out
}

// save persists the allocations. Saves are serialized from snapshot to
// write, so concurrent saves land in the order their snapshots were taken
// and the last write holds the latest state; p.mu is held only while
// taking the snapshot, never during the write.
//
// Concurrent saves are coalesced (saves): a save that begins after a
// caller's change serves that caller too, so a storm of registrations
// writes the state a few times rather than once per agent.
func (p *ports) save(ctx context.Context) error {
	return p.saves.do(func() error {
		p.saveMu.Lock()
		defer p.saveMu.Unlock()
		return p.st.Save(ctx, p.snapshot())
	})
}

// hasLive reports whether any allocation has an open listener.
func (p *ports) hasLive() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, a := range p.byKey {
		if a.live {
			return true
		}
	}
	return false
}

// count returns the number of allocations.
func (p *ports) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.byKey)
}
