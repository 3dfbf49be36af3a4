package gateway

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"maps"
	"sort"
	"sync"
	"sync/atomic"
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
	// rev is the store's revision of the allocation as this gateway last
	// wrote or read it (0: unknown); withdrawals and evictions compare it.
	rev int64
	// remote: the store says another replica serves it. It is never
	// evicted here, and only its holder's claim or its expiry frees it.
	remote bool
}

// record is the allocation as the store names it.
func (a *allocation) record() store.Allocation {
	return store.Allocation{Agent: a.key.agent, Service: a.key.svc.ID, Protocol: a.key.svc.Kind, Port: a.port, Revision: a.rev}
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

// storeTimeout is the default bound of a registration's store calls and
// of each store write made outside a registration (withdrawals, evictions,
// refreshes), so a store that does not answer holds no goroutine for long.
const storeTimeout = 10 * time.Second

// ports allocates public ports per (agent, service) from the configured
// range. A service gets its previous port back; a new one prefers
// 10000+port. Ports of one agent are never given to another while
// allocated or retained, with two bounds so that retained ports cannot
// crowd out live ones: an agent keeps at most maxRetained retained
// allocations (its oldest go first), and when the range is full a new
// service takes the oldest retained allocation, its own agent's first.
//
// The store is the authority on who holds a port: a port is claimed in it
// (compare-and-swap) before it is bound, and every change is written to it
// by revision. The maps are this gateway's view: its own allocations and
// the holders the store has named. ports.mu guards the maps and is never
// held during a store call or a bind: each operation decides under mu,
// calls the store and binds without it, and records the outcome under mu
// again. Store writes that follow a decision (withdrawals, evictions,
// expiries) are collected under mu and made after it is released.
type ports struct {
	mu        sync.Mutex
	low, high int
	retention time.Duration
	now       func() time.Time
	// maxRetained returns an agent's cap on retained allocations; nil
	// means no cap. Set before use, read-only after.
	maxRetained func(agent string) int
	// onEvict is told of evictions, without mu held. Set before use.
	onEvict func([]eviction)
	// shared: the store is shared with other replicas, whose live
	// allocations are theirs (a single gateway's store holds only its
	// own, all retained after a restart). Set before use.
	shared bool
	// log reports store failures that have no caller to return to. Set
	// before use.
	log *slog.Logger
	// timeout bounds each store write no caller waits for. Set before
	// use.
	timeout time.Duration
	// downUntil (Unix ns): a store write failed as unavailable, and
	// writes no caller waits for are skipped until then, so that a
	// shutdown or a burst of withdrawals does not wait timeout for each
	// while etcd has no quorum. What they would have written expires by
	// itself or is written again by the next refresh.
	downUntil atomic.Int64
	byKey     map[allocKey]*allocation
	byPort    map[portKey]*allocation
	byAgent   map[string]map[protocol.ServiceKey]*allocation
	evicted   []eviction         // since the last takePending
	release   []store.Allocation // store releases decided under mu, made after it
	st        store.Store
}

func newPorts(low, high int, retention time.Duration, st store.Store) *ports {
	return &ports{
		low: low, high: high, retention: retention, now: time.Now, st: st,
		log: slog.New(slog.DiscardHandler), timeout: storeTimeout,
		byKey: map[allocKey]*allocation{}, byPort: map[portKey]*allocation{},
		byAgent: map[string]map[protocol.ServiceKey]*allocation{},
	}
}

// load reads the stored allocations. Allocations outside the current port
// range are left alone, and agents over their retained cap lose their
// oldest allocations (every loaded allocation of a single gateway is
// retained until its service registers again).
func (p *ports) load(ctx context.Context) error {
	allocs, _, err := p.st.List(ctx)
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
		p.add(&allocation{key: key, port: a.Port, lastUsed: a.LastUsed, rev: a.Revision, remote: p.shared && a.Live})
	}
	for agent := range p.byAgent {
		p.enforceCap(agent)
	}
	ev, rel := p.takePending()
	p.mu.Unlock()
	p.finish(ev, rel)
	return nil
}

// errNoPort is returned when the range has no free port.
var errNoPort = errors.New("no free public port in port_range")

// bindFunc opens the public socket on a port, kept by the caller, and
// returns how to close it again. It returns an error wrapping
// syscall.EADDRINUSE when another process holds the port. Once a bind
// succeeds and the store agrees, acquire returns that port.
type bindFunc func(port int) (unbind func(), err error)

// maxBindFailures bounds how many ports held by other processes one
// allocation skips before giving up.
const maxBindFailures = 256

// candidate is the port acquire tries next.
type candidate struct {
	port int
	// victim is a retained allocation the port is taken from, once the
	// port is bound; nil for a free port or the service's own.
	victim *allocation
	// exact: the service asked for this port (public_port).
	exact bool
	// spec is the registered service, stored with the claim.
	spec *protocol.Service
}

// acquire returns the port for a service, claimed in the store and opened
// by bind. ctx bounds the store calls: when the store cannot be reached, a
// service whose port this gateway holds keeps it, and any other fails.
func (p *ports) acquire(ctx context.Context, agent string, svc *protocol.Service, bind bindFunc) (int, error) {
	key := allocKey{agent, svc.Key()}
	tried := map[int]bool{}
	failures := 0
	// Each round tries a port not tried before: the range bounds them.
	for range p.high - p.low + 2 {
		p.mu.Lock()
		p.expire()
		c, err := p.next(key, svc, tried)
		ev, rel := p.takePending()
		p.mu.Unlock()
		p.finish(ev, rel)
		if err != nil {
			return 0, err
		}
		tried[c.port] = true
		c.spec = svc
		var port int
		if c.victim != nil {
			port, err = p.takeOver(ctx, key, c, bind)
		} else {
			port, err = p.claimAndBind(ctx, key, c, bind)
		}
		switch {
		case err == nil:
			return port, nil
		case errors.Is(err, errKeepAllocation):
			return 0, err
		case errors.Is(err, errRetry):
		case errors.Is(err, syscall.EADDRINUSE):
			if c.exact {
				return 0, fmt.Errorf("public_port %d is held by another process on the gateway host", c.port)
			}
			if failures++; failures >= maxBindFailures {
				return 0, errNoPort
			}
		default:
			return 0, err
		}
	}
	return 0, errNoPort
}

// errRetry: this candidate is lost (another service holds it), try the next.
var errRetry = errors.New("try the next port")

// errKeepAllocation marks a failure to open a port that stays the
// service's: another port is not tried.
var errKeepAllocation = errors.New("allocation kept")

// next picks the port to try for key. Caller holds p.mu.
func (p *ports) next(key allocKey, svc *protocol.Service, tried map[int]bool) (candidate, error) {
	kind := svc.Protocol
	if svc.PublicPort != 0 {
		port := svc.PublicPort
		if port < p.low || port > p.high {
			return candidate{}, fmt.Errorf("public_port %d is outside the gateway's port_range %d-%d", port, p.low, p.high)
		}
		cur := p.byPort[portKey{kind, port}]
		if tried[port] || (cur != nil && cur.key.agent != key.agent) {
			return candidate{}, fmt.Errorf("public_port %d is allocated to another agent", port)
		}
		if cur != nil && cur.key != key {
			if cur.live || cur.remote {
				return candidate{}, fmt.Errorf("public_port %d is in use by this agent's %s", port, cur.key.svc)
			}
			// This agent's own retained port, wanted by another of its
			// services: taken over once bound.
			return candidate{port: port, victim: cur, exact: true}, nil
		}
		return candidate{port: port, exact: true}, nil
	}
	if a := p.byKey[key]; a != nil && !tried[a.port] {
		return candidate{port: a.port}, nil
	}
	preferred := 10000 + svc.Port
	if preferred < p.low || preferred > p.high {
		preferred = p.low
	}
	n := p.high - p.low + 1
	for i := range n {
		port := p.low + (preferred-p.low+i)%n
		if p.byPort[portKey{kind, port}] == nil && !tried[port] {
			return candidate{port: port}, nil
		}
	}
	// The range is full: take the oldest retained allocation of the
	// service's own agent, else the oldest of anyone, rather than refuse
	// while ports sit unused.
	victim := oldestRetained(maps.Values(p.byAgent[key.agent]), kind, tried)
	if victim == nil {
		victim = oldestRetained(maps.Values(p.byKey), kind, tried)
	}
	if victim == nil {
		return candidate{}, errNoPort
	}
	return candidate{port: victim.port, victim: victim}, nil
}

// claimAndBind claims c.port for key in the store, then binds it; a port
// that cannot be bound is released again.
func (p *ports) claimAndBind(ctx context.Context, key allocKey, c candidate, bind bindFunc) (int, error) {
	want := store.Allocation{Agent: key.agent, Service: key.svc.ID, Protocol: key.svc.Kind, Port: c.port, Spec: c.spec}
	// In a cluster, a port already the service's may be served by other
	// replicas: failing to open it here must not take it from them.
	shared := p.shared && p.known(key, c.port)
	got, err := p.st.Claim(ctx, want)
	var taken *store.TakenError
	switch {
	case errors.As(err, &taken):
		p.mu.Lock()
		p.noteHolder(taken.Holder)
		p.mu.Unlock()
		if c.exact {
			return 0, fmt.Errorf("public_port %d is allocated to another agent", c.port)
		}
		return 0, errRetry
	case errors.Is(err, store.ErrUnavailable) && p.holds(key, c.port):
		// The store cannot be reached, but this port is the service's
		// own as far as this gateway knows: serve it, and let the next
		// refresh write it back.
		p.log.Warn("allocation store unreachable; keeping a service on the port this gateway holds for it",
			"agent", key.agent, "service", key.svc.String(), "port", c.port, "err", err)
		got = want
		got.Revision = 0
	case err != nil:
		return 0, fmt.Errorf("cannot allocate a public port: %w", err)
	}
	unbind, err := bind(c.port)
	if err != nil && shared {
		return 0, fmt.Errorf("public port %d is this service's in the cluster, but this replica cannot open it (the other replicas serve it): %w",
			c.port, errors.Join(errKeepAllocation, err))
	}
	if err != nil {
		// Another process took the port (or it cannot be opened): give
		// it up, the service's old allocation of it included.
		p.mu.Lock()
		if a := p.byKey[key]; a != nil && a.port == c.port {
			p.remove(a)
		}
		p.mu.Unlock()
		if got.Revision != 0 {
			p.storeRelease(got)
		}
		return 0, err
	}
	_ = unbind // kept open: the caller serves it
	p.mu.Lock()
	p.assign(key, c.port, got.Revision)
	ev, rel := p.takePending()
	p.mu.Unlock()
	p.finish(ev, rel)
	return c.port, nil
}

// takeOver gives c.victim's port to key: it binds the port first, so that
// a victim is never evicted for a port another process holds, then
// releases the victim in the store (at the revision this gateway knows)
// and claims the port.
func (p *ports) takeOver(ctx context.Context, key allocKey, c candidate, bind bindFunc) (int, error) {
	unbind, err := bind(c.port)
	if err != nil {
		return 0, err
	}
	p.mu.Lock()
	victim := c.victim.record()
	p.mu.Unlock()
	err = p.st.Release(ctx, victim)
	if err == nil {
		var got store.Allocation
		got, err = p.st.Claim(ctx, store.Allocation{Agent: key.agent, Service: key.svc.ID, Protocol: key.svc.Kind, Port: c.port, Spec: c.spec})
		if err == nil {
			p.mu.Lock()
			if p.byPort[portKey{key.svc.Kind, c.port}] == c.victim {
				if c.exact {
					p.remove(c.victim) // the agent's own: no eviction
				} else {
					p.evict(c.victim, evictRangeFull)
				}
			}
			p.assign(key, c.port, got.Revision)
			ev, rel := p.takePending()
			p.mu.Unlock()
			p.finish(ev, rel)
			return c.port, nil
		}
	}
	unbind()
	var taken *store.TakenError
	switch {
	case errors.Is(err, store.ErrNotHeld), errors.As(err, &taken):
		// The victim changed in the store since this gateway read it:
		// forget what it knew of the port and move on.
		p.mu.Lock()
		if p.byPort[portKey{key.svc.Kind, c.port}] == c.victim {
			p.remove(c.victim)
		}
		if taken != nil {
			p.noteHolder(taken.Holder)
		}
		p.mu.Unlock()
		if c.exact {
			return 0, fmt.Errorf("public_port %d is allocated to another agent", c.port)
		}
		return 0, errRetry
	default:
		return 0, fmt.Errorf("cannot allocate a public port: %w", err)
	}
}

// holds reports whether this gateway holds port for key and its
// retention has not run out.
func (p *ports) holds(key allocKey, port int) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	a := p.byKey[key]
	return a != nil && a.port == port && !a.remote &&
		(a.live || p.retention <= 0 || !a.lastUsed.Before(p.now().Add(-p.retention)))
}

// known reports whether this gateway's view (its own allocations and
// those the store named) gives port to key.
func (p *ports) known(key allocKey, port int) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	a := p.byKey[key]
	return a != nil && a.port == port
}

// noteHolder records the holder the store named for a port, so the next
// allocations skip it. Caller holds p.mu.
func (p *ports) noteHolder(h store.Allocation) {
	if h.Port < p.low || h.Port > p.high {
		return
	}
	if cur := p.byPort[portKey{h.Protocol, h.Port}]; cur != nil {
		if cur.live {
			return // ours and live: the store is behind; leave it
		}
		p.remove(cur)
	}
	key := allocKey{h.Agent, protocol.ServiceKey{ID: h.Service, Kind: h.Protocol}}
	if old := p.byKey[key]; old != nil {
		if old.live {
			return
		}
		p.remove(old)
	}
	p.add(&allocation{key: key, port: h.Port, lastUsed: h.LastUsed, rev: h.Revision, remote: p.shared && h.Live})
}

// oldestRetained returns the least recently used retained allocation of
// kind among allocs, skipping the ports in skip.
func oldestRetained(allocs iter.Seq[*allocation], kind protocol.Kind, skip map[int]bool) *allocation {
	var best *allocation
	for a := range allocs {
		if a.live || a.remote || a.key.svc.Kind != kind || skip[a.port] {
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

// assign records port as key's live allocation at store revision rev,
// giving up key's allocation of another port. Caller holds p.mu.
func (p *ports) assign(key allocKey, port int, rev int64) {
	if old := p.byKey[key]; old != nil && old.port != port {
		p.remove(old)
		p.release = append(p.release, old.record())
	}
	if cur := p.byPort[portKey{key.svc.Kind, port}]; cur != nil && cur.key != key {
		p.remove(cur) // what the store freed (expired) and gave to key
	}
	a := p.byKey[key]
	if a == nil {
		a = &allocation{key: key, port: port}
		p.add(a)
	}
	a.live, a.remote, a.lastUsed = true, false, p.now()
	if rev > a.rev || rev == 0 {
		a.rev = rev
	}
}

// retain marks a service's allocation of port as not live: its listener
// closed, its port kept for the retention period, or until the agent is
// over its cap. It writes the change to the store.
func (p *ports) retain(agent string, svc protocol.ServiceKey, port int) {
	key := allocKey{agent, svc}
	p.mu.Lock()
	a := p.byKey[key]
	if a == nil || a.port != port {
		p.mu.Unlock()
		return
	}
	a.live = false
	a.lastUsed = p.now()
	rec := a.record()
	p.enforceCap(agent)
	evicted := p.byKey[key] != a
	ev, rel := p.takePending()
	p.mu.Unlock()
	if !evicted {
		p.storeRetain(a, rec)
	}
	p.finish(ev, rel)
}

// storeRetain writes a's withdrawal at the revision it was decided on, and
// records the new revision; if a was evicted meanwhile, it releases what
// it just wrote.
func (p *ports) storeRetain(a *allocation, rec store.Allocation) {
	if rec.Revision == 0 {
		return // never written: nothing to mark (the store was unreachable)
	}
	ctx, cancel, ok := p.writeCtx()
	if !ok {
		return
	}
	defer cancel()
	got, err := p.st.Retain(ctx, rec)
	if err != nil {
		if !errors.Is(err, store.ErrNotHeld) {
			p.noteErr(err)
			p.log.Error("recording a withdrawn service's port in the allocation store", "agent", rec.Agent,
				"service", rec.Service, "port", rec.Port, "err", err)
		}
		return
	}
	p.mu.Lock()
	gone := p.byKey[a.key] != a
	if !gone && got.Revision > a.rev {
		a.rev = got.Revision
	}
	p.mu.Unlock()
	if gone {
		p.storeRelease(got)
	}
}

// enforceCap evicts the agent's oldest retained allocations beyond its cap.
func (p *ports) enforceCap(agent string) {
	if p.maxRetained == nil {
		return
	}
	limit := p.maxRetained(agent)
	var retained []*allocation
	for _, a := range p.byAgent[agent] {
		if !a.live && !a.remote {
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
// records why. Caller holds p.mu.
func (p *ports) evict(a *allocation, why metrics.Reason) {
	p.remove(a)
	p.release = append(p.release, a.record())
	p.evicted = append(p.evicted, eviction{reason: why, agent: a.key.agent, svc: a.key.svc, port: a.port})
}

// takePending returns and forgets the evictions and store releases
// decided so far. Caller holds p.mu.
func (p *ports) takePending() ([]eviction, []store.Allocation) {
	ev, rel := p.evicted, p.release
	p.evicted, p.release = nil, nil
	return ev, rel
}

// finish makes the store releases and hands evictions to onEvict. Caller
// does not hold p.mu.
func (p *ports) finish(ev []eviction, rel []store.Allocation) {
	for _, a := range rel {
		p.storeRelease(a)
	}
	if len(ev) > 0 && p.onEvict != nil {
		p.onEvict(ev)
	}
}

// storeRelease frees a in the store; one changed since (ErrNotHeld) is
// someone else's now and left alone.
func (p *ports) storeRelease(a store.Allocation) {
	if a.Revision == 0 {
		return // never written
	}
	ctx, cancel, ok := p.writeCtx()
	if !ok {
		return
	}
	defer cancel()
	if err := p.st.Release(ctx, a); err != nil && !errors.Is(err, store.ErrNotHeld) {
		p.noteErr(err)
		p.log.Error("releasing a port in the allocation store", "agent", a.Agent, "service", a.Service, "port", a.Port, "err", err)
	}
}

// writeCtx returns the context of a store write no caller waits for, or
// false while the store is known to be unreachable.
func (p *ports) writeCtx() (context.Context, context.CancelFunc, bool) {
	if time.Now().UnixNano() < p.downUntil.Load() {
		return nil, nil, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.timeout)
	return ctx, cancel, true
}

// noteErr starts skipping background writes for a while when err says
// the store is unreachable.
func (p *ports) noteErr(err error) {
	if errors.Is(err, store.ErrUnavailable) {
		p.downUntil.Store(time.Now().Add(p.timeout).UnixNano())
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

// remove forgets a in this gateway's view only.
func (p *ports) remove(a *allocation) {
	delete(p.byKey, a.key)
	delete(p.byPort, portKey{a.key.svc.Kind, a.port})
	if m := p.byAgent[a.key.agent]; m != nil {
		delete(m, a.key.svc)
		if len(m) == 0 {
			delete(p.byAgent, a.key.agent)
		}
	}
}

// expire forgets retained allocations older than the retention period,
// and releases this gateway's own in the store. Caller holds p.mu.
func (p *ports) expire() {
	if p.retention <= 0 {
		return
	}
	cutoff := p.now().Add(-p.retention)
	for _, a := range p.byKey {
		if !a.live && a.lastUsed.Before(cutoff) {
			p.remove(a)
			if !a.remote {
				p.release = append(p.release, a.record())
			}
		}
	}
}

// refresh stamps the live allocations in the store, so that none looks
// unused for longer than port_retention while it is served (after a
// crash, or to the other replicas).
func (p *ports) refresh(ctx context.Context) error {
	p.mu.Lock()
	var live []store.Allocation
	for _, a := range p.byKey {
		if a.live {
			live = append(live, a.record())
		}
	}
	p.mu.Unlock()
	if len(live) == 0 {
		return nil
	}
	refreshed, lost, err := p.st.Refresh(ctx, live)
	p.noteErr(err)
	p.mu.Lock()
	for _, r := range refreshed {
		a := p.byKey[allocKey{r.Agent, protocol.ServiceKey{ID: r.Service, Kind: r.Protocol}}]
		if a != nil && a.port == r.Port && r.Revision > a.rev {
			a.rev = r.Revision
		}
	}
	p.mu.Unlock()
	for _, l := range lost {
		p.log.Error("a served port is no longer this service's in the allocation store", "agent", l.Agent,
			"service", l.Service, "port", l.Port)
	}
	return err
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
