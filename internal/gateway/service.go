package gateway

import (
	"context"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
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
// state: the agent's live-session slot and the configuration reader.
type serviceBase struct {
	agent    string
	key      protocol.ServiceKey
	port     int
	endpoint string
	// spec is the service as last registered: a registration that keeps
	// the port replaces it in place.
	spec atomic.Pointer[protocol.Service]
	// live is the owning agent's live session, read without a lock: the
	// per-connection and per-datagram paths never wait for a
	// registration.
	live *atomic.Pointer[tunnel.Session]

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

// agentSession returns the agent's live session, or nil. It takes no lock.
func (b *serviceBase) agentSession() *tunnel.Session { return b.live.Load() }

// stop closes done and runs closeSocket, once.
func (b *serviceBase) stop(closeSocket func()) {
	b.once.Do(func() {
		close(b.done)
		closeSocket()
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
func (g *Gateway) openService(ctx context.Context, a *agentState, svc *protocol.Service) (publicService, error) {
	if svc.Key().Kind == protocol.KindUDP {
		port, conn, err := bindPort(ctx, g.ports, a.name, svc, g.listenUDP)
		if err != nil {
			return nil, err
		}
		s := &udpService{
			serviceBase: g.newServiceBase(a, svc, port,
				g.metrics.UDPActive.WithLabelValues(a.name, svc.ID), g.metrics.UDPSessions.WithLabelValues(a.name, svc.ID)),
			conn:     conn,
			budget:   &g.udp,
			sessions: newUDPSessions(),
		}
		go s.serve()
		return s, nil
	}
	port, ln, err := bindPort(ctx, g.ports, a.name, svc, g.listenTCP)
	if err != nil {
		return nil, err
	}
	s := &tcpService{
		serviceBase: g.newServiceBase(a, svc, port,
			g.metrics.ConnActive.WithLabelValues(a.name, svc.ID), g.metrics.ConnTotal.WithLabelValues(a.name, svc.ID)),
		ln: ln,
	}
	go s.serve()
	return s, nil
}

func (g *Gateway) newServiceBase(a *agentState, svc *protocol.Service, port int, active prometheus.Gauge, total prometheus.Counter) *serviceBase {
	b := &serviceBase{
		agent: a.name, key: svc.Key(), port: port,
		endpoint: net.JoinHostPort(g.cfg.PublicHost, strconv.Itoa(port)),
		live:     &a.sess,
		conf:     g.conf, log: g.log, metrics: g.metrics, active: active, total: total,
		done: make(chan struct{}),
	}
	b.spec.Store(svc)
	return b
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
