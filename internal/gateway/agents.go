package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/relay"
	"github.com/portway/portway/internal/tunnel"
)

// agentState is one agent identity: its live session (at most one) and the
// public listeners of its registered services. It outlives sessions, so a
// reconnect finds its services' ports again.
type agentState struct {
	name        string
	maxServices int

	// sess is the live session. It is written under mu (so that attach,
	// detach and register agree on which session is live) and read
	// without it: the per-connection and per-datagram paths must never
	// wait for a registration.
	sess atomic.Pointer[tunnel.Session]

	mu       sync.Mutex
	remote   string
	since    time.Time
	services map[protocol.ServiceKey]*publicService
}

func newAgentState(name string, maxServices int) *agentState {
	return &agentState{name: name, maxServices: maxServices, services: map[protocol.ServiceKey]*publicService{}}
}

// attach makes s the agent's live session and returns the one it replaces.
func (a *agentState) attach(s *tunnel.Session, remote string) *tunnel.Session {
	a.mu.Lock()
	defer a.mu.Unlock()
	old := a.sess.Swap(s)
	a.remote, a.since = remote, time.Now()
	return old
}

// detach forgets s if it is still the live session, closing the agent's
// public listeners (their ports stay allocated for a reconnect). It reports
// whether s was the live session.
func (a *agentState) detach(s *tunnel.Session, g *Gateway) bool {
	a.mu.Lock()
	if !a.sess.CompareAndSwap(s, nil) {
		a.mu.Unlock()
		return false
	}
	withdrawn := a.withdrawAll(g)
	a.mu.Unlock()
	g.afterWithdraw(a.name, withdrawn)
	return true
}

// shutdown ends the session and closes the listeners (gateway shutdown).
func (a *agentState) shutdown(g *Gateway) {
	a.mu.Lock()
	s := a.sess.Swap(nil)
	withdrawn := a.withdrawAll(g)
	a.mu.Unlock()
	if s != nil {
		s.CloseWithError(protocol.CodeShutdown, "gateway shutting down")
	}
	g.afterWithdraw(a.name, withdrawn)
}

// withdrawAll forgets every public listener, keeping their ports retained.
// Caller holds a.mu; it closes the returned services after unlocking
// (afterWithdraw).
func (a *agentState) withdrawAll(g *Gateway) []*publicService {
	out := make([]*publicService, 0, len(a.services))
	for k, ps := range a.services {
		g.ports.retain(a.name, k)
		delete(a.services, k)
		out = append(out, ps)
	}
	return out
}

// session returns the live session, or nil. It takes no lock.
func (a *agentState) session() *tunnel.Session { return a.sess.Load() }

// register reconciles the agent's public listeners with its full desired
// set: new services get a port and a listener, changed ones are updated,
// absent ones are withdrawn. Each service gets an endpoint or an error.
//
// Under a.mu it decides, allocates (ports.mu is taken inside) and opens
// the new listeners; closing replaced and withdrawn listeners (which takes
// their udpSessions.mu) and forgetting their metrics happen after
// unlocking.
func (g *Gateway) register(a *agentState, sess *tunnel.Session, reg *protocol.Register) *protocol.RegisterAck {
	ack := &protocol.RegisterAck{Seq: reg.Seq, Endpoints: make([]protocol.Endpoint, len(reg.Services))}
	a.mu.Lock()
	if a.sess.Load() != sess {
		a.mu.Unlock()
		for i, s := range reg.Services {
			ack.Endpoints[i] = protocol.Endpoint{ID: s.ID, Protocol: s.Protocol, Error: "session replaced"}
		}
		return ack
	}
	keep := map[protocol.ServiceKey]bool{}
	var opened []string
	var replaced []*publicService
	var moveFailed []string
	failed := 0
	for i := range reg.Services {
		svc := reg.Services[i]
		ep := &ack.Endpoints[i]
		*ep = protocol.Endpoint{ID: svc.ID, Protocol: svc.Protocol}
		if i >= a.maxServices {
			ep.Error = fmt.Sprintf("over this agent's quota of %d services (gateway max_services)", a.maxServices)
			failed++
			continue
		}
		key := svc.Key()
		keep[key] = true
		old := a.services[key]
		if old != nil && (svc.PublicPort == 0 || svc.PublicPort == old.port) {
			old.spec.Store(&svc)
			ep.PublicPort, ep.Address = old.port, old.endpoint
			continue
		}
		// New, or its requested public port changed. The old listener
		// stays open until the new one is bound: on failure the service
		// keeps its old port and allocation.
		port, l, err := g.ports.acquire(a.name, &svc, g.bind(key.Kind))
		if err != nil {
			if old != nil {
				old.spec.Store(&svc)
				ep.PublicPort, ep.Address = old.port, old.endpoint
				moveFailed = append(moveFailed, fmt.Sprintf("%s: %v", key, err))
				continue
			}
			ep.Error = err.Error()
			failed++
			continue
		}
		if old != nil {
			replaced = append(replaced, old)
		}
		ps := g.newPublicService(a, &svc, port, l)
		a.services[key] = ps
		ep.PublicPort, ep.Address = port, ps.endpoint
		opened = append(opened, key.String()+"="+ps.endpoint)
	}
	var withdrawn []*publicService
	for k, ps := range a.services {
		if !keep[k] {
			g.ports.retain(a.name, k)
			delete(a.services, k)
			withdrawn = append(withdrawn, ps)
		}
	}
	a.mu.Unlock()
	for _, ps := range replaced {
		ps.close()
	}
	g.afterWithdraw(a.name, withdrawn)
	if len(opened) > 0 || len(withdrawn) > 0 {
		g.saveState()
	}
	g.countServices()
	g.log.Info("agent registered services", "agent", a.name, "services", len(reg.Services),
		"opened", opened, "withdrawn", len(withdrawn), "failed", failed)
	for _, m := range moveFailed {
		g.log.Warn("public_port change failed; service kept on its old port", "agent", a.name, "reason", m)
	}
	for _, ep := range ack.Endpoints {
		if ep.Error != "" {
			g.log.Warn("service not exposed", "agent", a.name, "service", ep.ID, "protocol", ep.Protocol, "reason", ep.Error)
		}
	}
	return ack
}

// afterWithdraw closes withdrawn services and forgets their metrics. It is
// called with no lock held.
func (g *Gateway) afterWithdraw(agent string, withdrawn []*publicService) {
	for _, ps := range withdrawn {
		ps.close()
		g.metrics.ForgetService(agent, ps.key.ID)
	}
	if len(withdrawn) > 0 {
		g.saveState()
		g.countServices()
	}
}

func (g *Gateway) saveState() {
	if err := g.ports.save(context.Background()); err != nil {
		g.log.Error("saving port allocations", "err", err)
	}
	g.metrics.PortAllocations.Set(float64(g.ports.count()))
}

func (g *Gateway) countServices() {
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

func (g *Gateway) bind(kind protocol.Kind) bindFunc {
	return func(port int) (io.Closer, error) {
		addr := net.JoinHostPort(g.cfg.BindAddress, strconv.Itoa(port))
		if kind == protocol.KindUDP {
			ua, err := net.ResolveUDPAddr("udp", addr)
			if err != nil {
				return nil, err
			}
			c, err := net.ListenUDP("udp", ua)
			if err == nil {
				// Room for bursts: the kernel caps this at net.core.rmem_max.
				c.SetReadBuffer(udpSocketBuffer)
				c.SetWriteBuffer(udpSocketBuffer)
			}
			return c, err
		}
		return net.Listen("tcp", addr)
	}
}

// publicService is one registered service's public listener.
type publicService struct {
	g        *Gateway
	a        *agentState
	key      protocol.ServiceKey
	port     int
	endpoint string
	spec     atomic.Pointer[protocol.Service]

	tcp  net.Listener
	udp  *net.UDPConn
	done chan struct{}
	once sync.Once

	active   prometheus.Gauge
	activeN  atomic.Int64 // the same count, for the admin API
	total    prometheus.Counter
	sessions *udpSessions
	// queued counts the bytes of this service's queued datagrams against
	// udp_queue_bytes_per_service.
	queued atomic.Int64
}

func (g *Gateway) newPublicService(a *agentState, svc *protocol.Service, port int, l io.Closer) *publicService {
	ps := &publicService{
		g: g, a: a, key: svc.Key(), port: port,
		endpoint: net.JoinHostPort(g.cfg.PublicHost, strconv.Itoa(port)),
		done:     make(chan struct{}),
	}
	ps.spec.Store(svc)
	switch l := l.(type) {
	case *net.UDPConn:
		ps.udp = l
		ps.active = g.metrics.UDPActive.WithLabelValues(a.name, svc.ID)
		ps.total = g.metrics.UDPSessions.WithLabelValues(a.name, svc.ID)
		ps.sessions = newUDPSessions()
		go ps.serveUDP()
	case net.Listener:
		ps.tcp = l
		ps.active = g.metrics.ConnActive.WithLabelValues(a.name, svc.ID)
		ps.total = g.metrics.ConnTotal.WithLabelValues(a.name, svc.ID)
		go ps.serveTCP()
	}
	return ps
}

func (ps *publicService) close() {
	ps.once.Do(func() {
		close(ps.done)
		if ps.tcp != nil {
			ps.tcp.Close()
		}
		if ps.udp != nil {
			ps.udp.Close()
			ps.sessions.closeAll()
		}
	})
}

func (ps *publicService) enter() {
	ps.active.Inc()
	ps.activeN.Add(1)
}

func (ps *publicService) leave() {
	ps.active.Dec()
	ps.activeN.Add(-1)
}

func (ps *publicService) refuse(reason metrics.Reason) {
	ps.g.metrics.Refusals.WithLabelValues(ps.a.name, ps.key.ID, reason.String()).Inc()
}

func (ps *publicService) serveTCP() {
	var backoff time.Duration
	for {
		c, err := ps.tcp.Accept()
		if err != nil {
			select {
			case <-ps.done:
				return
			default:
			}
			// Out of file descriptors and the like: back off, bounded.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			ps.g.log.Warn("accept failed", "service", ps.key.String(), "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-ps.done:
				return
			}
			continue
		}
		backoff = 0
		go ps.serveConn(c.(*net.TCPConn))
	}
}

// openTimeout bounds opening a stream (yamux blocks while the agent has
// too many unacknowledged opens).
const openTimeout = 10 * time.Second

func (ps *publicService) serveConn(c *net.TCPConn) {
	ps.total.Inc()
	sess := ps.a.session()
	if sess == nil {
		ps.refuse(metrics.ReasonAgentOffline)
		relay.Abort(c)
		return
	}
	spec := ps.spec.Load()
	client, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	st, err := sess.Open(ctx, protocol.StreamHeader{Kind: protocol.KindTCP, Service: spec.ID, Client: client})
	cancel()
	if err != nil {
		ps.refuse(metrics.ReasonTunnelError)
		relay.Abort(c)
		return
	}
	ps.enter()
	stats := new(relay.Stats)
	// In is what the client sends toward the backend, out the other way.
	flow := ps.g.metrics.Bytes.Track(func() (int64, int64) { return stats.ToBackend.Load(), stats.FromBackend.Load() }, ps.a.name, spec.ID)
	relay.Start(c, st, relay.Options{
		BufferSize:  ps.g.conf().BufferSize,
		IdleTimeout: time.Duration(spec.IdleTimeoutMS) * time.Millisecond,
	}, stats, func(res relay.Result) {
		flow.Done()
		ps.leave()
		var oe *protocol.OpenError
		if errors.As(res.Err, &oe) {
			ps.refuse(metrics.StatusReason(oe.Status))
		}
		ps.g.log.Debug("connection closed", "agent", ps.a.name, "service", spec.ID, "client", client,
			"in", stats.ToBackend.Load(), "out", stats.FromBackend.Load(), "err", res.Err)
	})
}
