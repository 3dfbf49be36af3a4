package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"syscall"
	"time"

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

// ports allocates public ports per (agent, service) from the configured
// range and persists the allocations. A service gets its previous port
// back; a new one prefers 10000+port. Ports of one agent are never given to
// another while allocated or retained.
type ports struct {
	mu        sync.Mutex
	low, high int
	retention time.Duration
	now       func() time.Time
	byKey     map[allocKey]*allocation
	byPort    map[portKey]*allocation
	st        store.Store
}

func newPorts(low, high int, retention time.Duration, st store.Store) *ports {
	return &ports{
		low: low, high: high, retention: retention, now: time.Now, st: st,
		byKey: map[allocKey]*allocation{}, byPort: map[portKey]*allocation{},
	}
}

// load reads the persisted allocations. Allocations outside the current
// port range are dropped.
func (p *ports) load(ctx context.Context) error {
	allocs, err := p.st.Load(ctx)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, a := range allocs {
		kind, err := protocol.ParseKind(a.Protocol)
		if err != nil || a.Port < p.low || a.Port > p.high {
			continue
		}
		al := &allocation{key: allocKey{a.Agent, protocol.ServiceKey{ID: a.Service, Kind: kind}}, port: a.Port, lastUsed: a.LastUsed}
		p.byKey[al.key] = al
		p.byPort[portKey{kind, a.Port}] = al
	}
	return nil
}

// errNoPort is returned when the range has no free port.
var errNoPort = errors.New("no free public port in port_range")

// bindFunc opens the public listener on a port. It returns an error
// wrapping syscall.EADDRINUSE when another process holds the port.
type bindFunc func(port int) (io.Closer, error)

// maxBindFailures bounds how many ports held by other processes one
// allocation skips before giving up.
const maxBindFailures = 256

// acquire returns the port for a service and its open listener.
func (p *ports) acquire(agent string, svc *protocol.Service, bind bindFunc) (int, io.Closer, error) {
	kind, _ := protocol.ParseKind(svc.Protocol)
	key := allocKey{agent, svc.Key()}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.expire()

	if svc.PublicPort != 0 {
		return p.acquireExact(key, kind, svc.PublicPort, bind)
	}
	failures := 0
	if a := p.byKey[key]; a != nil {
		if l, err := bind(a.port); err == nil {
			p.markLive(a)
			return a.port, l, nil
		} else if !errors.Is(err, syscall.EADDRINUSE) {
			return 0, nil, err
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
		l, err := bind(port)
		if err != nil {
			if !errors.Is(err, syscall.EADDRINUSE) {
				return 0, nil, err
			}
			if failures++; failures >= maxBindFailures {
				break
			}
			continue
		}
		a := &allocation{key: key, port: port}
		p.byKey[key] = a
		p.byPort[portKey{kind, port}] = a
		p.markLive(a)
		return port, l, nil
	}
	return 0, nil, errNoPort
}

func (p *ports) acquireExact(key allocKey, kind protocol.Kind, port int, bind bindFunc) (int, io.Closer, error) {
	if port < p.low || port > p.high {
		return 0, nil, fmt.Errorf("public_port %d is outside the gateway's port_range %d-%d", port, p.low, p.high)
	}
	if a := p.byPort[portKey{kind, port}]; a != nil && a.key != key {
		if a.key.agent != key.agent {
			return 0, nil, fmt.Errorf("public_port %d is allocated to another agent", port)
		}
		if a.live {
			return 0, nil, fmt.Errorf("public_port %d is in use by this agent's %s", port, a.key.svc)
		}
		p.release(a) // this agent's own retained port, now wanted by another of its services
	}
	l, err := bind(port)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return 0, nil, fmt.Errorf("public_port %d is held by another process on the gateway host", port)
		}
		return 0, nil, err
	}
	if old := p.byKey[key]; old != nil && old.port != port {
		p.release(old)
	}
	a := &allocation{key: key, port: port}
	p.byKey[key] = a
	p.byPort[portKey{kind, port}] = a
	p.markLive(a)
	return port, l, nil
}

func (p *ports) markLive(a *allocation) {
	a.live = true
	a.lastUsed = p.now()
}

// retain marks a service's allocation as not live: its listener closed, its
// port kept for the retention period.
func (p *ports) retain(agent string, svc protocol.ServiceKey) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if a := p.byKey[allocKey{agent, svc}]; a != nil {
		a.live = false
		a.lastUsed = p.now()
	}
}

func (p *ports) release(a *allocation) {
	delete(p.byKey, a.key)
	delete(p.byPort, portKey{a.key.svc.Kind, a.port})
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
			Agent: a.key.agent, Service: a.key.svc.ID, Protocol: a.key.svc.Kind.String(),
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

// save persists the allocations.
func (p *ports) save(ctx context.Context) error {
	return p.st.Save(ctx, p.snapshot())
}

// count returns the number of allocations.
func (p *ports) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.byKey)
}
