package gateway

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/relay"
	"github.com/portway/portway/internal/tunnel"
)

// UDP on the gateway: one public socket per service, one session per client
// address, each session its own stream to the agent (which dials the backend
// from a socket of its own, so replies reach only that client). The read loop
// never blocks on a session: each has a bounded queue, and a session that
// cannot keep up drops its own datagrams. The bytes queued are bounded too,
// per service (udp_queue_bytes_per_service) and for the whole gateway
// (udp_queue_bytes): a datagram over either budget is dropped, so a flood
// toward an agent that reads slowly cannot grow the heap without bound.

const (
	// udpQueueLen bounds the datagrams waiting for one session's stream.
	udpQueueLen = 256
	// maxUDPSessions bounds sessions per public port on the gateway, whatever
	// the agent's udp.max_sessions; spoofed sources cannot exhaust memory.
	maxUDPSessions = 65536
	// maxRefused bounds the clients held after a refusal per public port.
	maxRefused = 65536
	// refusalHold is how long a client the agent refused (over limit,
	// unknown service) has its datagrams dropped before the gateway asks
	// the agent again.
	refusalHold = 2 * time.Second
	// refusedSweepEvery spaces the sweeps of a full refused map, so that a
	// map full of live holds costs one scan per interval, not one per
	// refusal.
	refusedSweepEvery = refusalHold / 4
	// udpSocketBuffer is the socket buffer asked for on public UDP ports.
	udpSocketBuffer = 4 << 20
)

// udpBudget is the gateway-wide side of the UDP queue budget: the buffers
// of queued datagrams and the bytes they hold against udp_queue_bytes.
// The limits are read from the current configuration at each datagram, so
// a reload applies to the next one.
type udpBudget struct {
	pool dgramPool
	// queued counts the bytes of every service's queued datagrams.
	queued atomic.Int64
}

// udpService is a public UDP port: one session per client address, each
// carried by a stream of its own to the agent.
type udpService struct {
	*serviceBase
	conn     *net.UDPConn
	budget   *udpBudget
	sessions *udpSessions
	// queued counts the bytes of this service's queued datagrams against
	// udp_queue_bytes_per_service.
	queued atomic.Int64
	// public is the endpoint clients send to, the destination of the
	// agent's PROXY protocol header.
	public netip.AddrPort
}

// close closes the public socket and ends every session of the port.
func (us *udpService) close() {
	us.stop(func() {
		us.conn.Close()
		us.sessions.closeAll()
	})
}

func (us *udpService) traffic(si *adminapi.ServiceInfo) {
	si.PacketsIn, si.PacketsOut = us.metrics.UDPPackets.Values(us.agent, si.ID)
}

func (us *udpService) drop(reason metrics.Reason) {
	us.metrics.UDPDropped.WithLabelValues(us.agent, us.key.ID, reason.String()).Inc()
}

type udpSessions struct {
	mu        sync.Mutex
	m         map[netip.AddrPort]*udpSession
	refused   map[netip.AddrPort]time.Time
	lastSweep time.Time
	closed    bool
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

// hold records that the agent refused client, so that its datagrams are
// dropped until the hold ends. A full map is first swept of expired holds
// (at most once per refusedSweepEvery); if it is still full, the client is
// not held and the agent is asked again next time, as without a hold.
func (u *udpSessions) hold(client netip.AddrPort, now time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.refused) >= maxRefused && now.Sub(u.lastSweep) >= refusedSweepEvery {
		u.lastSweep = now
		for c, until := range u.refused {
			if !now.Before(until) {
				delete(u.refused, c)
			}
		}
	}
	if len(u.refused) < maxRefused {
		u.refused[client] = now.Add(refusalHold)
	}
}

// udpSession is one client of a public UDP port. It is the socket side
// (relay.Datagrams) of its relay: reads come from its queue, writes go to
// the client through the shared socket.
type udpSession struct {
	us     *udpService
	client netip.AddrPort
	pol    *sourcePolicy // what admitSource counted, released at the end
	queue  chan *[]byte
	held   *[]byte // taken from queue by WaitReadable; only the relay's reader touches it
	done   chan struct{}
	once   sync.Once
}

func (us *udpService) serve() {
	buf := make([]byte, protocol.MaxDatagram+1)
	for {
		n, addr, err := us.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			select {
			case <-us.done:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // per-datagram errors (ICMP reports) are not fatal
		}
		spec := us.spec.Load()
		max := spec.MaxDatagram
		if max <= 0 {
			max = protocol.MaxDatagram
		}
		if n > max {
			us.drop(metrics.ReasonTooLarge)
			continue
		}
		us.handle(netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port()), buf[:n])
	}
}

// handle queues one datagram from client for its session, or drops it
// and counts why. It is the per-datagram path: it allocates nothing once
// the client has a session and the buffer pool is warm.
func (us *udpService) handle(client netip.AddrPort, data []byte) {
	s, why := us.session(client)
	if s == nil {
		switch why {
		case metrics.ReasonNone:
		case metrics.ReasonAgentOffline:
			us.refuse(why) // as a TCP connection while the agent is offline
		default:
			us.drop(why)
		}
		return
	}
	b := us.budget.pool.get(len(data))
	if !us.charge(b) {
		us.budget.pool.put(b)
		us.drop(metrics.ReasonOverBudget)
		return
	}
	copy(*b, data)
	select {
	case s.queue <- b:
		select {
		case <-s.done:
			// Closed meanwhile: its Close may have drained the queue
			// before this datagram arrived in it.
			s.drain()
		default:
		}
	default:
		us.release(b)
		us.drop(metrics.ReasonQueueFull)
	}
}

// charge counts a queued datagram's buffer against the service's and the
// gateway's budgets; it reports false, charging nothing, if either would
// be exceeded.
func (us *udpService) charge(b *[]byte) bool {
	n := int64(cap(*b))
	svc, all := us.queued.Add(n), us.budget.queued.Add(n)
	if cfg := us.conf(); svc > int64(cfg.UDPQueueBytesPerService) || all > int64(cfg.UDPQueueBytes) {
		us.queued.Add(-n)
		us.budget.queued.Add(-n)
		return false
	}
	return true
}

// release uncharges a datagram's buffer and recycles it.
func (us *udpService) release(b *[]byte) {
	n := int64(cap(*b))
	us.queued.Add(-n)
	us.budget.queued.Add(-n)
	us.budget.pool.put(b)
}

// session returns the client's session, starting one if needed. It returns
// nil when the datagram must be dropped, with the reason to count, which is
// ReasonAgentOffline for a refusal and ReasonNone when nothing is to be
// counted. It
// reads the agent's session without a lock and counts nothing itself: the
// sessions lock is never held while waiting for anything else.
func (us *udpService) session(client netip.AddrPort) (*udpSession, metrics.Reason) {
	u := us.sessions
	u.mu.Lock()
	if s := u.m[client]; s != nil {
		u.mu.Unlock()
		return s, metrics.ReasonNone
	}
	u.mu.Unlock()
	// A new client: its source is checked before a session exists, and
	// outside the sessions lock (the check logs). Denied datagrams never
	// reach the tunnel.
	why, pol := us.admitSource(client.Addr(), func(metrics.Reason) {})
	if why != metrics.ReasonNone {
		return nil, why
	}
	s, why := us.newSession(client, pol)
	if s == nil {
		us.releaseSource(client.Addr(), pol)
	}
	return s, why
}

// newSession starts the session of a client that passed the source
// checks, under the sessions lock, unless one started meanwhile.
func (us *udpService) newSession(client netip.AddrPort, pol *sourcePolicy) (*udpSession, metrics.Reason) {
	u := us.sessions
	u.mu.Lock()
	defer u.mu.Unlock()
	if s := u.m[client]; s != nil {
		return nil, metrics.ReasonNone
	}
	if u.closed {
		return nil, metrics.ReasonNone
	}
	if until, ok := u.refused[client]; ok {
		if time.Now().Before(until) {
			return nil, metrics.ReasonRefused
		}
		delete(u.refused, client)
	}
	if len(u.m) >= maxUDPSessions {
		return nil, metrics.ReasonOverLimit
	}
	sess, in := us.agentSession()
	if sess == nil && us.fwd == nil {
		return nil, metrics.ReasonAgentOffline
	}
	s := &udpSession{us: us, client: client, pol: pol, queue: make(chan *[]byte, udpQueueLen), done: make(chan struct{})}
	u.m[client] = s
	if in != nil {
		in.active.Add(1)
	}
	// Without a local session (sess nil) run forwards the session to a
	// replica holding one.
	go s.run(sess, in)
	return s, metrics.ReasonNone
}

func (s *udpSession) run(sess *tunnel.Session, in *instance) {
	us := s.us
	defer us.releaseSource(s.client.Addr(), s.pol)
	if in != nil {
		defer in.active.Add(-1)
	}
	defer us.sessions.remove(s)
	defer s.Close()
	spec := us.spec.Load()
	h := protocol.StreamHeader{Kind: protocol.KindUDP, Service: spec.ID, Client: s.client}
	if spec.ProxyProtocol != "" {
		h.Public = us.public
	}
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	var st tunnel.Stream
	var err error
	if sess != nil {
		st, err = sess.Open(ctx, h)
	} else {
		st, _, err = us.fwd.open(ctx, us.agent, h)
		if errors.Is(err, errNoReplica) {
			// Nobody can carry it: drop the client's datagrams for a
			// while, counted, rather than retry each one.
			cancel()
			us.refuse(metrics.ReasonNoReplica)
			us.sessions.hold(s.client, time.Now())
			return
		}
		if err == nil {
			us.metrics.Forwarded.WithLabelValues(us.agent, spec.ID).Inc()
		}
	}
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
			us.refuse(metrics.StatusReason(oe.Status))
			us.sessions.hold(s.client, time.Now())
		} else {
			us.refuse(metrics.ReasonTunnelError)
		}
		return
	}
	us.total.Inc()
	us.enter()
	defer us.leave()
	var stats relay.PacketStats
	flow := us.metrics.UDPPackets.Track(func() (int64, int64) { return stats.ToTunnel.Load(), stats.FromTunnel.Load() }, us.agent, spec.ID)
	res := relay.PipePackets(tunnel.AsPackets(st), s, relay.PacketOptions{
		MaxDatagram: max(spec.MaxDatagram, 0),
		IdleTimeout: time.Duration(spec.IdleTimeoutMS) * time.Millisecond,
	}, &stats)
	// The relay's reader is done: a datagram it took but did not read
	// goes back to the budget.
	if s.held != nil {
		us.release(s.held)
		s.held = nil
	}
	flow.Done()
	if res.TooLarge > 0 {
		us.metrics.UDPDropped.WithLabelValues(us.agent, spec.ID, metrics.ReasonTooLarge.String()).Add(float64(res.TooLarge))
	}
	if res.QueueFull > 0 {
		us.metrics.UDPDropped.WithLabelValues(us.agent, spec.ID, metrics.ReasonQueueFull.String()).Add(float64(res.QueueFull))
	}
	us.log.Debug("udp session closed", "agent", us.agent, "service", spec.ID, "client", s.client,
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
	s.us.release(b)
	return n, nil
}

// WriteDatagram implements relay.Datagrams: a reply goes to this client only.
func (s *udpSession) WriteDatagram(b []byte) error {
	_, err := s.us.conn.WriteToUDPAddrPort(b, s.client)
	return err
}

// Close implements relay.Datagrams. The shared socket stays open.
func (s *udpSession) Close() error {
	s.once.Do(func() {
		close(s.done)
		s.drain()
	})
	return nil
}

// drain releases the queued datagrams of a closed session.
func (s *udpSession) drain() {
	for {
		select {
		case b := <-s.queue:
			s.us.release(b)
		default:
			return
		}
	}
}
