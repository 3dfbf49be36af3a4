// Package gateway is portway's public side: it authenticates agents on
// /v1/tunnel, keeps one live tunnel session per agent instance (several
// processes may share an agent identity), allocates public ports
// per (agent, service), opens public TCP and UDP listeners for registered
// services and carries every client connection or UDP session through the
// owning agent's tunnel. It also serves the admin API, whose response
// types live in internal/adminapi.
//
// # Types
//
// An agentState (agents.go) is one agent identity's data: its live
// instances (one session each, keyed by the instance id of the agent's
// hello ack) and its registered services; the Gateway's methods (register,
// detach, shutdownAgent, withdraw) act on it. Each registered service is a
// publicService (service.go), one type per kind: a tcpService (tcp.go)
// owns a *net.TCPListener and relays each connection over a stream of its
// own; a udpService (udp.go) owns a *net.UDPConn and keeps one session,
// and one stream, per client address. Both share a serviceBase, which
// reads its holders (the instances that registered it) without a lock
// and reaches the Gateway only to read its current configuration. ports
// (ports.go) allocates public ports in the allocation store and leaves the
// sockets to its caller; presence.go publishes agent sessions to the other
// replicas. In a cluster with a cluster.token, a fabric (forward.go) makes
// the replica serve every allocated port: mirror.go binds the ports whose
// agent has no session here (mirrors), forward.go sends what arrives on
// them to a replica holding a session of the agent, over a link (link.go:
// an authenticated WebSocket carrying yamux, on /v1/cluster), and serves
// the streams other replicas forward to this one.
//
// # Locks
//
// The order, outermost first, is:
//
//	agentState.regMu → agentState.mu → ports.mu
//	Gateway.counts.mu → Gateway.mu, agentState.mu
//	Gateway.connectedCount.mu → Gateway.mu
//	Gateway.reloadMu → agentState.mu, Gateway.mu, authLimiter.mu
//
// Every other lock is a leaf, never held while taking another of this
// package's locks: Gateway.mu (the agents map and the presence: callers
// copy what they need and unlock before touching an agent), udpSessions.mu
// (one public UDP port's clients), sourceTable.mu (one service's
// per-source counts, access.go), authLimiter.mu, admission.mu and fabric.mu (the cluster
// view, links and mirrors, forward.go: it is taken by the watches, the
// forwarding path and a registration's bind, never while another lock of
// this package is held, and under it nothing is called but local socket
// binds for mirrors; mirrors are closed and links ended after unlocking).
// A service's close calls into the fabric (its port goes back to the
// mirrors) and is therefore made with no lock held, as it already was.
// Nothing here calls out of the package under a lock except into internal/metrics' vectors
// and the certificate expiry gauge, none of which calls back.
//
// The allocation store (internal/store: a file, or etcd shared with other
// replicas) and the cluster presence are called with no lock held but
// agentState.regMu, which serialises one agent's registrations end to end
// and is taken by nothing else: a registration decides under
// agentState.mu, claims and binds without it (ports.mu is taken only
// around the decisions, never during a store call or a bind), and takes
// agentState.mu again to install what it opened. Store writes decided
// under ports.mu (withdrawals, evictions, expiries) are collected there
// and made after it is released, each compared by the revision it was
// decided on.
//
// Gateway.reloadMu serialises reloads' changes and is taken by nothing
// else; a reload reads its files before taking it and logs after
// releasing it. The reloadable configuration (tokens, limits) and the
// served certificate are atomic pointers, swapped whole by a reload and
// read without a lock.
//
// What must not wait for a registration reads without a lock: a service's
// holders are an atomic pointer to an immutable slice, replaced whole
// under agentState.mu, its spec an atomic pointer, and each instance's
// count of open connections an atomic counter. A new connection or UDP
// session goes to the holder with the fewest open ones (ties in turn). Closing
// listeners and UDP sessions, forgetting metrics and store writes happen
// after unlocking: register, detach and shutdownAgent collect what to close
// under agentState.mu and close it afterwards. The liveness check
// (/healthz) takes Gateway.mu, each agentState.mu and ports.mu with a
// bounded wait and fails when one of them stays held.
package gateway

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/portway/portway/internal/cluster"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/store"
	"github.com/portway/portway/internal/tunnel"
)

// Options are the dependencies of a Gateway.
type Options struct {
	Config *config.GatewayFile
	Logger *slog.Logger
	// Registry receives the gateway's metrics; Gatherer serves them on
	// /metrics. Both default to a new registry.
	Registry prometheus.Registerer
	Gatherer prometheus.Gatherer
	// Store overrides the allocation store chosen by Config (the state
	// file, or etcd with a cluster: block).
	Store   store.Store
	Version string
}

// Gateway is a running gateway.
type Gateway struct {
	cfg      *config.GatewayFile
	log      *slog.Logger
	metrics  *metrics.Gateway
	gatherer prometheus.Gatherer
	version  string
	// replica names this gateway process in its hello (replicaID).
	replica  string
	ports    *ports
	limiter  *authLimiter
	upgrader *websocket.Upgrader

	// cfg is the configuration the gateway started with: what needs a
	// restart (listeners, port range, state file) is read from it. live
	// holds what a reload replaces; read it with conf.
	live         atomic.Pointer[live]
	cert         atomic.Pointer[servedCert]
	certNotAfter prometheus.Gauge
	reloadMu     sync.Mutex

	// udp is the queue budget every public UDP port draws on.
	udp udpBudget

	mu     sync.Mutex
	agents map[string]*agentState
	// reloaded is closed and replaced by each reload (under mu).
	reloaded chan struct{}

	// admission bounds the agent handshakes in progress (admitHandshake).
	admission admission
	// counts and connectedCount coalesce the walks over every agent that
	// keep the services and connected agents gauges (coalesced).
	counts, connectedCount coalesced

	ready atomic.Bool
	// etcdLost is set while this replica has lost its etcd lease (etcd
	// unreachable from here, or without quorum) and cleared when it
	// rejoins: /readyz fails and agents new to this replica are refused.
	etcdLost  atomic.Bool
	tunnelLn  net.Listener
	adminLn   net.Listener
	servers   []*http.Server
	wg        sync.WaitGroup
	closeOnce sync.Once
	done      chan struct{}
	// stateRefresh is how often live allocations are stamped again in
	// the store (refreshState).
	stateRefresh time.Duration
	// hdrTimeout bounds the wait for a PROXY protocol header from a
	// proxy_protocol_from source (proxyHeaderTimeout; shorter in tests).
	hdrTimeout time.Duration
	// storeTimeout bounds the store calls of one registration.
	storeTimeout time.Duration
	// etcd is the cluster's etcd client (nil without a cluster: block),
	// closed by Close; presence publishes this replica's agent sessions
	// (cluster.Noop without one).
	etcd     *clientv3.Client
	presence cluster.Presence
	// fabric serves every allocated port and forwards between replicas
	// (forward.go); nil without a cluster: block with a cluster.token.
	fabric *fabric
}

// agentToken is one accepted token of an agent: an agent in the middle of
// a rotation has two.
type agentToken struct {
	name        string
	sum         [sha256.Size]byte
	maxServices int
}

// New validates the options and prepares a gateway; Start begins serving.
func New(o Options) (*Gateway, error) {
	cfg := o.Config
	if cfg == nil {
		return nil, errors.New("gateway: no config")
	}
	if err := cfg.Validate(); err != nil {
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
	retention := store.Options{Retention: cfg.PortRetention.Duration}
	st := o.Store
	var etcd *clientv3.Client
	if cfg.Cluster != nil {
		var err error
		if etcd, err = cluster.NewEtcdClient(cfg.Cluster); err != nil {
			return nil, fmt.Errorf("gateway: %w", err)
		}
		if st == nil {
			st = store.NewEtcd(etcd, cfg.Cluster.Etcd.Prefix, retention)
		}
	}
	if st == nil {
		st = &store.File{Path: cfg.StateFile, Options: retention, OnWriteError: func(err error) {
			log.Error("saving port allocations; they are kept in memory", "state_file", cfg.StateFile, "err", err)
		}}
	}
	low, high := cfg.PortBounds()
	g := &Gateway{
		cfg:          cfg,
		log:          log,
		metrics:      metrics.NewGateway(reg),
		gatherer:     gath,
		version:      o.Version,
		replica:      replicaID(cfg.Cluster),
		ports:        newPorts(low, high, cfg.PortRetention.Duration, st),
		limiter:      newAuthLimiter(cfg.AuthFailuresPerMinute, time.Minute),
		agents:       map[string]*agentState{},
		reloaded:     make(chan struct{}),
		done:         make(chan struct{}),
		stateRefresh: stateRefreshInterval(cfg.PortRetention.Duration),
		hdrTimeout:   proxyHeaderTimeout,
		storeTimeout: storeTimeout,
		etcd:         etcd,
		presence:     cluster.Noop{},
	}
	if cfg.Cluster != nil {
		g.storeTimeout = cfg.Cluster.Etcd.RequestTimeout.Duration
		g.ports.shared = true
		if cfg.Cluster.Token != "" && etcd != nil {
			g.fabric = newFabric(g)
		}
	}
	g.ports.log = log
	g.ports.timeout = g.storeTimeout
	g.admission.now = time.Now
	g.live.Store(newLive(cfg))
	if cfg.TLS != nil {
		g.certNotAfter = metrics.NewCertificateExpiry(reg)
	}
	g.upgrader = tunnel.NewUpgrader(cfg.HandshakeTimeout.Duration)
	g.limitRetained()
	return g, nil
}

// Start loads the state, binds the agent endpoint (and the admin server)
// and serves them in the background.
func (g *Gateway) Start(ctx context.Context) error {
	lctx, cancel := context.WithTimeout(ctx, g.storeTimeout)
	err := g.ports.load(lctx)
	cancel()
	if err != nil {
		return fmt.Errorf("gateway: load state: %w", err)
	}
	g.metrics.PortAllocations.Set(float64(g.ports.count()))
	ln, err := net.Listen("tcp", g.cfg.Listen)
	if err != nil {
		return fmt.Errorf("gateway: listen: %w", err)
	}
	// Under TLS: the PROXY protocol header comes before the handshake.
	ln = &proxyListener{Listener: ln, conf: g.conf, timeout: g.hdrTimeout, refused: func() {
		g.metrics.AuthFailures.WithLabelValues(metrics.ReasonProxyHeader.String()).Inc()
	}}
	if g.cfg.TLS != nil {
		cert, err := loadCertificate(g.cfg.TLS)
		if err != nil {
			ln.Close()
			return fmt.Errorf("gateway: %w", err)
		}
		g.setCertificate(cert, g.cfg.TLS.CertFile)
		g.checkCertificate()
		ln = tls.NewListener(tunnel.CorkListener(ln), g.serverTLS())
		// Daily too, so a certificate nobody renews is noticed in the log.
		g.every(24*time.Hour, g.checkCertificate)
	}
	g.tunnelLn = ln
	mux := http.NewServeMux()
	mux.HandleFunc(tunnel.Path, g.handleTunnel)
	mux.HandleFunc(clusterPath, g.handleCluster)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "portway gateway: agents connect to "+tunnel.Path, http.StatusNotFound)
	})
	g.serve(ln, mux)

	if g.cfg.Admin.Listen != "" {
		aln, err := net.Listen("tcp", g.cfg.Admin.Listen)
		if err != nil {
			g.Close()
			return fmt.Errorf("gateway: admin listen: %w", err)
		}
		g.adminLn = aln
		g.serve(aln, g.adminHandler())
	}
	if g.cfg.PortRetention.Duration > 0 {
		g.every(g.stateRefresh, g.refreshState)
	}
	if err := g.joinCluster(ctx); err != nil {
		g.Close()
		return err
	}
	if g.fabric != nil {
		g.fabric.start()
	}
	g.ready.Store(true)
	scheme := "wss"
	if g.cfg.TLS == nil {
		scheme = "ws"
	}
	g.log.Info("gateway listening", "agents_url", scheme+"://"+ln.Addr().String()+tunnel.Path,
		"public_host", g.cfg.PublicHost, "port_range", g.cfg.PortRange, "protocols", g.cfg.Protocols)
	return nil
}

func (g *Gateway) serve(ln net.Listener, h http.Handler) {
	srv := &http.Server{
		Handler: h,
		// Slow clients must not hold connections open before they have
		// even been authenticated.
		ReadHeaderTimeout: g.cfg.HandshakeTimeout.Duration,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(g.log.Handler(), slog.LevelDebug),
	}
	g.servers = append(g.servers, srv)
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		srv.Serve(ln)
	}()
}

// Run starts the gateway and serves until ctx ends.
func (g *Gateway) Run(ctx context.Context) error {
	if err := g.Start(ctx); err != nil {
		return err
	}
	<-ctx.Done()
	g.Close()
	return nil
}

// TunnelAddr returns the address agents connect to.
func (g *Gateway) TunnelAddr() net.Addr { return g.tunnelLn.Addr() }

// AdminAddr returns the admin server's address, or nil.
func (g *Gateway) AdminAddr() net.Addr {
	if g.adminLn == nil {
		return nil
	}
	return g.adminLn.Addr()
}

// track registers a session goroutine with the gateway's wait group, unless
// the gateway is closing. Hijacked WebSocket connections are not tracked by
// http.Server, so Close waits for them here.
func (g *Gateway) track() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.done:
		return false
	default:
		g.wg.Add(1)
		return true
	}
}

// Close stops serving, ends every session and closes every public listener.
func (g *Gateway) Close() {
	g.closeOnce.Do(func() {
		g.ready.Store(false)
		g.mu.Lock()
		close(g.done)
		g.mu.Unlock()
		for _, s := range g.servers {
			s.Close()
		}
		if g.fabric != nil {
			g.fabric.stop()
		}
		for _, a := range g.agentList() {
			g.shutdownAgent(a)
		}
		g.wg.Wait()
		g.leaveCluster()
	})
}

// limitRetained gives the port allocator each agent's max_retained_ports
// (as of the last reload) and reports its evictions.
func (g *Gateway) limitRetained() {
	g.ports.maxRetained = func(agent string) int {
		l := g.live.Load()
		if n, ok := l.retained[agent]; ok {
			return n
		}
		return l.retainedDefault
	}
	g.ports.onEvict = func(ev []eviction) {
		for _, e := range ev {
			g.metrics.PortEvictions.WithLabelValues(e.reason.String()).Inc()
			g.log.Info("retained public port freed early", "agent", e.agent, "service", e.svc.String(),
				"port", e.port, "reason", e.reason.String())
		}
	}
}

// serverTLS is the agent endpoint's TLS config. Each handshake asks for
// the current certificate, so a reload swaps it for new handshakes while
// established sessions keep theirs.
func (g *Gateway) serverTLS() *tls.Config {
	return &tls.Config{
		GetCertificate: g.getCertificate,
		MinVersion:     tls.VersionTLS12,
		// TLS 1.2 suites limited to forward-secret AEAD ones; TLS 1.3
		// suites are not configurable and all fine.
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
	}
}

// authenticate maps a bearer token to an agent identity and the token it
// matched, by the token's SHA-256 (live.lookup says why that reveals
// nothing through timing).
func (g *Gateway) authenticate(header string) (agentToken, bool) {
	token, ok := strings.CutPrefix(header, "Bearer ")
	if !ok || token == "" {
		return agentToken{}, false
	}
	return g.live.Load().lookup(sha256.Sum256([]byte(token)))
}

func (g *Gateway) handleTunnel(w http.ResponseWriter, r *http.Request) {
	src := remoteIP(r.RemoteAddr)
	if !g.limiter.allowed(src) {
		g.metrics.AuthFailures.WithLabelValues(metrics.ReasonRateLimited.String()).Inc()
		w.Header().Set("Connection", "close")
		w.Header().Set("Retry-After", "60")
		http.Error(w, "too many failed authentication attempts", http.StatusTooManyRequests)
		return
	}
	agent, ok := g.authenticate(r.Header.Get("Authorization"))
	if !ok {
		reason := metrics.ReasonBadToken
		if r.Header.Get("Authorization") == "" {
			reason = metrics.ReasonNoToken
		}
		g.metrics.AuthFailures.WithLabelValues(reason.String()).Inc()
		if throttled := g.limiter.fail(src); throttled {
			g.log.Warn("throttling tunnel authentication attempts", "source", src, "limit_per_minute", g.conf().AuthFailuresPerMinute)
		} else {
			g.log.Warn("rejected tunnel connection", "source", src, "reason", reason)
		}
		// No keep-alive for a stranger: whatever follows is not parsed.
		w.Header().Set("Connection", "close")
		w.Header().Set("WWW-Authenticate", `Bearer realm="portway"`)
		http.Error(w, "unknown or missing agent token", http.StatusUnauthorized)
		return
	}
	if g.refuseNewAgent(agent.name) {
		w.Header().Set("Connection", "close")
		w.Header().Set("Retry-After", retryAfterSeconds)
		http.Error(w, "this gateway replica cannot reach etcd: connect to another replica", http.StatusServiceUnavailable)
		return
	}
	if !g.track() {
		http.Error(w, "gateway shutting down", http.StatusServiceUnavailable)
		return
	}
	handedOff := false
	defer func() {
		if !handedOff {
			g.wg.Done()
		}
	}()
	admittedAt, ok := g.admitHandshake(w)
	if !ok {
		return
	}
	admitted := true
	done := func() {
		if admitted {
			admitted = false
			g.handshakeDone(admittedAt)
		}
	}
	defer done()
	ws, err := g.upgrader.Upgrade(w, r, nil)
	if err != nil {
		g.log.Warn("tunnel upgrade failed", "agent", agent.name, "source", src, "err", err)
		return
	}
	cfg := g.conf()
	hello := &protocol.Hello{
		Version:             protocol.Version,
		Protocols:           cfg.Protocols,
		HeartbeatIntervalMS: cfg.HeartbeatInterval.Milliseconds(),
		MaxMessageSize:      cfg.MaxMessageSize,
		MaxServices:         agent.maxServices,
		StreamWindow:        cfg.StreamWindow,
		Agent:               agent.name,
		PublicHost:          g.cfg.PublicHost,
		Server:              g.version,
		Replica:             g.replica,
	}
	ctx, cancel := context.WithTimeout(r.Context(), g.cfg.HandshakeTimeout.Duration)
	sess, err := tunnel.Server(ctx, ws, hello, g.tunnelConfig())
	cancel()
	done()
	if err != nil {
		g.log.Warn("tunnel handshake failed", "agent", agent.name, "source", src, "err", err)
		return
	}
	// The session runs in a goroutine of its own and this handler
	// returns: the HTTP server then lets go of the connection's state and
	// of the handler's deep stack, which an idle agent would otherwise
	// hold for as long as it stays connected. The WebSocket keeps only
	// the server's two 4 KiB buffers (tunnel.NewUpgrader).
	handedOff = true
	remote := r.RemoteAddr
	go func() {
		defer g.wg.Done()
		g.runSession(agent, sess, remote)
	}()
}

func (g *Gateway) tunnelConfig() tunnel.Config {
	return tunnel.Config{
		MaxStreamWindow: g.conf().MaxStreamWindow,
		WriteTimeout:    10 * time.Second,
		Logger:          g.log,
	}
}

// runSession serves one agent session until it ends.
func (g *Gateway) runSession(tok agentToken, sess *tunnel.Session, remote string) {
	a := g.agent(tok)
	start := time.Now()
	in, old := a.attach(sess, remote)
	if old != nil {
		old.CloseWithError(protocol.CodeReplaced, "a newer session of this agent instance took over")
		g.log.Info("agent session replaced", "agent", a.name, "instance", in.id)
	}
	g.metrics.AgentSessions.WithLabelValues(a.name).Inc()
	g.countInstances(a)
	g.updateConnected()
	g.log.Info("agent connected", "agent", a.name, "instance", in.id, "remote", remote,
		"protocol", sess.Protocol(), "instances", a.live.Load())
	g.publishSession(a.name, in.id, sess)
	defer g.withdrawSession(a.name, in.id, sess)

	shutdown := g.done
	// A reload may have removed the token between authentication and
	// here: check once now, then after every reload.
	reloaded := g.tokenWatch()
	g.checkToken(tok, sess)
	// last is the session's latest registration, run again when a
	// service it was refused for a conflict is free (instance.retry).
	var last *protocol.Register
	for {
		select {
		case <-reloaded:
			reloaded = g.tokenWatch()
			g.checkToken(tok, sess)
		case m := <-sess.Control():
			if reg, ok := m.(*protocol.Register); ok {
				last = reg
				g.registerAside(a, sess, reg)
			}
		case <-in.retry:
			if last != nil {
				// The same seq: the agent applies it as the answer to
				// the registration it sent last.
				g.registerAside(a, sess, last)
			}
		case <-sess.Done():
			err := sess.Err()
			reason := endReason(err)
			g.metrics.SessionEnds.WithLabelValues(reason.String()).Inc()
			if g.detach(a, sess) {
				g.log.Info("agent disconnected", "agent", a.name, "instance", in.id, "reason", reason, "err", err,
					"duration", time.Since(start).Round(time.Millisecond))
			}
			g.updateConnected()
			return
		case <-shutdown:
			shutdown = nil
			sess.CloseWithError(protocol.CodeShutdown, "gateway shutting down")
		}
	}
}

// registerAside registers reg's services and answers the agent, in a
// goroutine of its own, and waits for it. Registration goes deep (opening
// listeners, saving state, logging) and its stack would otherwise stay
// with the session's goroutine, which then waits, mostly idle, for as long
// as the agent stays connected; a goroutine that ends gives its stack back.
func (g *Gateway) registerAside(a *agentState, sess *tunnel.Session, reg *protocol.Register) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		ack := g.register(a, sess, reg)
		if err := sess.Send(ack); err != nil {
			sess.Close()
		}
	}()
	<-done
}

// checkToken closes sess when the token it authenticated with is no longer
// configured (its agent or that token was removed by a reload).
func (g *Gateway) checkToken(tok agentToken, sess *tunnel.Session) {
	if g.live.Load().accepts(tok) {
		return
	}
	g.log.Info("closing agent session: its token was removed from the configuration", "agent", tok.name)
	sess.CloseWithError(protocol.CodeTokenRevoked, "the agent's token is no longer accepted")
}

func endReason(err error) metrics.Reason {
	var pe *tunnel.PeerError
	switch {
	case errors.As(err, &pe):
		return metrics.PeerReason(pe.Code)
	case errors.Is(err, tunnel.ErrPeerTimeout):
		return metrics.ReasonHeartbeatTimeout
	case errors.Is(err, tunnel.ErrProtocol):
		return metrics.ReasonProtocolViolation
	default:
		return metrics.ReasonClosed
	}
}

func (g *Gateway) agent(tok agentToken) *agentState {
	g.mu.Lock()
	defer g.mu.Unlock()
	a := g.agents[tok.name]
	if a == nil {
		a = newAgentState(tok.name, g.live.Load().maxServices(tok.name))
		g.agents[tok.name] = a
	}
	return a
}

// agentList returns the known agents; the caller may then lock each one.
func (g *Gateway) agentList() []*agentState {
	g.mu.Lock()
	defer g.mu.Unlock()
	agents := make([]*agentState, 0, len(g.agents))
	for _, a := range g.agents {
		agents = append(agents, a)
	}
	return agents
}

// updateConnected sets the connected agents gauge. Concurrent calls are
// coalesced (Gateway.connectedCount): it walks every agent.
func (g *Gateway) updateConnected() {
	g.connectedCount.do(func() error {
		n := 0
		for _, a := range g.agentList() {
			if a.connected() {
				n++
			}
		}
		g.metrics.AgentsConnected.Set(float64(n))
		return nil
	})
}

// replicaID names this gateway process for the agents' hello, so that an
// agent holding sessions to several replicas can notice two sessions that
// reached the same one. In a cluster it is cluster.replica_id, the name
// the presence records use. A single gateway uses the host name and a
// random suffix drawn at start, so two gateway processes on one host (or
// two containers with one host name) are told apart.
func replicaID(c *config.Cluster) string {
	if c != nil && c.ReplicaID != "" {
		return c.ReplicaID
	}
	var b [4]byte
	rand.Read(b[:])
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "gateway"
	}
	return host + "-" + hex.EncodeToString(b[:])
}

func remoteIP(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return host
}
