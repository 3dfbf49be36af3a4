package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/proxyproto"
	"github.com/portway/portway/internal/relay"
	"github.com/portway/portway/internal/tunnel"
)

// limiter counts one service's open connections or sessions and rate-limits
// the log line about refusals to one per second.
type limiter struct {
	active   atomic.Int64
	lastWarn atomic.Int64 // unix nanoseconds
}

func (l *limiter) acquire(max int) bool {
	if l.active.Add(1) > int64(max) {
		l.active.Add(-1)
		return false
	}
	return true
}

func (l *limiter) release() { l.active.Add(-1) }

// warnNow reports whether a rate-limited warning may be logged now.
func (l *limiter) warnNow() bool {
	now := time.Now().UnixNano()
	last := l.lastWarn.Load()
	return now-last >= int64(time.Second) && l.lastWarn.CompareAndSwap(last, now)
}

func (a *Agent) acceptLoop(ctx context.Context, sess *tunnel.Session) {
	for {
		in, err := sess.Accept(ctx)
		if err != nil {
			return
		}
		go a.handleStream(in)
	}
}

func (a *Agent) handleStream(in *tunnel.Incoming) {
	h, err := in.Header()
	if err != nil {
		a.log.Debug("bad stream header", "err", err)
		return
	}
	svc, lim := a.lookup(protocol.ServiceKey{ID: h.Service, Kind: h.Kind})
	if svc == nil {
		in.Reject(protocol.StatusUnknownService)
		if a.unknownLog.warnNow() {
			a.log.Warn("gateway opened a stream for a service this agent did not register; refused",
				"service", h.Service, "protocol", h.Kind.String())
		}
		return
	}
	if h.Kind == protocol.KindUDP {
		a.serveUDP(in, h, svc, lim)
		return
	}
	a.serveTCP(in, h, svc, lim)
}

func (a *Agent) serveTCP(in *tunnel.Incoming, h protocol.StreamHeader, svc *Service, lim *limiter) {
	cfg := &a.cfg.Tunnels.TCP
	if !lim.acquire(cfg.MaxConnections) {
		in.Reject(protocol.StatusOverLimit)
		a.metrics.TCPErrors.WithLabelValues(svc.ID, metrics.ReasonOverLimit.String()).Inc()
		if lim.warnNow() {
			a.log.Warn("max_connections reached; refusing new connections", "service", svc.ID, "max_connections", cfg.MaxConnections)
		}
		return
	}
	d := net.Dialer{Timeout: cfg.ConnectionTimeout.Duration}
	if cfg.Keepalive {
		d.KeepAliveConfig = net.KeepAliveConfig{Enable: true, Idle: cfg.KeepalivePeriod.Duration, Interval: cfg.KeepalivePeriod.Duration, Count: 3}
	} else {
		d.KeepAlive = -1
	}
	c, err := d.Dial("tcp", svc.Backend)
	if err != nil {
		lim.release()
		status, reason := dialStatus(err)
		in.Reject(status)
		a.metrics.TCPErrors.WithLabelValues(svc.ID, reason.String()).Inc()
		if lim.warnNow() {
			a.log.Warn("backend dial failed", "service", svc.ID, "backend", svc.Backend, "err", err)
		}
		return
	}
	if err := writeProxyHeader(c, svc.ProxyProtocol, h); err != nil {
		lim.release()
		c.Close()
		in.Reject(protocol.StatusError)
		a.metrics.TCPErrors.WithLabelValues(svc.ID, metrics.ReasonDialError.String()).Inc()
		if lim.warnNow() {
			a.log.Warn("writing the PROXY protocol header to the backend failed", "service", svc.ID, "backend", svc.Backend, "err", err)
		}
		return
	}
	st, err := in.Accept()
	if err != nil {
		lim.release()
		c.Close()
		a.metrics.TCPErrors.WithLabelValues(svc.ID, metrics.ReasonTunnel.String()).Inc()
		return
	}
	start := time.Now()
	a.metrics.TCPTotal.WithLabelValues(svc.ID).Inc()
	active := a.metrics.TCPActive.WithLabelValues(svc.ID)
	active.Inc()
	stats := new(relay.Stats)
	// Sent is what the backend sends the client, received the other way.
	flow := a.metrics.TCPBytes.Track(func() (int64, int64) { return stats.FromBackend.Load(), stats.ToBackend.Load() }, svc.ID)
	idle := svc.IdleTimeout
	if idle == 0 {
		idle = cfg.IdleTimeout.Duration
	}
	// The relay runs on its own goroutines; this one, whose stack grew
	// dialing, ends here. The stream is the relay's client side.
	relay.Start(st, c.(*net.TCPConn), relay.Options{BufferSize: cfg.BufferSize, IdleTimeout: idle}, stats, func(res relay.Result) {
		lim.release()
		flow.Done()
		active.Dec()
		a.metrics.TCPDuration.WithLabelValues(svc.ID).Observe(time.Since(start).Seconds())
		if res.Err != nil {
			reason := metrics.ReasonReset
			if errors.Is(res.Err, relay.ErrIdle) {
				reason = metrics.ReasonIdleTimeout
			}
			a.metrics.TCPErrors.WithLabelValues(svc.ID, reason.String()).Inc()
		}
		a.log.Debug("connection closed", "service", svc.ID, "client", h.Client, "received", stats.ToBackend.Load(),
			"sent", stats.FromBackend.Load(), "duration", time.Since(start).Round(time.Millisecond), "err", res.Err)
	})
}

// writeProxyHeader writes the PROXY protocol header of mode (none when
// config.ProxyProtocolOff) for the stream h to the backend connection c,
// before any byte of the client's data. The source is the public client,
// the destination the public endpoint it connected to.
func writeProxyHeader(c net.Conn, mode string, h protocol.StreamHeader) error {
	var buf [proxyproto.MaxV1Len]byte
	var b []byte
	switch mode {
	case config.ProxyProtocolV1:
		b = proxyproto.AppendV1(buf[:0], h.Client, publicOf(h))
	case config.ProxyProtocolV2:
		b = proxyproto.AppendV2(buf[:0], proxyproto.TransportStream, h.Client, publicOf(h))
	default:
		return nil
	}
	if _, err := c.Write(b); err != nil {
		return fmt.Errorf("writing PROXY protocol %s header: %w", mode, err)
	}
	return nil
}

// publicOf returns the destination of a PROXY protocol header: the public
// endpoint from the stream header. A gateway too old to send it leaves the
// unspecified address of the client's family, port 0, so that the client's
// address still arrives (a missing destination would make the whole
// header UNKNOWN).
func publicOf(h protocol.StreamHeader) netip.AddrPort {
	switch {
	case h.Public.IsValid():
		return h.Public
	case h.Client.Addr().Unmap().Is4():
		return netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	case h.Client.IsValid():
		return netip.AddrPortFrom(netip.IPv6Unspecified(), 0)
	}
	return netip.AddrPort{}
}

// dialStatus maps a dial error to the status sent to the gateway and a
// metrics reason.
func dialStatus(err error) (protocol.Status, metrics.Reason) {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return protocol.StatusRefused, metrics.ReasonRefused
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return protocol.StatusTimeout, metrics.ReasonTimeout
	default:
		return protocol.StatusError, metrics.ReasonDialError
	}
}

func (a *Agent) serveUDP(in *tunnel.Incoming, h protocol.StreamHeader, svc *Service, lim *limiter) {
	cfg := &a.cfg.Tunnels.UDP
	if !lim.acquire(cfg.MaxSessions) {
		in.Reject(protocol.StatusOverLimit)
		a.metrics.UDPDropped.WithLabelValues(svc.ID, metrics.ReasonSessionOverLimit.String()).Inc()
		if lim.warnNow() {
			a.log.Warn("max_sessions reached; refusing new UDP sessions", "service", svc.ID, "max_sessions", cfg.MaxSessions)
		}
		return
	}
	defer lim.release()
	// A socket of its own per session: replies reach only this client,
	// and the backend sees a distinct source per client.
	c, err := net.Dial("udp", svc.Backend)
	if err != nil {
		in.Reject(protocol.StatusError)
		a.metrics.UDPDropped.WithLabelValues(svc.ID, metrics.ReasonDialError.String()).Inc()
		if lim.warnNow() {
			a.log.Warn("backend socket failed", "service", svc.ID, "backend", svc.Backend, "err", err)
		}
		return
	}
	st, err := in.Accept()
	if err != nil {
		c.Close()
		return
	}
	a.metrics.UDPSessions.WithLabelValues(svc.ID).Inc()
	active := a.metrics.UDPActive.WithLabelValues(svc.ID)
	active.Inc()
	var stats relay.PacketStats
	// Tunnel to socket is received from the client; socket to tunnel is sent.
	flow := a.metrics.UDPPackets.Track(func() (int64, int64) { return stats.ToTunnel.Load(), stats.FromTunnel.Load() }, svc.ID)
	idle := svc.IdleTimeout
	if idle == 0 {
		idle = cfg.SessionTimeout.Duration
	}
	opt := relay.PacketOptions{MaxDatagram: cfg.BufferSize, IdleTimeout: idle}
	if svc.ProxyProtocol == config.ProxyProtocolV2 {
		// The same header starts every datagram of the session: encoded
		// once, copied into each datagram's buffer by the relay.
		var hdr [proxyproto.MaxV2EncodedLen]byte
		opt.Prefix = proxyproto.AppendV2(hdr[:0], proxyproto.TransportDatagram, h.Client, publicOf(h))
	}
	res := relay.PipePackets(tunnel.AsPackets(st), relay.ConnectedUDP{UDPConn: c.(*net.UDPConn)}, opt, &stats)
	flow.Done()
	active.Dec()
	if res.TooLarge > 0 {
		a.metrics.UDPDropped.WithLabelValues(svc.ID, metrics.ReasonTooLarge.String()).Add(float64(res.TooLarge))
	}
	if res.QueueFull > 0 {
		a.metrics.UDPDropped.WithLabelValues(svc.ID, metrics.ReasonQueueFull.String()).Add(float64(res.QueueFull))
	}
	a.log.Debug("udp session closed", "service", svc.ID, "client", h.Client, "received", stats.FromTunnel.Load(),
		"sent", stats.ToTunnel.Load(), "err", res.Err)
}
