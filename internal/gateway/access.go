package gateway

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/proxyproto"
)

// Client sources on public ports: the allow/deny lists a service registers
// (within the operator's ceiling for its agent), the per-source limits, and
// the PROXY protocol header read from the load balancers listed in
// proxy_protocol_from.

const (
	// proxyHeaderTimeout bounds the wait for a PROXY protocol header from
	// a proxy_protocol_from source: a peer that sends half a header
	// holds its goroutine no longer (the specification suggests at least
	// 3 s, to cover a TCP retransmit).
	proxyHeaderTimeout = 5 * time.Second
	// maxSources bounds the per-source table of one service. A full
	// table is swept of idle entries; a source that still finds no room
	// is refused (source_limit), so a flood of spoofed UDP sources cannot
	// grow it.
	maxSources = 65536
	// sourceSweepEvery spaces the sweeps of a full table.
	sourceSweepEvery = 250 * time.Millisecond
)

// sourcePolicy is a service's source policy, parsed from its registered
// spec. It is immutable; a registration that changes it swaps it whole.
type sourcePolicy struct {
	allow, deny []netip.Prefix
	// maxOpen is max_connections_per_source (0: none); rate and burst the
	// new-connection token bucket per source (rate 0: none).
	maxOpen int
	rate    float64
	burst   float64
}

// limited reports whether the policy keeps per-source state.
func (p *sourcePolicy) limited() bool { return p.maxOpen > 0 || p.rate > 0 }

// checkService validates what an agent registered about svc's sources
// and PROXY protocol, against the operator's ceiling for the agent, and
// returns the parsed policy. The error is the service's register_ack error.
func checkService(svc *protocol.Service, ceil *config.Ceiling) (*sourcePolicy, error) {
	switch svc.ProxyProtocol {
	case config.ProxyProtocolOff, config.ProxyProtocolV2:
	case config.ProxyProtocolV1:
		if svc.Protocol == protocol.KindUDP {
			return nil, fmt.Errorf("proxy_protocol v1 has no datagram form (use v2 for UDP)")
		}
	default:
		return nil, fmt.Errorf("proxy_protocol %q is not v1 or v2", truncate(svc.ProxyProtocol, 16))
	}
	allow, err := config.ParseCIDRs(svc.AllowCIDRs)
	if err != nil {
		return nil, fmt.Errorf("allow_cidrs: %w", err)
	}
	deny, err := config.ParseCIDRs(svc.DenyCIDRs)
	if err != nil {
		return nil, fmt.Errorf("deny_cidrs: %w", err)
	}
	if ceil != nil && len(ceil.Allow) > 0 {
		for i, pf := range allow {
			if !config.PrefixWithin(pf, ceil.Allow) {
				return nil, fmt.Errorf("allow_cidrs %s reaches outside what the gateway allows this agent (agents[].allow_cidrs): an agent may narrow the allowed sources, not widen them", svc.AllowCIDRs[i])
			}
		}
	}
	sp := config.SourcePolicy{
		MaxConnectionsPerSource:    svc.MaxConnectionsPerSource,
		MaxConnectionRatePerSource: svc.MaxConnectionRatePerSource,
		ConnectionBurstPerSource:   svc.ConnectionBurstPerSource,
	}
	if lerr := sp.CheckLimits(); lerr != nil {
		return nil, lerr
	}
	return &sourcePolicy{
		allow: allow, deny: deny,
		maxOpen: sp.MaxConnectionsPerSource,
		rate:    sp.MaxConnectionRatePerSource,
		burst:   float64(sp.Burst()),
	}, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// allowed reports whether a source may reach the service: inside the
// operator's ceiling (ceil, nil for none) and the service's own lists.
// It runs on every accepted connection and allocates nothing.
func (p *sourcePolicy) allowed(a netip.Addr, ceil *config.Ceiling) bool {
	a = a.Unmap()
	if ceil != nil {
		if config.ContainsAddr(ceil.Deny, a) || (len(ceil.Allow) > 0 && !config.ContainsAddr(ceil.Allow, a)) {
			return false
		}
	}
	if config.ContainsAddr(p.deny, a) {
		return false
	}
	return len(p.allow) == 0 || config.ContainsAddr(p.allow, a)
}

// sourceTable counts each source's open connections and its new-connection
// token bucket, for one service. Its mu is a leaf lock: no other lock is
// held while taking it (the UDP path checks a new client's source between
// two holds of udpSessions.mu, not under it).
type sourceTable struct {
	mu        sync.Mutex
	m         map[netip.Addr]*sourceEntry
	lastSweep time.Time
}

type sourceEntry struct {
	open   int
	tokens float64
	last   time.Time // when tokens was last brought up to date
}

func newSourceTable() *sourceTable { return &sourceTable{m: map[netip.Addr]*sourceEntry{}} }

// admit counts a new connection from a under p's limits and reports
// whether it may proceed; a true answer is matched by one release.
func (t *sourceTable) admit(a netip.Addr, p *sourcePolicy, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[a]
	if e == nil {
		if len(t.m) >= maxSources {
			t.sweep(p, now)
			if len(t.m) >= maxSources {
				return false
			}
		}
		e = &sourceEntry{tokens: p.burst, last: now}
		t.m[a] = e
	}
	if p.rate > 0 {
		e.tokens = min(p.burst, e.tokens+now.Sub(e.last).Seconds()*p.rate)
		e.last = now
		if e.tokens < 1 {
			t.forgetIdle(a, e, p, now)
			return false
		}
	}
	if p.maxOpen > 0 && e.open >= p.maxOpen {
		return false
	}
	if p.rate > 0 {
		e.tokens--
	}
	e.open++
	return true
}

// release ends a connection admit counted.
func (t *sourceTable) release(a netip.Addr, p *sourcePolicy, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.m[a]; e != nil {
		e.open--
		t.forgetIdle(a, e, p, now)
	}
}

// forgetIdle drops e when it holds nothing a fresh entry would not: no
// open connection and a full bucket.
func (t *sourceTable) forgetIdle(a netip.Addr, e *sourceEntry, p *sourcePolicy, now time.Time) {
	if e.open > 0 {
		return
	}
	if p.rate > 0 && e.tokens+now.Sub(e.last).Seconds()*p.rate < p.burst {
		return
	}
	delete(t.m, a)
}

// sweep drops the idle entries of a full table, at most once per
// sourceSweepEvery, so that a table full of live entries costs one scan
// per interval rather than one per refused source. The caller holds t.mu.
func (t *sourceTable) sweep(p *sourcePolicy, now time.Time) {
	if now.Sub(t.lastSweep) < sourceSweepEvery {
		return
	}
	t.lastSweep = now
	for a, e := range t.m {
		t.forgetIdle(a, e, p, now)
	}
}

// size returns the number of sources tracked.
func (t *sourceTable) size() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

// sourceGate is the per-service state of the source checks: the policy,
// the per-source table, the denied count and the rate limit of the log
// line about refused sources.
type sourceGate struct {
	policy   atomic.Pointer[sourcePolicy]
	table    *sourceTable
	denied   atomic.Int64
	limited  atomic.Int64
	lastWarn atomic.Int64 // unix nanoseconds
}

// warnNow reports whether a rate-limited warning may be logged now: at
// most one per second per service.
func (g *sourceGate) warnNow() bool {
	now := time.Now().UnixNano()
	last := g.lastWarn.Load()
	return now-last >= int64(time.Second) && g.lastWarn.CompareAndSwap(last, now)
}

// admitSource decides whether a new connection or UDP session from src
// may proceed, and returns ReasonNone or why not (ReasonDenied,
// ReasonSourceLimit). On ReasonNone with a limited policy the caller
// calls releaseSource when the connection ends. It counts and logs
// refusals itself, through count.
func (b *serviceBase) admitSource(src netip.Addr, count func(metrics.Reason)) (metrics.Reason, *sourcePolicy) {
	p := b.gate.policy.Load()
	if !p.allowed(src, b.conf().Ceiling(b.agent)) {
		b.gate.denied.Add(1)
		count(metrics.ReasonDenied)
		if b.gate.warnNow() {
			b.log.Warn("source not allowed; refused", "agent", b.agent, "service", b.key.String(), "source", src)
		}
		return metrics.ReasonDenied, nil
	}
	if !p.limited() {
		return metrics.ReasonNone, nil
	}
	if !b.gate.table.admit(src.Unmap(), p, time.Now()) {
		b.gate.limited.Add(1)
		count(metrics.ReasonSourceLimit)
		if b.gate.warnNow() {
			b.log.Warn("source over its per-source limit; refused", "agent", b.agent, "service", b.key.String(), "source", src,
				"max_connections_per_source", p.maxOpen, "max_connection_rate_per_source", p.rate)
		}
		return metrics.ReasonSourceLimit, nil
	}
	return metrics.ReasonNone, p
}

// releaseSource ends what admitSource counted (p is what it returned;
// nil: nothing to release).
func (b *serviceBase) releaseSource(src netip.Addr, p *sourcePolicy) {
	if p != nil {
		b.gate.table.release(src.Unmap(), p, time.Now())
	}
}

// addrPortOf converts a net.Addr of a TCP or UDP socket, unmapping
// IPv4-mapped addresses (an IPv4 client on a dual-stack listener).
func addrPortOf(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	default:
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// readProxyHeader reads the PROXY protocol header a proxy_protocol_from
// source must send first, within timeout. It returns the
// client's and the public endpoint's addresses the header carries, or
// client and local unchanged for a LOCAL or UNKNOWN header (the
// balancer's own health checks), as the specification says.
func readProxyHeader(c net.Conn, client, local netip.AddrPort, timeout time.Duration) (netip.AddrPort, netip.AddrPort, error) {
	// Setting a deadline fails only on a closed connection (net.Pipe's
	// also once its peer closed), whose reads then fail by themselves: the
	// header read reports that, and the data after a whole header is
	// still the caller's to read.
	c.SetReadDeadline(time.Now().Add(timeout))
	h, err := proxyproto.Read(c)
	if err != nil {
		return client, local, fmt.Errorf("reading PROXY protocol header from %s: %w", client, err)
	}
	c.SetReadDeadline(time.Time{})
	if !h.HasAddrs() {
		return client, local, nil
	}
	src, dst := h.Source, h.Destination
	return netip.AddrPortFrom(src.Addr().Unmap(), src.Port()), netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port()), nil
}

// proxyListener wraps the agent endpoint's listener: a connection from a
// proxy_protocol_from source (read from the current configuration, so a
// reload applies to the next connection) must start with a PROXY protocol
// header, whose source then stands for the peer (RemoteAddr: the
// auth-failure limiter and the logs see the real agent address). Accept
// does not read: the header is read on the connection's own goroutine, the
// first time RemoteAddr or Read is called (net/http asks for RemoteAddr
// first thing, before the TLS handshake).
type proxyListener struct {
	net.Listener
	conf    func() *config.GatewayFile
	timeout time.Duration // for the header
	// refused counts the connections whose header was missing or invalid.
	refused func()
}

// Accept implements net.Listener.
func (l *proxyListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	peer := addrPortOf(c.RemoteAddr())
	if !l.conf().ProxyProtocolFromAddr(peer.Addr()) {
		return c, nil
	}
	return &proxyConn{Conn: c, peer: peer, timeout: l.timeout, refused: l.refused}, nil
}

// proxyConn is a connection from a proxy_protocol_from source whose
// header is read on first use.
type proxyConn struct {
	net.Conn
	peer    netip.AddrPort
	timeout time.Duration
	refused func()
	once    sync.Once
	remote  net.Addr
	err     error
}

func (c *proxyConn) init() {
	c.once.Do(func() {
		client, _, err := readProxyHeader(c.Conn, c.peer, netip.AddrPort{}, c.timeout)
		c.remote = net.TCPAddrFromAddrPort(client)
		if err != nil {
			c.err = err
			if c.refused != nil {
				c.refused()
			}
		}
	})
}

// RemoteAddr returns the client's address from the PROXY protocol header.
func (c *proxyConn) RemoteAddr() net.Addr {
	c.init()
	return c.remote
}

// Read reads the client's data after the header; a connection without a
// valid header fails every read.
func (c *proxyConn) Read(b []byte) (int, error) {
	c.init()
	if c.err != nil {
		return 0, c.err
	}
	return c.Conn.Read(b)
}

// Write writes to the client; a connection without a valid header is
// answered nothing.
func (c *proxyConn) Write(b []byte) (int, error) {
	c.init()
	if c.err != nil {
		return 0, c.err
	}
	return c.Conn.Write(b)
}
