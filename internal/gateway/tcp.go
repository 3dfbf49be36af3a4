package gateway

import (
	"context"
	"errors"
	"net"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/relay"
)

// tcpService is a public TCP port: each accepted connection is carried by
// a stream of its own to the agent and relayed until both sides are done.
type tcpService struct {
	*serviceBase
	ln *net.TCPListener
}

// close stops accepting. Connections already accepted carry on until they
// end, or until the agent's session does.
func (s *tcpService) close() { s.stop(func() { s.ln.Close() }) }

func (s *tcpService) traffic(si *adminapi.ServiceInfo) {
	si.BytesIn, si.BytesOut = s.metrics.Bytes.Values(s.agent, si.ID)
}

func (s *tcpService) serve() {
	var backoff time.Duration
	for {
		c, err := s.ln.AcceptTCP()
		if err != nil {
			select {
			case <-s.done:
				return
			default:
			}
			// Out of file descriptors and the like: back off, bounded.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed", "service", s.key.String(), "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-s.done:
				return
			}
			continue
		}
		backoff = 0
		go s.serveConn(c)
	}
}

func (s *tcpService) serveConn(c *net.TCPConn) {
	s.total.Inc()
	client, public := addrPortOf(c.RemoteAddr()), addrPortOf(c.LocalAddr())
	if s.conf().ProxyProtocolFromAddr(client.Addr()) {
		var err error
		if client, public, err = readProxyHeader(c, client, public, s.hdrTimeout); err != nil {
			s.refuse(metrics.ReasonProxyHeader)
			if s.gate.warnNow() {
				s.log.Warn("connection from a proxy_protocol_from source without a valid PROXY protocol header; refused",
					"agent", s.agent, "service", s.key.String(), "err", err)
			}
			relay.Abort(c)
			return
		}
	}
	// Denied and over-limit sources are refused before any stream is
	// opened: their traffic never reaches the tunnel.
	why, pol := s.admitSource(client.Addr(), s.refuse)
	if why != metrics.ReasonNone {
		relay.Abort(c)
		return
	}
	spec := s.spec.Load()
	h := protocol.StreamHeader{Kind: protocol.KindTCP, Service: spec.ID, Client: client}
	if spec.ProxyProtocol != "" {
		// Only an agent that writes PROXY headers registers one, and
		// only such an agent reads the public endpoint.
		h.Public = public
	}
	in := s.pick()
	if in == nil {
		if s.fwd != nil {
			// No session of the agent here: another replica's.
			s.forwardTCP(c, h, func() { s.releaseSource(client.Addr(), pol) })
			return
		}
		s.releaseSource(client.Addr(), pol)
		s.refuse(metrics.ReasonAgentOffline)
		relay.Abort(c)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	st, in, err := s.open(ctx, in, h)
	cancel()
	if err != nil {
		s.releaseSource(client.Addr(), pol)
		s.refuse(metrics.ReasonTunnelError)
		relay.Abort(c)
		return
	}
	s.enter()
	stats := new(relay.Stats)
	// In is what the client sends toward the backend, out the other way.
	flow := s.metrics.Bytes.Track(func() (int64, int64) { return stats.ToBackend.Load(), stats.FromBackend.Load() }, s.agent, spec.ID)
	relay.Start(c, st, relay.Options{
		BufferSize:  s.conf().BufferSize,
		IdleTimeout: time.Duration(spec.IdleTimeoutMS) * time.Millisecond,
	}, stats, func(res relay.Result) {
		flow.Done()
		in.active.Add(-1)
		s.leave()
		s.releaseSource(client.Addr(), pol)
		var oe *protocol.OpenError
		if errors.As(res.Err, &oe) {
			s.refuse(metrics.StatusReason(oe.Status))
		}
		s.log.Debug("connection closed", "agent", s.agent, "service", spec.ID, "client", client,
			"in", stats.ToBackend.Load(), "out", stats.FromBackend.Load(), "err", res.Err)
	})
}
