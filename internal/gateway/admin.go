package gateway

import (
	"container/list"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"net/http"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/protocol"
)

func (g *Gateway) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g.gatherer, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if stuck := g.stuckLock(livenessWait); stuck != "" {
			http.Error(w, "wedged: the "+stuck+" has been held for over "+livenessWait.String(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if why := g.notReadyReason(); why != "" {
			http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	mux.Handle("GET "+adminapi.AgentsPath, g.requireToken(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, g.Agents())
	}))
	mux.Handle("GET "+adminapi.ServicesPath, g.requireToken(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, g.Services())
	}))
	mux.Handle("GET "+adminapi.ClusterPath, g.requireToken(func(w http.ResponseWriter, r *http.Request) {
		if g.fabric == nil {
			http.Error(w, "not forwarding between replicas: no cluster: block with a cluster.token", http.StatusNotFound)
			return
		}
		writeJSON(w, g.fabric.info())
	}))
	return mux
}

// livenessWait is how long /healthz waits for each lock of the
// registration path before it declares the gateway wedged. Registration
// holds them for microseconds; a lock held this long is stuck.
const livenessWait = 1500 * time.Millisecond

// stuckLock takes, one at a time, the locks every agent connect and
// registration needs (the agents map, each agent, the port allocations),
// waiting at most wait for each, and names the first one it could not
// get ("" when all were free).
func (g *Gateway) stuckLock(wait time.Duration) string {
	if !lockWithin(&g.mu, wait) {
		return "gateway's agents lock"
	}
	agents := make([]*agentState, 0, len(g.agents))
	for _, a := range g.agents {
		agents = append(agents, a)
	}
	g.mu.Unlock()
	for _, a := range agents {
		if !lockWithin(&a.mu, wait) {
			return "lock of agent " + a.name
		}
		a.mu.Unlock()
	}
	if !lockWithin(&g.ports.mu, wait) {
		return "port allocations lock"
	}
	g.ports.mu.Unlock()
	if f := g.fabric; f != nil {
		if !lockWithin(&f.mu, wait) {
			return "cluster forwarding lock"
		}
		f.mu.Unlock()
	}
	return ""
}

// lockWithin tries to lock mu for up to wait, in bounded steps, and
// reports whether it holds it.
func lockWithin(mu *sync.Mutex, wait time.Duration) bool {
	const step = 5 * time.Millisecond
	for i := time.Duration(0); i <= wait/step; i++ {
		if mu.TryLock() {
			return true
		}
		time.Sleep(step)
	}
	return false
}

func (g *Gateway) requireToken(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		want := g.live.Load().admin // reloadable
		tok, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		got := sha256.Sum256([]byte(tok))
		if tok == "" || subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="portway-admin"`)
			http.Error(w, "admin token required", http.StatusUnauthorized)
			return
		}
		h(w, r)
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// Agents lists the configured agents and their state.
func (g *Gateway) Agents() []adminapi.AgentInfo {
	agents := g.conf().AllAgents()
	out := make([]adminapi.AgentInfo, 0, len(agents))
	g.mu.Lock()
	states := map[string]*agentState{}
	for k, v := range g.agents {
		states[k] = v
	}
	g.mu.Unlock()
	for _, c := range agents {
		info := adminapi.AgentInfo{Name: c.Name}
		if a := states[c.Name]; a != nil {
			a.mu.Lock()
			instances := make([]*instance, 0, len(a.instances))
			for _, in := range a.instances {
				instances = append(instances, in)
			}
			info.Services = len(a.services)
			held := make([]int, len(instances))
			for i, in := range instances {
				held[i] = len(in.held)
			}
			a.mu.Unlock()
			for i, in := range instances {
				info.Instances = append(info.Instances, adminapi.InstanceInfo{
					ID: in.id, Protocol: in.sess.Protocol(), Remote: in.remote, ConnectedSince: in.since.UTC(),
					HeartbeatRTTMS: float64(in.sess.RTT().Microseconds()) / 1000,
					Services:       held[i], Active: in.active.Load(),
				})
			}
			sort.Slice(info.Instances, func(i, j int) bool {
				return info.Instances[i].ConnectedSince.Before(info.Instances[j].ConnectedSince)
			})
			if n := len(info.Instances); n > 0 {
				// The agent-wide fields describe the newest instance, as
				// they described the one session before there were several.
				last := info.Instances[n-1]
				info.Connected = true
				info.Protocol = last.Protocol
				info.Remote = last.Remote
				info.ConnectedSince = last.ConnectedSince
				info.HeartbeatRTTMS = last.HeartbeatRTTMS
			}
		}
		out = append(out, info)
	}
	return out
}

// Services lists every exposed service.
func (g *Gateway) Services() []adminapi.ServiceInfo {
	var out []adminapi.ServiceInfo
	for _, a := range g.agentList() {
		a.mu.Lock()
		services := make([]publicService, 0, len(a.services))
		for _, ps := range a.services {
			services = append(services, ps)
		}
		a.mu.Unlock()
		for _, ps := range services {
			b := ps.base()
			spec := b.spec.Load()
			mode := spec.Mode
			if mode == "" {
				mode = protocol.ModeTunnel
			}
			si := adminapi.ServiceInfo{
				Agent: a.name, ID: spec.ID, Protocol: spec.Protocol.String(), Port: spec.Port,
				PublicPort: b.port, Endpoint: b.endpoint, Mode: string(mode),
				ProxyProtocol: spec.ProxyProtocol, AllowCIDRs: spec.AllowCIDRs, DenyCIDRs: spec.DenyCIDRs,
				MaxConnectionsPerSource:    spec.MaxConnectionsPerSource,
				MaxConnectionRatePerSource: spec.MaxConnectionRatePerSource,
				Denied:                     b.gate.denied.Load(),
				SourceLimited:              b.gate.limited.Load(),
			}
			si.Active = b.activeN.Load()
			ps.traffic(&si)
			out = append(out, si)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Agent != out[j].Agent {
			return out[i].Agent < out[j].Agent
		}
		if out[i].ID != out[j].ID {
			return out[i].ID < out[j].ID
		}
		return out[i].Protocol < out[j].Protocol
	})
	return out
}

// authLimiter counts failed authentications per source in fixed windows; a
// source over the limit is refused until its window ends. A source is an
// IPv4 address or an IPv6 /64: one host commonly holds a whole /64 and could
// otherwise rotate addresses for unlimited tries.
type authLimiter struct {
	limit  int
	window time.Duration
	now    func() time.Time
	max    int // sources tracked at most

	mu      sync.Mutex
	sources map[netip.Prefix]*list.Element // of *failWindow
	// order holds the windows oldest first: a window is appended when it
	// starts, so when max sources are tracked the front is evicted.
	order list.List
}

type failWindow struct {
	src    netip.Prefix
	start  time.Time
	count  int
	warned bool
}

// maxTrackedSources bounds the limiter's memory under a spray of sources.
const maxTrackedSources = 100000

func newAuthLimiter(limit int, window time.Duration) *authLimiter {
	return &authLimiter{limit: limit, window: window, now: time.Now, max: maxTrackedSources,
		sources: map[netip.Prefix]*list.Element{}}
}

// sourceKey maps a peer address to the unit the limiter counts: the
// address itself for IPv4 (and IPv4-mapped IPv6), its /64 for IPv6. An
// unparsable address maps to the zero prefix, shared by all such peers.
func sourceKey(src string) netip.Prefix {
	a, err := netip.ParseAddr(src)
	if err != nil {
		return netip.Prefix{}
	}
	a = a.Unmap().WithZone("")
	bits := 32
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return p
}

// allowed reports whether src may try to authenticate now.
func (l *authLimiter) allowed(src string) bool {
	key := sourceKey(src)
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.sources[key]
	if e == nil {
		return true
	}
	w := e.Value.(*failWindow)
	if l.now().Sub(w.start) >= l.window {
		l.forget(e)
		return true
	}
	return w.count < l.limit
}

// fail records a failed attempt. It returns true the first time src goes
// over the limit in a window, so the caller logs that once.
func (l *authLimiter) fail(src string) bool {
	key := sourceKey(src)
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	var w *failWindow
	if e := l.sources[key]; e != nil {
		if w = e.Value.(*failWindow); now.Sub(w.start) >= l.window {
			l.forget(e)
			w = nil
		}
	}
	if w == nil {
		// Ended windows first, then, if still full, the oldest live ones:
		// a spray of new sources costs the earliest sources their count,
		// not everyone's.
		for e := l.order.Front(); e != nil && now.Sub(e.Value.(*failWindow).start) >= l.window; e = l.order.Front() {
			l.forget(e)
		}
		for len(l.sources) >= l.max && l.order.Len() > 0 {
			l.forget(l.order.Front())
		}
		w = &failWindow{src: key, start: now}
		l.sources[key] = l.order.PushBack(w)
	}
	w.count++
	if w.count >= l.limit && !w.warned {
		w.warned = true
		return true
	}
	return false
}

// forget drops a tracked window. Caller holds l.mu.
func (l *authLimiter) forget(e *list.Element) {
	delete(l.sources, e.Value.(*failWindow).src)
	l.order.Remove(e)
}
