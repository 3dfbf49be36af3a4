// Package agent is portway's private side: it dials out to the gateway over
// one WebSocket, registers the services it exposes (static ones from its
// config and those discovered in Kubernetes), and serves every stream the
// gateway opens by dialing the matching backend, which it alone chose.
//
// An agent may hold several sessions, each to a distinct gateway replica
// (gateway.connections, sessions.go): each registers the same services and
// serves the streams its replica opens. The agent is connected while any
// session is up.
//
// Agent.mu guards the service sets, the endpoints and the sessions' slots;
// it is a leaf: nothing is called out of the package under it.
package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/tunnel"
)

// Service is one backend the agent exposes.
type Service struct {
	// ID names the service: a static service's name, or
	// namespace/gateway/listener when discovered.
	ID       string
	Protocol protocol.Kind
	// Port is the port the service is known by (the gateway prefers
	// 10000+Port publicly).
	Port int
	// Backend is host:port to dial.
	Backend string
	// PublicPort asks the gateway for an exact public port (0: any).
	PublicPort int
	// IdleTimeout overrides tcp.idle_timeout (or udp.session_timeout) for
	// this service; 0 keeps the configured value.
	IdleTimeout time.Duration
	// Mode is protocol.ModeTunnel or protocol.ModeDual (display only).
	Mode protocol.Mode
	// ProxyProtocol is the PROXY protocol header written to the backend:
	// config.ProxyProtocolV1, V2, or Off.
	ProxyProtocol string
	// Policy is the allow/deny lists and per-source limits the gateway
	// enforces for the service.
	Policy config.SourcePolicy
}

// Key returns the service's key.
func (s *Service) Key() protocol.ServiceKey { return protocol.ServiceKey{ID: s.ID, Kind: s.Protocol} }

// Endpoint is the gateway's answer for one service.
type Endpoint struct {
	Service Service
	// Address is public_host:public_port, empty when Error is set.
	Address string
	Error   string
}

// Options are an Agent's dependencies.
type Options struct {
	Config *config.AgentFile
	Logger *slog.Logger
	// Registry receives the agent's metrics; Gatherer serves them.
	Registry prometheus.Registerer
	Gatherer prometheus.Gatherer
	// TLS overrides the TLS client config built from the config file.
	TLS *tls.Config
	// NetDial replaces the TCP dialer used to reach the gateway (tests).
	NetDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// OnEndpoints, when set, is called with every register_ack's result
	// (discovery writes the endpoints back to Kubernetes with it).
	OnEndpoints func([]Endpoint)
	Version     string
	// ExitOnAuthFailure makes Run return ErrAuthRejected when the gateway
	// refuses the token, instead of retrying it forever.
	ExitOnAuthFailure bool
}

// Agent is a running agent.
type Agent struct {
	cfg     *config.AgentFile
	log     *slog.Logger
	metrics *metrics.Agent
	gath    prometheus.Gatherer
	tls     *tls.Config
	netDial func(ctx context.Context, network, addr string) (net.Conn, error)
	onEP    func([]Endpoint)
	version string
	// exitOnAuth is Options.ExitOnAuthFailure.
	exitOnAuth bool

	// instance is this process's instance id (instanceID).
	instance string
	// lookupHost resolves a gateway URL's host (sessions.go).
	lookupHost func(ctx context.Context, host string) ([]string, error)

	mu         sync.Mutex
	static     []Service
	discovered []Service
	// changed is closed, and replaced, when the desired set changes:
	// every session re-registers.
	changed   chan struct{}
	slots     map[int]*slot
	active    map[protocol.ServiceKey]*Service
	limits    map[protocol.ServiceKey]*limiter
	endpoints []Endpoint
	logged    map[protocol.ServiceKey]string

	// live counts the sessions up: the agent is connected while any is.
	// upMu orders the updates of live with the connected gauge's.
	live       atomic.Int64
	upMu       sync.Mutex
	registered atomic.Bool
	metricsLn  net.Listener
	// unknownLog rate-limits the warning about streams for services this
	// agent did not register.
	unknownLog limiter
}

// New prepares an agent from its options.
func New(o Options) (*Agent, error) {
	if o.Config == nil {
		return nil, errors.New("agent: no config")
	}
	if err := o.Config.Validate(); err != nil {
		return nil, err
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	reg, gath := o.Registry, o.Gatherer
	if reg == nil {
		r := prometheus.NewRegistry()
		reg, gath = r, r
	}
	a := &Agent{
		cfg: o.Config, log: log, metrics: metrics.NewAgent(reg), gath: gath,
		tls: o.TLS, netDial: o.NetDial, onEP: o.OnEndpoints, version: o.Version, exitOnAuth: o.ExitOnAuthFailure,
		instance:   instanceID(os.Getenv),
		lookupHost: net.DefaultResolver.LookupHost,
		changed:    make(chan struct{}),
		slots:      map[int]*slot{},
		active:     map[protocol.ServiceKey]*Service{},
		limits:     map[protocol.ServiceKey]*limiter{},
		logged:     map[protocol.ServiceKey]string{},
	}
	if a.tls == nil && o.Config.Gateway.CAFile != "" {
		pem, err := os.ReadFile(o.Config.Gateway.CAFile)
		if err != nil {
			return nil, fmt.Errorf("gateway.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("gateway.ca_file: no certificates in %s", o.Config.Gateway.CAFile)
		}
		a.tls = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	if a.tls == nil {
		a.tls = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if sn := o.Config.Gateway.ServerName; sn != "" {
		a.tls = a.tls.Clone()
		a.tls.ServerName = sn
	}
	a.static = staticServices(o.Config.Services)
	return a, nil
}

// SetDiscovered replaces the set of discovered services; the agent
// re-registers its full set with the gateway.
func (a *Agent) SetDiscovered(svcs []Service) {
	a.mu.Lock()
	a.discovered = append([]Service(nil), svcs...)
	a.notifyLocked()
	a.mu.Unlock()
}

// notifyLocked tells every session that the desired set changed. The
// caller holds a.mu.
func (a *Agent) notifyLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// changes returns the channel closed at the next change of the desired
// set. A session takes it before reading the set, so that no change
// between the two is missed.
func (a *Agent) changes() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.changed
}

// desired merges static and discovered services. A discovered service with
// the id of a static one is ignored (static wins) and logged.
func (a *Agent) desired() []Service {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]Service, 0, len(a.static)+len(a.discovered))
	seen := map[protocol.ServiceKey]bool{}
	for _, s := range a.static {
		seen[s.Key()] = true
		out = append(out, s)
	}
	for _, s := range a.discovered {
		if seen[s.Key()] {
			a.log.Warn("discovered service ignored: a static service has the same id", "service", s.ID, "protocol", s.Protocol)
			continue
		}
		seen[s.Key()] = true
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].ID != out[j].ID {
			return out[i].ID < out[j].ID
		}
		return out[i].Protocol < out[j].Protocol
	})
	return out
}

// Metrics returns the agent's metrics, for the discovery source to update
// the watcher metrics.
func (a *Agent) Metrics() *metrics.Agent { return a.metrics }

// Ready reports whether the tunnel is up and the services are registered.
func (a *Agent) Ready() bool { return a.live.Load() > 0 && a.registered.Load() }

// Endpoints returns the endpoints of the last register_ack.
func (a *Agent) Endpoints() []Endpoint {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]Endpoint(nil), a.endpoints...)
}

// MetricsAddr returns the metrics server's address, or nil.
func (a *Agent) MetricsAddr() net.Addr {
	if a.metricsLn == nil {
		return nil
	}
	return a.metricsLn.Addr()
}

// StartMetrics binds the metrics server (/metrics, /healthz, /readyz).
func (a *Agent) StartMetrics() error {
	if a.cfg.Metrics.Listen == "" || a.metricsLn != nil {
		return nil
	}
	ln, err := net.Listen("tcp", a.cfg.Metrics.Listen)
	if err != nil {
		return fmt.Errorf("agent: metrics.listen: %w", err)
	}
	a.metricsLn = ln
	a.log.Info("metrics listening", "addr", ln.Addr().String(), "paths", "/metrics /healthz /readyz")
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.gath, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		switch {
		case a.live.Load() == 0:
			http.Error(w, "not ready: tunnel to the gateway is down", http.StatusServiceUnavailable)
		case !a.registered.Load():
			http.Error(w, "not ready: services not registered yet", http.StatusServiceUnavailable)
		default:
			w.Write([]byte("ok\n"))
		}
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	return nil
}

// Run connects to the gateway and keeps the tunnel up until ctx ends,
// reconnecting with exponential backoff and jitter. With several
// connections it keeps that many sessions, each to a distinct replica
// (sessions.go).
func (a *Agent) Run(ctx context.Context) error {
	if err := a.StartMetrics(); err != nil {
		return err
	}
	defer func() {
		if a.metricsLn != nil {
			a.metricsLn.Close()
		}
	}()
	n := a.connections(ctx)
	if n == 1 {
		return a.runSlot(ctx, 0, n)
	}
	a.log.Info("keeping sessions to several gateway replicas", "connections", n, "urls", a.cfg.Gateway.GatewayURLs())
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() { errs <- a.runSlot(ctx, i, n) }()
	}
	var first error
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil && first == nil {
			// Only an auth refusal with ExitOnAuthFailure ends a slot
			// early: it ends them all.
			first = err
			cancel()
		}
	}
	return first
}

// runSlot keeps slot i of n connected until ctx ends.
func (a *Agent) runSlot(ctx context.Context, i, n int) error {
	b := backoff{initial: 500 * time.Millisecond, max: 30 * time.Second}
	sessions := 0
	for ctx.Err() == nil {
		start := time.Now()
		err := a.runOnce(ctx, i, n, &sessions)
		if ctx.Err() != nil {
			break
		}
		if a.exitOnAuth && errors.Is(err, ErrAuthRejected) {
			return err
		}
		if time.Since(start) >= time.Minute {
			b.reset() // a healthy minute: the next failure starts over
		}
		delay := retryDelay(err, &b)
		if n > 1 {
			a.log.Warn("tunnel down; reconnecting", "connection", i, "err", err, "retry_in", delay.Round(time.Millisecond))
		} else {
			a.log.Warn("tunnel down; reconnecting", "err", err, "retry_in", delay.Round(time.Millisecond))
		}
		select {
		case <-time.After(delay):
		case <-ctx.Done():
		}
	}
	return nil
}

// runOnce connects slot i of n, serves one session and returns why it
// ended. sessions counts the slot's sessions: every one after its first is
// a reconnect.
func (a *Agent) runOnce(ctx context.Context, i, n int, sessions *int) error {
	tgt := a.chooseTarget(ctx, i)
	tun, err := a.connect(ctx, tgt, a.slotInstance(i, n))
	if err != nil {
		return err
	}
	defer tun.Close()
	hello := tun.Hello()
	if other, dup := a.claimReplica(i, hello.Replica); dup {
		// Two sessions through one load balancer reached one replica:
		// this one goes, and the slot tries again later.
		tun.CloseWithError(protocol.CodeShutdown, "this agent already holds a session to this replica")
		return fmt.Errorf("%w: %s (connection %d holds it)", errSameReplica, hello.Replica, other)
	}
	defer a.releaseReplica(i)
	*sessions++
	a.sessionUp(tun.Protocol(), *sessions > 1)
	defer a.sessionDown()
	a.log.Info("tunnel up", "gateway", tgt.String(), "agent", hello.Agent, "replica", hello.Replica,
		"protocol", tun.Protocol(), "heartbeat", hello.HeartbeatInterval())

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go a.acceptLoop(sctx, tun)

	s := &session{a: a, tun: tun}
	changed := a.changes()
	if err := s.register(); err != nil {
		return err
	}
	return s.run(ctx, changed)
}

// connect dials the gateway at tgt and completes the tunnel handshake as
// instance.
func (a *Agent) connect(ctx context.Context, tgt target, instance string) (*tunnel.Session, error) {
	ws, err := tunnel.Dial(ctx, tgt.url, tunnel.DialOptions{
		Token: a.cfg.Gateway.Token, TLS: a.tls, NetDial: a.dialer(tgt), UserAgent: "portway-agent/" + a.version,
	})
	if err != nil {
		var de *tunnel.DialError
		if errors.As(err, &de) && de.StatusCode == http.StatusUnauthorized {
			return nil, ErrAuthRejected
		}
		return nil, tlsHint(err)
	}
	tun, err := tunnel.Client(ctx, ws, tunnel.Config{Protocol: a.cfg.Gateway.Protocol, Logger: a.log, Instance: instance})
	if err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	return tun, nil
}

// sessionUp records a new tunnel session speaking proto in readiness and
// the metrics.
func (a *Agent) sessionUp(proto string, reconnect bool) {
	if reconnect {
		a.metrics.Reconnects.Inc()
	}
	a.upMu.Lock()
	defer a.upMu.Unlock()
	a.live.Add(1)
	a.metrics.Connected.Set(1)
	a.metrics.Protocol.Reset()
	a.metrics.Protocol.WithLabelValues(proto).Set(1)
}

// sessionDown records that a session ended: with none left, not ready
// until the next one has registered.
func (a *Agent) sessionDown() {
	a.upMu.Lock()
	defer a.upMu.Unlock()
	if a.live.Add(-1) > 0 {
		return
	}
	a.registered.Store(false)
	a.metrics.Connected.Set(0)
}

// session is the agent's side of one tunnel session: it registers the
// desired services and applies the gateway's answers. Every register
// carries the next sequence number, and only the register_ack of the last
// one sent is applied, against the services that register listed.
type session struct {
	a   *Agent
	tun *tunnel.Session
	// seq numbers the last register sent; sent are its services in order
	// (the register_ack answers them by index).
	seq  uint64
	sent []Service
}

// register sends the desired services and makes them the set streams may
// be opened for.
func (s *session) register() error {
	svcs := s.a.desired()
	if limit := s.tun.Hello().MaxServices; len(svcs) > limit {
		s.a.log.Warn("more services than the gateway allows; the rest are refused", "services", len(svcs), "max_services", limit)
	}
	s.seq++
	msg := &protocol.Register{Seq: s.seq, Services: make([]protocol.Service, len(svcs))}
	for i := range svcs {
		msg.Services[i] = s.a.wireService(&svcs[i])
	}
	s.a.setActive(svcs)
	s.sent = svcs
	return s.tun.Send(msg)
}

// run re-registers when the desired set changes and applies register
// acks, until the session or ctx ends.
func (s *session) run(ctx context.Context, changed <-chan struct{}) error {
	rtt := time.NewTicker(s.tun.Hello().HeartbeatInterval())
	defer rtt.Stop()
	// Changes are debounced so a burst of discovery updates costs one
	// register message.
	var debounce <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			s.tun.CloseWithError(protocol.CodeShutdown, "agent shutting down")
			return ctx.Err()
		case <-s.tun.Done():
			return s.tun.Err()
		case <-changed:
			changed = s.a.changes()
			debounce = time.After(100 * time.Millisecond)
		case <-debounce:
			debounce = nil
			if err := s.register(); err != nil {
				return err
			}
		case <-rtt.C:
			s.a.metrics.HeartbeatRTT.Set(s.tun.RTT().Seconds())
		case m := <-s.tun.Control():
			// An ack of an earlier register answers a set that is no
			// longer the one sent.
			if ack, ok := m.(*protocol.RegisterAck); ok && ack.Seq == s.seq {
				s.a.handleAck(ack, s.sent)
			}
		}
	}
}

// wireService is the register form of a service.
func (a *Agent) wireService(s *Service) protocol.Service {
	w := protocol.Service{ID: s.ID, Protocol: s.Protocol, Port: s.Port, PublicPort: s.PublicPort, Mode: s.Mode,
		ProxyProtocol: s.ProxyProtocol, AllowCIDRs: s.Policy.AllowCIDRs, DenyCIDRs: s.Policy.DenyCIDRs,
		MaxConnectionsPerSource:    s.Policy.MaxConnectionsPerSource,
		MaxConnectionRatePerSource: s.Policy.MaxConnectionRatePerSource,
		ConnectionBurstPerSource:   s.Policy.ConnectionBurstPerSource}
	idle := s.IdleTimeout
	if s.Protocol == protocol.KindUDP {
		if idle == 0 {
			idle = a.cfg.Tunnels.UDP.SessionTimeout.Duration
		}
		w.MaxDatagram = a.cfg.Tunnels.UDP.BufferSize
	} else if idle == 0 {
		idle = a.cfg.Tunnels.TCP.IdleTimeout.Duration
	}
	w.IdleTimeoutMS = idle.Milliseconds()
	return w
}

// setActive makes svcs the set streams may be opened for: the agent dials
// only backends it registered itself.
func (a *Agent) setActive(svcs []Service) {
	a.mu.Lock()
	defer a.mu.Unlock()
	next := make(map[protocol.ServiceKey]*Service, len(svcs))
	for i := range svcs {
		s := svcs[i]
		next[s.Key()] = &s
		if a.limits[s.Key()] == nil {
			a.limits[s.Key()] = &limiter{}
		}
	}
	for k := range a.active {
		if next[k] == nil {
			delete(a.limits, k)
			delete(a.logged, k)
			a.metrics.ForgetService(k.ID)
		}
	}
	a.active = next
}

func (a *Agent) lookup(k protocol.ServiceKey) (*Service, *limiter) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.active[k], a.limits[k]
}

func (a *Agent) handleAck(ack *protocol.RegisterAck, sent []Service) {
	eps := make([]Endpoint, 0, len(ack.Endpoints))
	ok := 0
	a.mu.Lock()
	for i, e := range ack.Endpoints {
		if i >= len(sent) || sent[i].ID != e.ID {
			continue
		}
		ep := Endpoint{Service: sent[i], Address: e.Address, Error: e.Error}
		eps = append(eps, ep)
		key := sent[i].Key()
		line := e.Error
		if e.Error == "" {
			ok++
			line = e.Address
		}
		if a.logged[key] == line {
			continue // unchanged: logged already
		}
		a.logged[key] = line
		if e.Error != "" {
			a.log.Error("gateway refused service", "service", e.ID, "protocol", e.Protocol, "reason", e.Error)
		} else {
			a.log.Info("endpoint ready", "service", e.ID, "protocol", e.Protocol, "endpoint", e.Address,
				"connect", ClientCommand(sent[i].Protocol, sent[i].Port, e.Address))
		}
	}
	a.endpoints = eps
	a.mu.Unlock()
	a.metrics.Registered.Set(float64(ok))
	a.registered.Store(true)
	if a.onEP != nil {
		a.onEP(eps)
	}
}

// retryDelay is how long to wait before the next connection attempt after
// err: what the gateway asked for with Retry-After (a 503 while it is busy
// with other agents' handshakes), plus up to as much again at random so
// that agents turned away together do not come back together; otherwise
// the next step of b. A deferred attempt does not advance b: the gateway
// is up and said when to come back.
func retryDelay(err error, b *backoff) time.Duration {
	var de *tunnel.DialError
	if errors.As(err, &de) && de.StatusCode == http.StatusServiceUnavailable && de.RetryAfter > 0 {
		return de.RetryAfter + rand.N(de.RetryAfter+1)
	}
	return b.next()
}

type backoff struct {
	initial, max, cur time.Duration
}

func (b *backoff) reset() { b.cur = 0 }

// next returns the next delay: doubling from initial up to max, with
// "equal jitter" (half fixed, half random) so agents don't reconnect in
// lockstep after a gateway restart.
func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.initial
	} else {
		b.cur = min(2*b.cur, b.max)
	}
	half := b.cur / 2
	return half + rand.N(half+1)
}
