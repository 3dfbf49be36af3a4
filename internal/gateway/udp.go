package gateway

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/portway/portway/internal/pool"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/relay"
	"github.com/portway/portway/internal/tunnel"
)

// UDP on the gateway: one public socket per service, one session per client
// address, each session its own stream to the agent (which dials the backend
// from a socket of its own, so replies reach only that client). The read loop
// never blocks on a session: each has a bounded queue, and a session that
// cannot keep up drops its own datagrams.

const (
	// udpQueueLen bounds the datagrams waiting for one session's stream.
	udpQueueLen = 256
	// maxUDPSessions bounds sessions per public port on the gateway, whatever
	// the agent's udp.max_sessions; spoofed sources cannot exhaust memory.
	maxUDPSessions = 65536
	// refusalHold is how long a client the agent refused (over limit,
	// unknown service) has its datagrams dropped before the gateway asks
	// the agent again.
	refusalHold = 2 * time.Second
	// udpSocketBuffer is the socket buffer asked for on public UDP ports.
	udpSocketBuffer = 4 << 20
)

type udpSessions struct {
	mu      sync.Mutex
	m       map[netip.AddrPort]*udpSession
	refused map[netip.AddrPort]time.Time
	closed  bool
}

func newUDPSessions() *udpSessions {
	return &udpSessions{m: map[netip.AddrPort]*udpSession{}, refused: map[netip.AddrPort]time.Time{}}
}

func (u *udpSessions) closeAll() {
	u.mu.Lock()
	u.closed = true
	sessions := make([]*udpSession, 0, len(u.m))
	for _, s := range u.m {
		sessions = append(sessions, s)
	}
	u.mu.Unlock()
	for _, s := range sessions {
		s.Close()
	}
}

func (u *udpSessions) remove(s *udpSession) {
	u.mu.Lock()
	if u.m[s.client] == s {
		delete(u.m, s.client)
	}
	u.mu.Unlock()
}

// udpSession is one client of a public UDP port. It is the socket side
// (relay.Datagrams) of its relay: reads come from its queue, writes go to
// the client through the shared socket.
type udpSession struct {
	ps     *publicService
	client netip.AddrPort
	queue  chan *[]byte
	held   *[]byte // taken from queue by WaitReadable; only the relay's reader touches it
	done   chan struct{}
	once   sync.Once
}

func (ps *publicService) serveUDP() {
	buf := make([]byte, protocol.MaxDatagram+1)
	for {
		n, addr, err := ps.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			select {
			case <-ps.done:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // per-datagram errors (ICMP reports) are not fatal
		}
		spec := ps.spec.Load()
		max := spec.MaxDatagram
		if max <= 0 {
			max = protocol.MaxDatagram
		}
		if n > max {
			ps.drop("too_large")
			continue
		}
		addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
		s := ps.session(addr)
		if s == nil {
			continue
		}
		b := pool.Get(n)
		copy(*b, buf[:n])
		select {
		case s.queue <- b:
		default:
			pool.Put(b)
			ps.drop("queue_full")
		}
	}
}

func (ps *publicService) drop(reason string) {
	ps.g.metrics.UDPDropped.WithLabelValues(ps.a.name, ps.key.ID, reason).Inc()
}

// session returns the client's session, starting one if needed, or nil when
// the datagram must be dropped.
func (ps *publicService) session(client netip.AddrPort) *udpSession {
	u := ps.sessions
	u.mu.Lock()
	defer u.mu.Unlock()
	if s := u.m[client]; s != nil {
		return s
	}
	if u.closed {
		return nil
	}
	if until, ok := u.refused[client]; ok {
		if time.Now().Before(until) {
			ps.drop("refused")
			return nil
		}
		delete(u.refused, client)
	}
	if len(u.m) >= maxUDPSessions {
		ps.drop("over_limit")
		return nil
	}
	sess := ps.a.session()
	if sess == nil {
		ps.refuse("agent_offline")
		return nil
	}
	s := &udpSession{ps: ps, client: client, queue: make(chan *[]byte, udpQueueLen), done: make(chan struct{})}
	u.m[client] = s
	go s.run(sess)
	return s
}

func (s *udpSession) run(sess *tunnel.Session) {
	ps := s.ps
	defer ps.sessions.remove(s)
	defer s.Close()
	spec := ps.spec.Load()
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	st, err := sess.Open(ctx, protocol.StreamHeader{Kind: protocol.KindUDP, Service: spec.ID, Client: s.client})
	if err == nil {
		err = tunnel.WaitOpen(ctx, st)
	}
	cancel()
	if err != nil {
		if st != nil {
			st.Reset()
		}
		var oe *protocol.OpenError
		if errors.As(err, &oe) {
			ps.refuse(oe.Status.String())
			ps.sessions.mu.Lock()
			if len(ps.sessions.refused) < maxUDPSessions {
				ps.sessions.refused[s.client] = time.Now().Add(refusalHold)
			}
			ps.sessions.mu.Unlock()
		} else {
			ps.refuse("tunnel_error")
		}
		return
	}
	ps.total.Inc()
	ps.enter()
	defer ps.leave()
	var stats relay.PacketStats
	flow := ps.g.metrics.UDPPackets.Track(func() (int64, int64) { return stats.ToTunnel.Load(), stats.FromTunnel.Load() }, ps.a.name, spec.ID)
	pc := tunnel.AsPackets(st)
	res := relay.PipePackets(pc, s, relay.PacketOptions{
		MaxDatagram: max(spec.MaxDatagram, 0),
		IdleTimeout: time.Duration(spec.IdleTimeoutMS) * time.Millisecond,
	}, &stats)
	flow.Done()
	if d := stats.Dropped.Load(); d > 0 {
		ps.g.metrics.UDPDropped.WithLabelValues(ps.a.name, spec.ID, "too_large").Add(float64(d))
	}
	if d := tunnel.PacketsDropped(pc); d > 0 {
		ps.g.metrics.UDPDropped.WithLabelValues(ps.a.name, spec.ID, "queue_full").Add(float64(d))
	}
	ps.g.log.Debug("udp session closed", "agent", ps.a.name, "service", spec.ID, "client", s.client,
		"in", stats.ToTunnel.Load(), "out", stats.FromTunnel.Load(), "err", res.Err)
}

// WaitReadable implements the relay's wait: it takes the next datagram off
// the queue and holds it for ReadDatagram.
func (s *udpSession) WaitReadable() error {
	if s.held != nil {
		return nil
	}
	select {
	case b := <-s.queue:
		s.held = b
		return nil
	case <-s.done:
		return net.ErrClosed
	}
}

// Waiting reports whether a datagram is queued: with it the relay sends a
// burst into the tunnel in batches.
func (s *udpSession) Waiting() bool { return s.held != nil || len(s.queue) > 0 }

// ReadDatagram implements relay.Datagrams.
func (s *udpSession) ReadDatagram(buf []byte) (int, error) {
	if err := s.WaitReadable(); err != nil {
		return 0, err
	}
	b := s.held
	s.held = nil
	n := copy(buf, *b)
	pool.Put(b)
	return n, nil
}

// WriteDatagram implements relay.Datagrams: a reply goes to this client only.
func (s *udpSession) WriteDatagram(b []byte) error {
	_, err := s.ps.udp.WriteToUDPAddrPort(b, s.client)
	return err
}

// Close implements relay.Datagrams. The shared socket stays open.
func (s *udpSession) Close() error {
	s.once.Do(func() {
		close(s.done)
		for {
			select {
			case b := <-s.queue:
				pool.Put(b)
			default:
				return
			}
		}
	})
	return nil
}
