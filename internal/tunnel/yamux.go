package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	yamux "github.com/libp2p/go-yamux/v5"

	"github.com/portway/portway/internal/pool"
	"github.com/portway/portway/internal/protocol"
)

// yamuxMux is the yamux mode: each stream is a yamux stream, and yamux's
// frames travel as binary messages.
type yamuxMux struct {
	c  *wsConn
	ym *yamux.Session
	// headerTimeout bounds the agent's read of a stream header.
	headerTimeout time.Duration
}

// newYamuxMux starts yamux on c: as yamux's client on the gateway, which
// opens the streams (odd ids), as its server on the agent. yamux's receive
// loop becomes the session's only reader; control messages met on the way
// go to onControl.
func newYamuxMux(c *wsConn, r role, sc *Config, onControl controlHandler) (*yamuxMux, error) {
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = false // the session's heartbeats detect dead peers
	cfg.MeasureRTTInterval = 10 * time.Second
	cfg.AcceptBacklog = 1024
	cfg.MaxIncomingStreams = uint32(sc.MaxStreams)
	cfg.MaxStreamWindowSize = uint32(sc.MaxStreamWindow)
	cfg.ReadBufSize = 0 // the WebSocket reader buffers: see wsReadBuffer
	if r == gatewayRole {
		// What a gateway holds per idle agent is kept to what the
		// session uses. The accept backlog is a channel allocated whole;
		// the gateway accepts no stream, and the backlog bounds only its
		// own opens awaiting the agent's ACK. Streams the agent opens are
		// reset by yamux at once (MaxIncomingStreams 0), with no goroutine
		// waiting to refuse them and nothing parked.
		cfg.AcceptBacklog = 256
		cfg.MaxIncomingStreams = 0
	}
	cfg.ConnectionWriteTimeout = sc.WriteTimeout
	cfg.LogOutput = newLogWriter(sc.Logger, c.done)
	budget := &windowBudget{limit: int64(sc.SessionWindowMemory)}
	conn := &yamuxConn{c: c, onControl: onControl}
	m := &yamuxMux{c: c, headerTimeout: sc.HandshakeTimeout}
	var err error
	if r == gatewayRole {
		m.ym, err = yamux.Client(conn, cfg, budget.span)
	} else {
		m.ym, err = yamux.Server(conn, cfg, budget.span)
	}
	if err != nil {
		// Only an invalid config gets here.
		return nil, fmt.Errorf("tunnel: start yamux: %w", err)
	}
	// The session's monitor ends the session when yamux closes on its
	// own (Session.monitor).
	return m, nil
}

// close ends yamux and with it every stream.
func (m *yamuxMux) close(error) { m.ym.Close() }

// yamuxConn is the net.Conn yamux runs on. Reads come from binary messages;
// text messages met on the way are control messages, handled in place, so
// yamux's receive loop is the session's only reader. Each Write from yamux's
// send loop is one whole frame (go-yamux builds header and body in one
// buffer) and becomes one binary message, written by that loop itself.
type yamuxConn struct {
	c         *wsConn
	onControl controlHandler
	r         io.Reader // the current binary message
}

func (a *yamuxConn) Read(p []byte) (int, error) {
	for {
		if a.r != nil {
			n, err := a.r.Read(p)
			if err == io.EOF {
				a.r = nil
				err = nil
			}
			if err != nil {
				a.c.fail(fmt.Errorf("tunnel: read: %w", err))
				return n, err
			}
			if n > 0 || len(p) == 0 {
				return n, nil
			}
			continue
		}
		typ, r, err := a.c.ws.NextReader()
		if err != nil {
			a.c.fail(fmt.Errorf("tunnel: read: %w", err))
			return 0, err
		}
		a.c.touch()
		if typ == websocket.BinaryMessage {
			a.r = r
			continue
		}
		if err := a.readText(r); err != nil {
			a.c.fail(err)
			return 0, err
		}
	}
}

// readText reads and handles one text message in yamux mode.
func (a *yamuxConn) readText(r io.Reader) error {
	buf := pool.Get(64 << 10)
	defer pool.Put(buf)
	b := (*buf)[:0]
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)] // rare: control messages above 64 KiB
		}
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("tunnel: read: %w", err)
		}
	}
	m, err := protocol.Decode(b)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	switch m.(type) {
	case *protocol.Open, *protocol.OpenResult, *protocol.Data, *protocol.Close, *protocol.Credit:
		return fmt.Errorf("%w: JSON-mode message %s in yamux mode", ErrProtocol, m.Type())
	}
	return a.onControl(m)
}

// Write sends one yamux frame as one binary message, from yamux's send
// loop, which is its only caller: go-yamux's frame is already its own copy
// of the data, so it goes to the WebSocket as it is.
func (a *yamuxConn) Write(p []byte) (int, error) {
	if err := a.c.writeDirect(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (a *yamuxConn) Close() error {
	a.c.fail(errors.New("tunnel: yamux session closed"))
	return nil
}

func (a *yamuxConn) LocalAddr() net.Addr  { return a.c.ws.LocalAddr() }
func (a *yamuxConn) RemoteAddr() net.Addr { return a.c.ws.RemoteAddr() }

// Deadlines belong to the WebSocket writer and the heartbeat, not to yamux.
func (a *yamuxConn) SetDeadline(time.Time) error      { return nil }
func (a *yamuxConn) SetReadDeadline(time.Time) error  { return nil }
func (a *yamuxConn) SetWriteDeadline(time.Time) error { return nil }

func (m *yamuxMux) open(ctx context.Context, h protocol.StreamHeader) (Stream, error) {
	st, err := m.ym.OpenStream(ctx)
	if err != nil {
		return nil, fmt.Errorf("tunnel: open stream: %w", err)
	}
	var buf [protocol.MaxHeaderLen]byte
	hdr, err := protocol.AppendHeader(buf[:0], h)
	if err != nil {
		st.Reset()
		return nil, err
	}
	if _, err := st.Write(hdr); err != nil {
		st.Reset()
		return nil, fmt.Errorf("tunnel: write stream header: %w", err)
	}
	return &openedStream{Stream: st}, nil
}

// openedStream is a gateway-opened yamux stream whose first byte from the
// agent is the status.
type openedStream struct {
	*yamux.Stream
	once   sync.Once
	status error
	ok     atomic.Bool
}

func (o *openedStream) waitOpen(ctx context.Context) error {
	o.once.Do(func() {
		if d, ok := ctx.Deadline(); ok {
			o.Stream.SetReadDeadline(d)
		}
		stop := context.AfterFunc(ctx, func() { o.Stream.SetReadDeadline(time.Now()) })
		var b [1]byte
		_, err := io.ReadFull(o.Stream, b[:])
		stop()
		o.Stream.SetReadDeadline(time.Time{})
		if err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			o.status = fmt.Errorf("tunnel: waiting for stream status: %w", err)
			return
		}
		st, err := protocol.ParseStatusByte(b[0])
		if err != nil {
			o.status = fmt.Errorf("%w: %w", ErrProtocol, err)
			return
		}
		if st != protocol.StatusOK {
			o.status = &protocol.OpenError{Status: st}
			return
		}
		o.ok.Store(true)
	})
	return o.status
}

// WaitReadable relies on go-yamux returning from a zero-length Read only
// once data is buffered or the stream has ended.
func (o *openedStream) WaitReadable() error {
	_, err := o.Read(nil)
	return err
}

func (o *openedStream) Read(p []byte) (int, error) {
	if !o.ok.Load() {
		if err := o.waitOpen(context.Background()); err != nil {
			return 0, err
		}
	}
	return o.Stream.Read(p)
}

func (m *yamuxMux) accept(ctx context.Context) (*Incoming, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	st, err := m.ym.AcceptStream()
	if err != nil {
		if e := m.c.Err(); e != nil {
			return nil, e
		}
		return nil, fmt.Errorf("tunnel: accept: %w", err)
	}
	timeout := m.headerTimeout
	return &Incoming{
		readHeader: func() (protocol.StreamHeader, error) {
			st.SetReadDeadline(time.Now().Add(timeout))
			h, err := protocol.ReadHeader(st)
			st.SetReadDeadline(time.Time{})
			if err != nil {
				st.Reset()
			}
			return h, err
		},
		reply: func(status protocol.Status) (Stream, error) {
			if _, err := st.Write([]byte{byte(status)}); err != nil {
				st.Reset()
				return nil, fmt.Errorf("tunnel: write stream status: %w", err)
			}
			if status != protocol.StatusOK {
				st.Close()
				return nil, nil
			}
			return acceptedStream{st}, nil
		},
	}, nil
}

// acceptedStream is an agent-side yamux stream.
type acceptedStream struct{ *yamux.Stream }

func (a acceptedStream) WaitReadable() error {
	_, err := a.Stream.Read(nil)
	return err
}

// windowBudget caps how far yamux may grow the receive windows of one
// session's streams beyond their initial 256 KiB.
type windowBudget struct {
	used  atomic.Int64
	limit int64
}

var errWindowBudget = errors.New("tunnel: session window budget exhausted")

func (b *windowBudget) span() (yamux.MemoryManager, error) { return &budgetSpan{b: b}, nil }

type budgetSpan struct {
	b        *windowBudget
	reserved atomic.Int64
}

// yamux reserves with priority 255 for a stream's initial window; those
// are bounded by MaxStreams and always granted. Growth comes at lower
// priority and is what the budget caps.
func (sp *budgetSpan) ReserveMemory(size int, prio uint8) error {
	if prio == 255 {
		return nil
	}
	if sp.b.used.Add(int64(size)) > sp.b.limit {
		sp.b.used.Add(-int64(size))
		return errWindowBudget
	}
	sp.reserved.Add(int64(size))
	return nil
}

func (sp *budgetSpan) ReleaseMemory(size int) {
	sp.reserved.Add(-int64(size))
	sp.b.used.Add(-int64(size))
}

func (sp *budgetSpan) Done() { sp.b.used.Add(-sp.reserved.Swap(0)) }

// logWriter turns yamux's log lines into structured log records, at most
// one per logInterval: some of yamux's warnings come once per stream (a
// backlog or stream limit exceeded), and a flood of streams must not become
// a flood of log lines. Lines dropped in between are counted in the next.
// Once the session is closing (done is closed), yamux's complaints about the
// closed connection are consequences of the close, whose reason the session
// reports, so they are dropped.
type logWriter struct {
	log  interface{ Warn(string, ...any) }
	now  func() time.Time
	done <-chan struct{}

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// logInterval is the least time between two yamux log lines.
const logInterval = time.Second

func newLogWriter(log interface{ Warn(string, ...any) }, done <-chan struct{}) *logWriter {
	return &logWriter{log: log, now: time.Now, done: done}
}

func (w *logWriter) Write(p []byte) (int, error) {
	select {
	case <-w.done:
		return len(p), nil
	default:
	}
	w.mu.Lock()
	now := w.now()
	if !w.last.IsZero() && now.Sub(w.last) < logInterval {
		w.suppressed++
		w.mu.Unlock()
		return len(p), nil
	}
	w.last = now
	suppressed := w.suppressed
	w.suppressed = 0
	w.mu.Unlock()

	msg := strings.TrimSpace(string(p))
	// go-yamux's logger stamps "2006/01/02 15:04:05 "; slog has the time.
	if len(msg) > 20 && msg[4] == '/' && msg[7] == '/' && msg[10] == ' ' && msg[19] == ' ' {
		msg = msg[20:]
	}
	if suppressed > 0 {
		w.log.Warn("yamux", "detail", msg, "suppressed_since_last", suppressed)
	} else {
		w.log.Warn("yamux", "detail", msg)
	}
	return len(p), nil
}
