// Package tunnel carries many TCP connections and UDP sessions over one
// WebSocket between a gateway and an agent. It owns the WebSocket (writes
// serialized, strict split of text = JSON control, binary = yamux),
// the gateway_hello handshake, heartbeats, and the two protocol modes behind
// one Session type: yamux streams, or JSON messages with per-stream credit.
//
// The gateway opens streams (Session.Open); the agent accepts them
// (Session.Accept). Both get a Stream: a byte stream with half-close, which
// AsPackets turns into a datagram conn for UDP.
//
// A Session holds one muxer, chosen by the handshake: yamuxMux or jsonMux.
// The muxer reads the socket and passes session-level messages back to the
// Session; everything written goes through the wsConn: queued for its
// writer goroutine, or, for yamux's frames, written by yamux's send loop
// itself. The writer also runs the session's heartbeats (chores): an idle
// session is the muxer's goroutines and the writer, nothing else.
//
// Lock order: jsonStream.mu, then jsonMux.mu. wsConn.wmu, then corkConn.mu:
// wmu is held while a whole message is written, through gorilla and
// crypto/tls down to the corkConn. wsConn.errMu and logWriter.mu are
// leaves, taken with no other lock held or under wmu only. No lock is held
// while queueing a message for the writer, which may block, nor, wmu's
// writes aside, while calling out of the package (pool.Put aside, which
// never blocks).
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/portway/portway/internal/pool"
	"github.com/portway/portway/internal/protocol"
)

// Config holds a session's settings. On the gateway, HeartbeatInterval,
// MaxMessageSize and StreamWindow are announced in gateway_hello and the
// agent adopts them; the other fields are local to each side.
type Config struct {
	// Protocol is the agent's choice: "auto" (yamux when offered), "yamux"
	// or "json". Unused on the gateway, which offers Hello.Protocols.
	Protocol string
	// MaxStreamWindow caps a yamux stream's auto-tuned receive window.
	MaxStreamWindow int
	// SessionWindowMemory caps the receive-window growth of all yamux
	// streams of a session together, so many busy streams cannot inflate
	// memory without bound.
	SessionWindowMemory int
	// MaxStreams bounds the streams a session carries at once.
	MaxStreams int
	// WriteTimeout bounds one WebSocket write.
	WriteTimeout time.Duration
	// HandshakeTimeout bounds the hello exchange.
	HandshakeTimeout time.Duration
	// Logger receives the session's rare log lines (yamux warnings).
	Logger *slog.Logger
	// Instance is the agent process's instance id, sent in
	// gateway_hello_ack. Unused on the gateway.
	Instance string

	// clock drives the heartbeats; nil means the wall clock.
	clock clock
}

func (c *Config) withDefaults() Config {
	out := *c
	if out.MaxStreamWindow <= 0 {
		out.MaxStreamWindow = 16 << 20
	}
	if out.SessionWindowMemory <= 0 {
		out.SessionWindowMemory = 32 << 20
	}
	if out.MaxStreams <= 0 {
		out.MaxStreams = 65536
	}
	if out.WriteTimeout <= 0 {
		out.WriteTimeout = 10 * time.Second
	}
	if out.HandshakeTimeout <= 0 {
		out.HandshakeTimeout = 10 * time.Second
	}
	if out.Logger == nil {
		out.Logger = slog.New(slog.DiscardHandler)
	}
	if out.clock == nil {
		out.clock = wallClock{}
	}
	return out
}

// Errors a session can end with.
var (
	// ErrPeerTimeout: nothing arrived for 2.5 heartbeat intervals.
	ErrPeerTimeout = errors.New("tunnel: peer silent for 2.5 heartbeat intervals")
	// ErrProtocol wraps every violation of the wire protocol by the peer.
	ErrProtocol = errors.New("tunnel: protocol violation")
	// ErrWrongSide is returned by Open on an agent and Accept on a gateway.
	ErrWrongSide = errors.New("tunnel: operation not available on this side")
)

// PeerError is the reason the peer gave, in an error message, for closing.
type PeerError struct {
	Code    protocol.ErrorCode
	Message string
}

func (e *PeerError) Error() string {
	return fmt.Sprintf("tunnel: peer closed: %s: %s", e.Code, e.Message)
}

// Session is one tunnel after a successful handshake.
type Session struct {
	c     *wsConn
	cfg   Config
	hello protocol.Hello
	proto string
	role  role
	// instance is the agent's instance id: from its gateway_hello_ack on
	// the gateway, Config.Instance on the agent.
	instance string

	ctrl chan protocol.Message

	mux muxer

	hbSeq atomic.Uint64
	rtt   atomic.Int64
}

// Server runs the gateway's side of the handshake on an upgraded WebSocket:
// it sends hello, waits for the agent's gateway_hello_ack and starts the
// chosen mode. On error the WebSocket is closed.
func Server(ctx context.Context, ws *websocket.Conn, hello *protocol.Hello, cfg Config) (*Session, error) {
	cfg = cfg.withDefaults()
	if err := hello.Validate(); err != nil {
		ws.Close()
		return nil, fmt.Errorf("tunnel: invalid hello: %w", err)
	}
	c := newWSConn(ws, hello.MaxMessageSize, cfg.WriteTimeout, cfg.clock)
	s := &Session{c: c, cfg: cfg, hello: *hello, role: gatewayRole}
	ack, err := s.handshakeServer(ctx)
	if err != nil {
		c.fail(err)
		return nil, err
	}
	if err := s.start(ack.Protocol); err != nil {
		c.fail(err)
		return nil, err
	}
	return s, nil
}

func (s *Session) handshakeServer(ctx context.Context) (*protocol.HelloAck, error) {
	if err := s.sendControl(&s.hello); err != nil {
		return nil, err
	}
	m, err := s.readHandshake(ctx)
	if err != nil {
		return nil, fmt.Errorf("tunnel: waiting for gateway_hello_ack: %w", err)
	}
	ack, ok := m.(*protocol.HelloAck)
	if !ok {
		return nil, fmt.Errorf("%w: got %s, want gateway_hello_ack", ErrProtocol, m.Type())
	}
	if !s.hello.Offers(ack.Protocol) {
		s.closeWithError(protocol.CodeBadProtocol, "protocol "+ack.Protocol+" was not offered")
		return nil, fmt.Errorf("%w: agent chose %q, which was not offered", ErrProtocol, ack.Protocol)
	}
	s.instance = ack.Instance
	return ack, nil
}

// Client runs the agent's side of the handshake: it reads and validates the
// gateway's hello before acknowledging it, chooses the protocol and starts
// that mode. On error the WebSocket is closed.
func Client(ctx context.Context, ws *websocket.Conn, cfg Config) (*Session, error) {
	cfg = cfg.withDefaults()
	// Until the hello states the limit, accept messages of the largest
	// size any valid hello may announce.
	c := newWSConn(ws, protocol.MaxMessageSize, cfg.WriteTimeout, cfg.clock)
	s := &Session{c: c, cfg: cfg}
	proto, err := s.handshakeClient(ctx)
	if err != nil {
		c.fail(err)
		return nil, err
	}
	ws.SetReadLimit(int64(s.hello.MaxMessageSize))
	if err := s.start(proto); err != nil {
		c.fail(err)
		return nil, err
	}
	return s, nil
}

func (s *Session) handshakeClient(ctx context.Context) (string, error) {
	m, err := s.readHandshake(ctx)
	if err != nil {
		return "", fmt.Errorf("tunnel: waiting for gateway_hello: %w", err)
	}
	h, ok := m.(*protocol.Hello)
	if !ok {
		return "", fmt.Errorf("%w: got %s, want gateway_hello", ErrProtocol, m.Type())
	}
	s.hello = *h
	proto, err := ChooseProtocol(s.cfg.Protocol, h)
	if err != nil {
		s.closeWithError(protocol.CodeNoProtocol, err.Error())
		return "", err
	}
	s.instance = s.cfg.Instance
	ack := &protocol.HelloAck{Version: protocol.Version, Protocol: proto, Instance: s.cfg.Instance}
	if err := s.sendControl(ack); err != nil {
		return "", err
	}
	return proto, nil
}

// ChooseProtocol picks the agent's protocol: yamux unless configured to use
// json or the gateway does not offer yamux.
func ChooseProtocol(want string, h *protocol.Hello) (string, error) {
	switch want {
	case "", "auto":
		if h.Offers(protocol.ProtocolYamux) {
			return protocol.ProtocolYamux, nil
		}
		if h.Offers(protocol.ProtocolJSON) {
			return protocol.ProtocolJSON, nil
		}
		return "", fmt.Errorf("tunnel: gateway offers %v, none of which this agent speaks", h.Protocols)
	case protocol.ProtocolYamux, protocol.ProtocolJSON:
		if h.Offers(want) {
			return want, nil
		}
		return "", fmt.Errorf("tunnel: gateway.protocol is %q but the gateway offers only %v", want, h.Protocols)
	}
	return "", fmt.Errorf("tunnel: unknown protocol %q (want auto, yamux or json)", want)
}

// readHandshake reads one control message with the handshake deadline.
func (s *Session) readHandshake(ctx context.Context) (protocol.Message, error) {
	deadline := time.Now().Add(s.cfg.HandshakeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	s.c.ws.SetReadDeadline(deadline)
	defer s.c.ws.SetReadDeadline(time.Time{})
	stop := context.AfterFunc(ctx, func() { s.c.ws.SetReadDeadline(time.Now()) })
	defer stop()
	typ, b, err := s.c.readMessage()
	if err != nil {
		return nil, err
	}
	if typ != websocket.TextMessage {
		return nil, fmt.Errorf("%w: binary message during handshake", ErrProtocol)
	}
	m, err := protocol.Decode(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	if e, ok := m.(*protocol.Error); ok {
		return nil, &PeerError{Code: e.Code, Message: e.Message}
	}
	return m, nil
}

// start runs the chosen mode: its muxer, which from now on reads the
// socket, and the session's chores in the writer goroutine (heartbeats,
// then closing the muxer).
func (s *Session) start(proto string) error {
	s.proto = proto
	s.ctrl = make(chan protocol.Message, 16)
	var muxClosed <-chan struct{}
	if proto == protocol.ProtocolYamux {
		m, err := newYamuxMux(s.c, s.role, &s.cfg, s.handleControl)
		if err != nil {
			return err
		}
		s.mux = m
		muxClosed = m.ym.CloseChan()
		// yamux reads binary messages through its own path; the text
		// buffer of the handshake is not needed again.
		s.c.rxBuf = nil
	} else {
		s.mux = newJSONMux(s.c, s.role, &s.hello, s.cfg.MaxStreams, s.handleControl)
	}
	interval := s.hello.HeartbeatInterval()
	ticks, stop := s.cfg.clock.tick(interval / 4)
	s.c.startChores(chores{
		ticks: ticks, stop: stop, tick: s.keepalive(interval), muxClosed: muxClosed,
		end: func() { s.mux.close(s.c.Err()) },
	})
	return nil
}

// keepalive returns the heartbeat chore, called four times per interval:
// it produces a heartbeat every interval and ends the session when nothing
// has arrived for 2.5 intervals. Checking four times per interval bounds
// detection to 2.75 intervals after the last message. Time comes from the
// session's clock only, so tests can check these bounds exactly.
func (s *Session) keepalive(interval time.Duration) func() (*[]byte, error) {
	timeout := interval * 5 / 2
	var next time.Duration // when the next heartbeat is due, on s.c's clock
	return func() (*[]byte, error) {
		if s.c.sinceRecv() > timeout {
			return nil, ErrPeerTimeout
		}
		now := time.Duration(s.c.now())
		if now < next {
			return nil, nil
		}
		next = now + interval
		return heartbeatMsg(false, s.hbSeq.Add(1), s.c.now()), nil
	}
}

// heartbeatMsg encodes a heartbeat (or its ack) straight into a pooled
// buffer: every idle session sends and answers one per interval.
func heartbeatMsg(ack bool, seq uint64, ts int64) *[]byte {
	buf := pool.Get(protocol.HeartbeatLen)
	*buf = protocol.AppendHeartbeat((*buf)[:0], ack, seq, ts)
	return buf
}

// handleControl is the session's controlHandler: it handles one decoded
// control message from the muxer's reader. It must not block for long: in
// yamux mode it runs inside yamux's receive loop.
func (s *Session) handleControl(m protocol.Message) error {
	switch m := m.(type) {
	case *protocol.Heartbeat:
		return s.c.queueControl(outMsg{typ: websocket.TextMessage, buf: heartbeatMsg(true, m.Seq, m.TS)})
	case *protocol.HeartbeatAck:
		if rtt := s.c.now() - m.TS; rtt >= 0 {
			s.rtt.Store(rtt)
		}
		return nil
	case *protocol.Error:
		return &PeerError{Code: m.Code, Message: m.Message}
	case *protocol.Register:
		if s.role != gatewayRole {
			return fmt.Errorf("%w: register sent to the agent", ErrProtocol)
		}
	case *protocol.RegisterAck:
		if s.role == gatewayRole {
			return fmt.Errorf("%w: register_ack sent to the gateway", ErrProtocol)
		}
	default:
		return fmt.Errorf("%w: unexpected %s", ErrProtocol, m.Type())
	}
	select {
	case s.ctrl <- m:
		return nil
	case <-s.c.done:
		return s.c.Err()
	}
}

// sendControl encodes m and queues it ahead of data.
func (s *Session) sendControl(m protocol.Message) error {
	b, err := protocol.Encode(m)
	if err != nil {
		return err
	}
	return s.c.queueControlText(b)
}

// closeWithError sends an error message, then closes once it is written
// (or after a second, if the socket is stuck).
func (s *Session) closeWithError(code protocol.ErrorCode, msg string) {
	b, err := protocol.Encode(&protocol.Error{Code: code, Message: msg})
	if err == nil && s.c.queueControl(outMsg{typ: websocket.TextMessage, buf: getCopy(b), closeAfter: true}) == nil {
		select {
		case <-s.c.done:
			return
		case <-time.After(time.Second):
		}
	}
	s.c.fail(nil)
}

// Send sends a control message (register, register_ack) to the peer.
func (s *Session) Send(m protocol.Message) error { return s.sendControl(m) }

// Control delivers register (on the gateway) and register_ack (on the
// agent) messages. Heartbeats are handled inside the session. The channel
// is never closed; select on Done too.
func (s *Session) Control() <-chan protocol.Message { return s.ctrl }

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.c.done }

// Err returns why the session ended, or nil while it runs.
func (s *Session) Err() error { return s.c.Err() }

// Close ends the session.
func (s *Session) Close() { s.c.fail(nil) }

// CloseWithError tells the peer why, then ends the session.
func (s *Session) CloseWithError(code protocol.ErrorCode, msg string) { s.closeWithError(code, msg) }

// Protocol returns the negotiated mode: "yamux" or "json".
func (s *Session) Protocol() string { return s.proto }

// Hello returns the gateway_hello of this session.
func (s *Session) Hello() *protocol.Hello { return &s.hello }

// Instance returns the agent process's instance id ("" when the agent sent
// none).
func (s *Session) Instance() string { return s.instance }

// RTT returns the last heartbeat round-trip time (0 until one completed).
func (s *Session) RTT() time.Duration { return time.Duration(s.rtt.Load()) }

// Open opens a stream to the agent (gateway side only). It returns without
// waiting for the agent's status, so that the client's first bytes travel
// with the header; the first Read returns the status as a
// *protocol.OpenError when it is not ok. Use WaitOpen to wait for it.
func (s *Session) Open(ctx context.Context, h protocol.StreamHeader) (Stream, error) {
	if s.role != gatewayRole {
		return nil, ErrWrongSide
	}
	return s.mux.open(ctx, h)
}

// Accept returns the next stream the gateway opened (agent side only).
func (s *Session) Accept(ctx context.Context) (*Incoming, error) {
	if s.role == gatewayRole {
		return nil, ErrWrongSide
	}
	return s.mux.accept(ctx)
}
