package gateway

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/store"
	"github.com/portway/portway/internal/tunnel"
)

// publicService is one registered service's public socket and what it
// carries. Each service kind has its own type: tcpService (tcp.go) and
// udpService (udp.go).
type publicService interface {
	// base returns what every kind shares: identity, port, spec, counts.
	base() *serviceBase
	// traffic fills in the service's totals for the admin API: bytes for
	// TCP, datagrams for UDP.
	traffic(si *adminapi.ServiceInfo)
	// close stops serving the public port and closes its socket. It
	// takes the service's own locks (a UDP port's sessions lock), so it
	// is called with no other lock of this package held.
	close()
}

// serviceBase is the part of a public service every kind shares. It holds
// what the service reads on its paths, not the gateway or the agent's
// state: the instances that carry it and the configuration reader.
type serviceBase struct {
	agent    string
	key      protocol.ServiceKey
	port     int
	endpoint string
	// spec is the service as last registered: a registration that keeps
	// the port replaces it in place (setSpec), its source policy with it.
	spec atomic.Pointer[protocol.Service]
	// gate holds the source checks' policy and per-source counts.
	gate sourceGate
	// hdrTimeout bounds the wait for a proxy_protocol_from source's PROXY
	// protocol header.
	hdrTimeout time.Duration
	// holders are the live instances of the owning agent that registered
	// the service, an immutable slice replaced whole under agentState.mu
	// and read without a lock: the per-connection and per-datagram paths
	// never wait for a registration.
	holders atomic.Pointer[[]*instance]
	// next breaks ties between the least busy holders in turn.
	next atomic.Uint64
	// fwd forwards what no holder can take to a replica holding a
	// session of the agent (nil: not in a cluster, refuse it). mirror
	// marks a port this replica serves only by forwarding.
	fwd    *fabric
	mirror bool
	// onStop runs after the socket is closed (the fabric's bookkeeping
	// of the ports registered services hold), with no lock held.
	onStop func()

	// conf returns the gateway's current configuration, for the limits a
	// reload may change (buffer_size, the UDP queue budgets).
	conf    func() *config.GatewayFile
	log     *slog.Logger
	metrics *metrics.Gateway
	active  prometheus.Gauge
	activeN atomic.Int64 // the same count, for the admin API
	total   prometheus.Counter

	done chan struct{}
	once sync.Once
}

func (b *serviceBase) base() *serviceBase { return b }

// pick chooses the instance for a new connection or UDP session: the
// holder with the fewest open ones, ties broken in turn starting from a
// rotating position, or nil when none is live. It takes no lock and
// allocates nothing. The caller counts its work on the instance
// (instance.active) while it lasts.
func (b *serviceBase) pick() *instance { return b.pickExcept(nil) }

// pickExcept is pick among the holders other than skip.
func (b *serviceBase) pickExcept(skip *instance) *instance {
	p := b.holders.Load()
	if p == nil {
		return nil
	}
	list := *p
	switch {
	case len(list) == 0:
		return nil
	case len(list) == 1 && list[0] != skip:
		return list[0]
	}
	start := int(b.next.Add(1) % uint64(len(list)))
	var best *instance
	var bestN int64
	for i := range list {
		in := list[(start+i)%len(list)]
		if in == skip {
			continue
		}
		if n := in.active.Load(); best == nil || n < bestN {
			best, bestN = in, n
		}
	}
	return best
}

// agentSession returns the session of the instance pick chose, with
// that instance, or nils. It takes no lock.
func (b *serviceBase) agentSession() (*tunnel.Session, *instance) {
	in := b.pick()
	if in == nil {
		return nil, nil
	}
	return in.sess, in
}

// maxOpenTries bounds how many instances one new connection tries.
const maxOpenTries = 3

// open opens a stream for h on in, counting it in in.active (the caller
// uncounts it when the stream ends). When that fails (typically an
// instance that is leaving, its session closing but not yet detached), it
// tries another holder, so a client is refused only when no instance
// takes it.
func (b *serviceBase) open(ctx context.Context, in *instance, h protocol.StreamHeader) (tunnel.Stream, *instance, error) {
	for try := 1; ; try++ {
		in.active.Add(1)
		st, err := in.sess.Open(ctx, h)
		if err == nil {
			return st, in, nil
		}
		in.active.Add(-1)
		next := b.pickExcept(in)
		if next == nil || try >= maxOpenTries || ctx.Err() != nil {
			return nil, nil, err
		}
		in = next
	}
}

// The holder set is changed under agentState.mu only, each change storing
// a new slice: readers of the old one are unaffected.

// setHolders replaces the holders.
func (b *serviceBase) setHolders(list []*instance) {
	if len(list) == 0 {
		b.holders.Store(nil)
		return
	}
	b.holders.Store(&list)
}

func (b *serviceBase) holderList() []*instance {
	if p := b.holders.Load(); p != nil {
		return *p
	}
	return nil
}

// addHolder adds in to the holders unless it is one already.
func (b *serviceBase) addHolder(in *instance) {
	cur := b.holderList()
	for _, h := range cur {
		if h == in {
			return
		}
	}
	b.setHolders(append(append(make([]*instance, 0, len(cur)+1), cur...), in))
}

// removeHolder takes in off the holders and returns how many remain.
func (b *serviceBase) removeHolder(in *instance) int {
	cur := b.holderList()
	next := make([]*instance, 0, len(cur))
	for _, h := range cur {
		if h != in {
			next = append(next, h)
		}
	}
	b.setHolders(next)
	return len(next)
}

// swapHolder puts in in old's place: a reconnect of the same instance.
func (b *serviceBase) swapHolder(old, in *instance) {
	cur := b.holderList()
	next := make([]*instance, len(cur))
	for i, h := range cur {
		if h == old {
			h = in
		}
		next[i] = h
	}
	b.setHolders(next)
}

// otherHolder returns a holder other than in, or nil.
func (b *serviceBase) otherHolder(in *instance) *instance {
	for _, h := range b.holderList() {
		if h != in {
			return h
		}
	}
	return nil
}

// stop closes done and runs closeSocket, once.
func (b *serviceBase) stop(closeSocket func()) {
	b.once.Do(func() {
		close(b.done)
		closeSocket()
		if b.onStop != nil {
			b.onStop()
		}
	})
}

func (b *serviceBase) enter() {
	b.active.Inc()
	b.activeN.Add(1)
}

func (b *serviceBase) leave() {
	b.active.Dec()
	b.activeN.Add(-1)
}

func (b *serviceBase) refuse(reason metrics.Reason) {
	b.metrics.Refusals.WithLabelValues(b.agent, b.key.ID, reason.String()).Inc()
}

// openTimeout bounds opening a stream (yamux blocks while the agent has
// too many unacknowledged opens).
const openTimeout = 10 * time.Second

// openService allocates svc's public port, binds it and starts serving it.
// The caller holds a.regMu but not a.mu: the allocation calls the store,
// bounded by ctx.
func (g *Gateway) openService(ctx context.Context, a *agentState, svc *protocol.Service, pol *sourcePolicy) (publicService, error) {
	if svc.Key().Kind == protocol.KindUDP {
		port, conn, err := bindPort(ctx, g.ports, a.name, svc, localBind(g.fabric, protocol.KindUDP, g.listenUDP))
		if err != nil {
			return nil, err
		}
		s := &udpService{
			serviceBase: g.newServiceBase(a.name, svc, pol, port,
				g.metrics.UDPActive.WithLabelValues(a.name, svc.ID), g.metrics.UDPSessions.WithLabelValues(a.name, svc.ID)),
			conn:     conn,
			budget:   &g.udp,
			sessions: newUDPSessions(),
			public:   g.publicUDP(addrPortOf(conn.LocalAddr())),
		}
		g.fabricHooks(s.serviceBase)
		go s.serve()
		return s, nil
	}
	port, ln, err := bindPort(ctx, g.ports, a.name, svc, localBind(g.fabric, protocol.KindTCP, g.listenTCP))
	if err != nil {
		return nil, err
	}
	s := &tcpService{
		serviceBase: g.newServiceBase(a.name, svc, pol, port,
			g.metrics.ConnActive.WithLabelValues(a.name, svc.ID), g.metrics.ConnTotal.WithLabelValues(a.name, svc.ID)),
		ln: ln,
	}
	g.fabricHooks(s.serviceBase)
	go s.serve()
	return s, nil
}

// localBind wraps a registered service's bind: in a cluster the fabric
// first closes the mirror serving the port (takeLocal) and keeps mirrors
// off it while the service holds it.
func localBind[L any](f *fabric, kind protocol.Kind, listen func(port int) (L, error)) func(port int) (L, error) {
	if f == nil {
		return listen
	}
	return func(port int) (L, error) {
		k := keyOf(kind, port)
		f.takeLocal(k)
		l, err := listen(port)
		if err != nil {
			f.dropLocal(k)
		}
		return l, err
	}
}

// fabricHooks makes a registered service forward what its holders cannot
// take, and give its port back to the mirrors when it closes.
func (g *Gateway) fabricHooks(b *serviceBase) {
	if f := g.fabric; f != nil {
		b.fwd = f
		k := keyOf(b.key.Kind, b.port)
		b.onStop = func() { f.dropLocal(k) }
	}
}

// openMirror binds a's port and serves it by forwarding: a's agent has no
// session here. The caller holds fabric.mu; binding is a local syscall.
func (g *Gateway) openMirror(a store.Allocation) (publicService, error) {
	svc := a.Spec
	pol, err := checkService(svc, g.conf().Ceiling(a.Agent))
	if err != nil {
		return nil, err
	}
	if a.Protocol == protocol.KindUDP {
		conn, err := g.listenUDP(a.Port)
		if err != nil {
			return nil, err
		}
		s := &udpService{
			serviceBase: g.newServiceBase(a.Agent, svc, pol, a.Port,
				g.metrics.UDPActive.WithLabelValues(a.Agent, svc.ID), g.metrics.UDPSessions.WithLabelValues(a.Agent, svc.ID)),
			conn:     conn,
			budget:   &g.udp,
			sessions: newUDPSessions(),
			public:   g.publicUDP(addrPortOf(conn.LocalAddr())),
		}
		s.fwd, s.mirror = g.fabric, true
		go s.serve()
		return s, nil
	}
	ln, err := g.listenTCP(a.Port)
	if err != nil {
		return nil, err
	}
	s := &tcpService{
		serviceBase: g.newServiceBase(a.Agent, svc, pol, a.Port,
			g.metrics.ConnActive.WithLabelValues(a.Agent, svc.ID), g.metrics.ConnTotal.WithLabelValues(a.Agent, svc.ID)),
		ln: ln,
	}
	s.fwd, s.mirror = g.fabric, true
	go s.serve()
	return s, nil
}

func (g *Gateway) newServiceBase(agent string, svc *protocol.Service, pol *sourcePolicy, port int, active prometheus.Gauge, total prometheus.Counter) *serviceBase {
	b := &serviceBase{
		agent: agent, key: svc.Key(), port: port,
		endpoint: net.JoinHostPort(g.cfg.PublicHost, strconv.Itoa(port)),
		conf:     g.conf, log: g.log, metrics: g.metrics, active: active, total: total,
		hdrTimeout: g.hdrTimeout,
		done:       make(chan struct{}),
	}
	b.gate.table = newSourceTable()
	b.setSpec(svc, pol)
	return b
}

// setSpec makes svc, with its parsed source policy pol, the service's
// current spec.
func (b *serviceBase) setSpec(svc *protocol.Service, pol *sourcePolicy) {
	b.gate.policy.Store(pol)
	b.spec.Store(svc)
}

// bindPort acquires a public port for svc from p, opening it with listen,
// and returns the port with its open socket.
func bindPort[L io.Closer](ctx context.Context, p *ports, agent string, svc *protocol.Service, listen func(port int) (L, error)) (int, L, error) {
	var l L
	port, err := p.acquire(ctx, agent, svc, func(port int) (func(), error) {
		var err error
		l, err = listen(port)
		if err != nil {
			return nil, err
		}
		sock := l
		return func() { sock.Close() }, nil
	})
	if err != nil {
		var zero L
		return 0, zero, err
	}
	return port, l, nil
}

// listenTCP opens a public TCP port.
func (g *Gateway) listenTCP(port int) (*net.TCPListener, error) {
	addr, err := net.ResolveTCPAddr("tcp", net.JoinHostPort(g.cfg.BindAddress, strconv.Itoa(port)))
	if err != nil {
		return nil, err
	}
	return net.ListenTCP("tcp", addr)
}

// listenUDP opens a public UDP port.
func (g *Gateway) listenUDP(port int) (*net.UDPConn, error) {
	addr, err := net.ResolveUDPAddr("udp", net.JoinHostPort(g.cfg.BindAddress, strconv.Itoa(port)))
	if err != nil {
		return nil, err
	}
	c, err := net.ListenUDP("udp", addr)
	if err != nil {
		return nil, err
	}
	// Room for bursts: the kernel caps this at net.core.rmem_max.
	c.SetReadBuffer(udpSocketBuffer)
	c.SetWriteBuffer(udpSocketBuffer)
	return c, nil
}

// publicUDP returns the public endpoint of a UDP port bound at local. A
// socket bound to the wildcard address does not know which address a
// datagram was sent to: public_host stands for it when it is an IP
// address, else the wildcard address stays.
func (g *Gateway) publicUDP(local netip.AddrPort) netip.AddrPort {
	if local.Addr().IsUnspecified() {
		if a, err := netip.ParseAddr(g.cfg.PublicHost); err == nil {
			return netip.AddrPortFrom(a.Unmap(), local.Port())
		}
	}
	return local
}
