package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	yamux "github.com/libp2p/go-yamux/v5"

	"github.com/portway/portway/internal/protocol"
)

var modes = []string{protocol.ProtocolYamux, protocol.ProtocolJSON}

func testHello(protocols ...string) *protocol.Hello {
	return &protocol.Hello{
		Version: 1, Protocols: protocols, HeartbeatIntervalMS: 1000,
		MaxMessageSize: 1 << 20, MaxServices: 100, StreamWindow: 256 << 10,
	}
}

// pair connects a gateway and an agent session over a real WebSocket on
// loopback.
func pair(t *testing.T, hello *protocol.Hello, agentProto string) (gw, ag *Session) {
	t.Helper()
	gwCh := make(chan *Session, 1)
	errCh := make(chan error, 1)
	up := NewUpgrader(5 * time.Second)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			errCh <- err
			return
		}
		s, err := Server(r.Context(), ws, hello, Config{})
		if err != nil {
			errCh <- err
			return
		}
		gwCh <- s
	}))
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, err := Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http")+Path, DialOptions{Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	ag, err = Client(ctx, ws, Config{Protocol: agentProto})
	if err != nil {
		t.Fatalf("agent handshake: %v", err)
	}
	select {
	case gw = <-gwCh:
	case err := <-errCh:
		t.Fatalf("gateway handshake: %v", err)
	case <-ctx.Done():
		t.Fatal("gateway handshake timed out")
	}
	t.Cleanup(func() { gw.Close(); ag.Close() })
	return gw, ag
}

// serveEcho accepts streams on the agent and echoes them: TCP streams byte
// for byte with half-close, UDP streams datagram for datagram. Services
// named "reject-*" are refused with StatusUnknownService.
func serveEcho(t *testing.T, ag *Session) {
	go func() {
		for {
			in, err := ag.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				h, err := in.Header()
				if err != nil {
					return
				}
				if strings.HasPrefix(h.Service, "reject-") {
					in.Reject(protocol.StatusUnknownService)
					return
				}
				st, err := in.Accept()
				if err != nil {
					return
				}
				defer st.Close()
				if h.Kind == protocol.KindUDP {
					pc := AsPackets(st)
					buf := make([]byte, PacketHeadroom+protocol.MaxDatagram)
					for {
						n, err := pc.ReadPacket(buf[PacketHeadroom:])
						if err != nil {
							return
						}
						if pc.WritePacket(buf[:PacketHeadroom+n]) != nil {
							return
						}
					}
				}
				io.Copy(st, st)
				st.CloseWrite()
			}()
		}
	}()
}

func TestHandshakeChoosesProtocol(t *testing.T) {
	cases := []struct {
		offer []string
		agent string
		want  string
	}{
		{[]string{"yamux", "json"}, "auto", "yamux"},
		{[]string{"json", "yamux"}, "auto", "yamux"},
		{[]string{"json"}, "auto", "json"},
		{[]string{"yamux", "json"}, "json", "json"},
		{[]string{"yamux"}, "yamux", "yamux"},
	}
	for _, c := range cases {
		gw, ag := pair(t, testHello(c.offer...), c.agent)
		if gw.Protocol() != c.want || ag.Protocol() != c.want {
			t.Errorf("offer %v agent %q: gateway %q agent %q, want %q", c.offer, c.agent, gw.Protocol(), ag.Protocol(), c.want)
		}
	}
}

func TestHandshakeNoCommonProtocol(t *testing.T) {
	srvErr := make(chan error, 1)
	up := NewUpgrader(5 * time.Second)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, _ := up.Upgrade(w, r, nil)
		_, err := Server(r.Context(), ws, testHello("json"), Config{})
		srvErr <- err
	}))
	defer srv.Close()
	ws, err := Dial(context.Background(), "ws"+strings.TrimPrefix(srv.URL, "http"), DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = Client(context.Background(), ws, Config{Protocol: "yamux"})
	if err == nil || !strings.Contains(err.Error(), "offers only [json]") {
		t.Fatalf("agent err = %v, want one naming the offered protocols", err)
	}
	var pe *PeerError
	if err := <-srvErr; !errors.As(err, &pe) || pe.Code != "no_protocol" {
		t.Fatalf("gateway err = %v, want the agent's no_protocol error", err)
	}
}

func TestHandshakeRejectsBadHello(t *testing.T) {
	up := NewUpgrader(5 * time.Second)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, _ := up.Upgrade(w, r, nil)
		defer ws.Close()
		// A hello with a 1 KiB window, which the agent must refuse before acking.
		ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"gateway_hello","version":1,"protocols":["json"],"heartbeat_interval_ms":1000,"max_message_size":1048576,"max_services":1,"stream_window":1024}`))
		ws.ReadMessage()
	}))
	defer srv.Close()
	ws, err := Dial(context.Background(), "ws"+strings.TrimPrefix(srv.URL, "http"), DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Client(context.Background(), ws, Config{}); !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "stream_window") {
		t.Fatalf("err = %v, want a protocol error naming stream_window", err)
	}
}

func TestStreamEchoLarge(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			gw, ag := pair(t, testHello("yamux", "json"), mode)
			serveEcho(t, ag)
			payload := make([]byte, 8<<20)
			rand.Read(payload)
			st, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "echo"})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			go func() {
				st.Write(payload)
				st.CloseWrite()
			}()
			got, err := io.ReadAll(st)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if !bytes.Equal(got, payload) {
				t.Fatalf("echo of %d bytes returned %d bytes, equal=false", len(payload), len(got))
			}
		})
	}
}

func TestHalfCloseCarried(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			gw, ag := pair(t, testHello("yamux", "json"), mode)
			// The agent reads to EOF, then answers: the reply must arrive
			// after the gateway's half-close.
			go func() {
				in, err := ag.Accept(context.Background())
				if err != nil {
					return
				}
				in.Header()
				st, _ := in.Accept()
				req, _ := io.ReadAll(st)
				fmt.Fprintf(st, "got %d bytes", len(req))
				st.CloseWrite()
				st.Close()
			}()
			st, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "x"})
			if err != nil {
				t.Fatal(err)
			}
			st.Write(make([]byte, 100000))
			st.CloseWrite()
			reply, err := io.ReadAll(st)
			if err != nil || string(reply) != "got 100000 bytes" {
				t.Fatalf("reply = %q, %v", reply, err)
			}
		})
	}
}

func TestRejectedOpen(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			gw, ag := pair(t, testHello("yamux", "json"), mode)
			serveEcho(t, ag)
			st, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "reject-me"})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var oe *protocol.OpenError
			if err := WaitOpen(ctx, st); !errors.As(err, &oe) || oe.Status != protocol.StatusUnknownService {
				t.Fatalf("WaitOpen = %v, want unknown_service", err)
			}
			if _, err := st.Read(make([]byte, 1)); !errors.As(err, &oe) {
				t.Fatalf("Read after refusal = %v, want the OpenError", err)
			}
		})
	}
}

func TestConcurrentStreams(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			gw, ag := pair(t, testHello("yamux", "json"), mode)
			serveEcho(t, ag)
			var wg sync.WaitGroup
			errs := make(chan error, 200)
			for i := 0; i < 200; i++ {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					st, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "echo"})
					if err != nil {
						errs <- err
						return
					}
					defer st.Close()
					msg := bytes.Repeat([]byte{byte(i)}, 10000+i)
					go func() { st.Write(msg); st.CloseWrite() }()
					got, err := io.ReadAll(st)
					if err != nil || !bytes.Equal(got, msg) {
						errs <- fmt.Errorf("stream %d: %d bytes, %v", i, len(got), err)
					}
				}(i)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

// A stream whose reader stops must not stall other streams: flow control is
// per stream in both modes.
func TestStalledStreamDoesNotBlockOthers(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			gw, ag := pair(t, testHello("yamux", "json"), mode)
			serveEcho(t, ag)
			stalled, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "echo"})
			if err != nil {
				t.Fatal(err)
			}
			defer stalled.Reset()
			// Nobody reads the echo of this stream: the agent's writes
			// fill the window, then its io.Copy blocks, and so, once the
			// agent's receive window is full, does this write.
			var written atomic.Int64
			stalledWrote := make(chan struct{})
			go func() {
				defer close(stalledWrote)
				chunk := make([]byte, 64<<10)
				for i := 0; i < 1024; i++ { // 64 MiB: more than every window
					n, err := stalled.Write(chunk)
					written.Add(int64(n))
					if err != nil {
						return
					}
				}
			}()
			// Wait for the stall (no progress for half a second, bounded)
			// so that the second stream starts behind a full window.
			last, still := int64(-1), 0
			for i := 0; i < 200 && still < 10; i++ {
				if n := written.Load(); n > 0 && n == last {
					still++
				} else {
					last, still = n, 0
				}
				time.Sleep(50 * time.Millisecond)
			}
			stalledAt := written.Load()

			st, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "echo"})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			done := make(chan error, 1)
			go func() {
				msg := []byte("still flowing")
				st.Write(msg)
				got := make([]byte, len(msg))
				_, err := io.ReadFull(st, got)
				if err == nil && !bytes.Equal(got, msg) {
					err = fmt.Errorf("got %q", got)
				}
				done <- err
			}()
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("second stream stalled behind the first")
			}
			// The first stream really was stalled while the second flowed.
			select {
			case <-stalledWrote:
				t.Fatal("the first stream's writes completed: it never stalled, so the test proved nothing")
			default:
			}
			t.Logf("first stream stalled after %d KiB (%d KiB when the second stream was done)", stalledAt>>10, written.Load()>>10)
		})
	}
}

func TestDatagramBoundaries(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			gw, ag := pair(t, testHello("yamux", "json"), mode)
			serveEcho(t, ag)
			st, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindUDP, Service: "dns"})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			if err := WaitOpen(context.Background(), st); err != nil {
				t.Fatal(err)
			}
			pc := AsPackets(st)
			buf := make([]byte, protocol.MaxDatagram)
			for _, n := range []int{0, 1, 1400, 8192, 65000, protocol.MaxDatagram} {
				frame := make([]byte, PacketHeadroom+n)
				rand.Read(frame[PacketHeadroom:])
				if err := pc.WritePacket(frame); err != nil {
					t.Fatalf("write %d: %v", n, err)
				}
				got, err := pc.ReadPacket(buf)
				if err != nil || got != n || !bytes.Equal(buf[:got], frame[PacketHeadroom:]) {
					t.Fatalf("datagram of %d bytes came back as %d bytes (%v)", n, got, err)
				}
			}
		})
	}
}

// rawAgent completes the handshake by hand and returns the raw WebSocket, so
// tests can send what a well-behaved agent never would.
func rawAgent(t *testing.T, proto string) (*websocket.Conn, chan *Session) {
	t.Helper()
	return rawAgentConfig(t, proto, Config{})
}

// rawAgentConfig is rawAgent with the gateway session's config.
func rawAgentConfig(t *testing.T, proto string, cfg Config) (*websocket.Conn, chan *Session) {
	t.Helper()
	gwCh := make(chan *Session, 1)
	up := NewUpgrader(5 * time.Second)
	h := testHello("yamux", "json")
	h.HeartbeatIntervalMS = 200
	h.MaxMessageSize = protocol.MinMessageSize
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, _ := up.Upgrade(w, r, nil)
		s, err := Server(r.Context(), ws, h, cfg)
		if err == nil {
			gwCh <- s
		}
	}))
	t.Cleanup(srv.Close)
	ws, err := Dial(context.Background(), "ws"+strings.TrimPrefix(srv.URL, "http"), DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	if _, _, err := ws.ReadMessage(); err != nil {
		t.Fatal(err)
	}
	ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"gateway_hello_ack","version":1,"protocol":"`+proto+`"}`))
	return ws, gwCh
}

func waitEnd(t *testing.T, s *Session) error {
	t.Helper()
	select {
	case <-s.Done():
		return s.Err()
	case <-time.After(20 * time.Second): // a hang guard only
		t.Fatal("session did not end")
		return nil
	}
}

func TestSessionEndsOnBadInput(t *testing.T) {
	cases := []struct {
		name, proto string
		typ         int
		msg         []byte
		want        string
	}{
		{"garbage text", "yamux", websocket.TextMessage, []byte("\x00garbage"), "protocol violation"},
		{"garbage text json", "json", websocket.TextMessage, []byte("{not json"), "protocol violation"},
		{"unknown type", "json", websocket.TextMessage, []byte(`{"type":"launch"}`), "unknown type"},
		{"binary in json mode", "json", websocket.BinaryMessage, []byte{1, 2, 3}, "binary message in json mode"},
		{"raw newline in data", "json", websocket.TextMessage, []byte("{\"type\":\"tcp_data\",\"id\":1,\"data\":\"aGk\n=\"}"), "raw line break"},
		{"json data in yamux mode", "yamux", websocket.TextMessage, []byte(`{"type":"tcp_data","id":1,"data":""}`), "in yamux mode"},
		{"second hello", "json", websocket.TextMessage, mustEncode(testHello("json")), "unexpected gateway_hello"},
		{"register_ack to gateway", "json", websocket.TextMessage, []byte(`{"type":"register_ack","seq":1,"endpoints":[]}`), "register_ack sent to the gateway"},
		{"open to gateway", "json", websocket.TextMessage, []byte(`{"type":"tcp_open","id":1,"service":"x"}`), "sent to the gateway"},
		{"oversized", "json", websocket.TextMessage, append([]byte(`{"type":"heartbeat","seq":1,"ts":1,"pad":"`), append(bytes.Repeat([]byte("a"), protocol.MinMessageSize), '"', '}')...), "read limit"},
		{"bad yamux frame", "yamux", websocket.BinaryMessage, []byte{9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9}, "yamux"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ws, gwCh := rawAgent(t, c.proto)
			gw := <-gwCh
			ws.WriteMessage(c.typ, c.msg)
			err := waitEnd(t, gw)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("session ended with %v, want it to mention %q", err, c.want)
			}
		})
	}
}

func TestCreditViolationEndsSession(t *testing.T) {
	gw, ag := pair(t, testHello("json"), "json")
	if _, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "x"}); err != nil {
		t.Fatal(err)
	}
	// Impersonate a misbehaving agent by pushing data beyond the window
	// straight into the agent's socket writer.
	in, err := ag.Accept(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	in.Accept()
	big := make([]byte, 48<<10)
	for i := 0; i < 8; i++ { // 384 KiB > 256 KiB window, never credited
		ag.c.queueDataText(protocol.AppendData(nil, protocol.KindTCP, 1, big))
	}
	if err := waitEnd(t, gw); !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "beyond its credit") {
		t.Fatalf("err = %v, want a credit violation", err)
	}
}

// A peer that grants credit beyond the window loses its session, also
// where int has 32 bits and 1<<31 bytes of credit would wrap negative: the
// session ends with a protocol error and a Write fails instead of panicking.
func TestCreditOverflowEndsSession(t *testing.T) {
	for _, n := range []uint32{1 << 31, 1<<32 - 1, 1<<31 + 256<<10} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			gw, ag := pair(t, testHello("json"), "json")
			st, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "x"})
			if err != nil {
				t.Fatal(err)
			}
			in, err := ag.Accept(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if _, err := in.Accept(); err != nil {
				t.Fatal(err)
			}
			// The credit, then data behind it on the same queue: once the
			// gateway's stream could read the data, it had taken the credit.
			ag.c.queueControlText(protocol.AppendCredit(nil, 1, n))
			ag.c.queueControlText(protocol.AppendData(nil, protocol.KindTCP, 1, []byte("after")))
			read := make(chan error, 1)
			go func() {
				_, err := st.Read(make([]byte, 16))
				read <- err
			}()
			select {
			case err := <-read:
				if err == nil {
					t.Fatalf("credit of %d bytes was accepted: data after it was delivered; a Write then: %v", n, tryWrite(st))
				}
			case <-time.After(20 * time.Second):
				t.Fatal("stream read hung")
			}
			if err := waitEnd(t, gw); !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "exceeds the window") {
				t.Fatalf("session ended with %v, want a credit violation", err)
			}
			if err := tryWrite(st); err == nil || strings.HasPrefix(err.Error(), "panic") {
				t.Fatalf("Write on the ended session: %v", err)
			}
		})
	}
}

// tryWrite writes to st and returns the error, or the panic as an error.
func tryWrite(st Stream) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	_, err = st.Write(make([]byte, 64<<10))
	return err
}

func TestSilentPeerTimesOut(t *testing.T) {
	ws, gwCh := rawAgent(t, "json")
	_ = ws // completes the handshake, then never speaks again
	gw := <-gwCh
	// On the wall clock only a hang guard: TestHeartbeatDetectionBounds
	// checks the bounds on a fake clock.
	if err := waitEnd(t, gw); !errors.Is(err, ErrPeerTimeout) {
		t.Fatalf("err = %v, want ErrPeerTimeout", err)
	}
}

// fakeClock is a clock the test moves by hand. Its tick channel is
// unbuffered: a tick delivered has been taken by the session's loop.
type fakeClock struct {
	mu      sync.Mutex
	t       time.Time
	period  time.Duration
	ticks   chan time.Time
	started chan struct{} // closed once the session asked for its ticker
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Unix(1e9, 0), ticks: make(chan time.Time), started: make(chan struct{})}
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) tick(d time.Duration) (<-chan time.Time, func()) {
	c.mu.Lock()
	c.period = d
	c.mu.Unlock()
	close(c.started)
	return c.ticks, func() {}
}

// heartbeatDriver moves a fake clock for one session, delivering the
// ticks its ticker would deliver on the way.
type heartbeatDriver struct {
	t      *testing.T
	c      *fakeClock
	s      *Session
	origin time.Time     // when the ticker started
	fired  time.Duration // the last tick delivered, since origin
}

func newHeartbeatDriver(t *testing.T, c *fakeClock, s *Session) *heartbeatDriver {
	select {
	case <-c.started:
	case <-time.After(20 * time.Second):
		t.Fatal("the session never started its heartbeat ticker")
	}
	return &heartbeatDriver{t: t, c: c, s: s, origin: c.now()}
}

// advance moves the clock to origin+at, delivering every tick due on the
// way. It reports whether the session has ended by then. Each tick is
// delivered twice at the same instant: the second is taken only once the
// first was handled (and handling it again changes nothing), so when
// advance returns the session has acted on every tick up to at.
func (d *heartbeatDriver) advance(at time.Duration) (ended bool) {
	d.t.Helper()
	d.c.mu.Lock()
	period := d.c.period
	d.c.mu.Unlock()
	for next := d.fired + period; next <= at; next += period {
		d.c.mu.Lock()
		d.c.t = d.origin.Add(next)
		d.c.mu.Unlock()
		d.fired = next
		for range 2 {
			select {
			case d.c.ticks <- d.origin.Add(next):
			case <-d.s.Done():
				return true
			case <-time.After(20 * time.Second):
				d.t.Fatal("the session's heartbeat loop stopped taking ticks")
			}
		}
	}
	d.c.mu.Lock()
	d.c.t = d.origin.Add(at)
	d.c.mu.Unlock()
	select {
	case <-d.s.Done():
		return true
	default:
		return false
	}
}

// The heartbeat rule (docs/protocol.md): a side that received nothing for
// 2.5 intervals closes the session, checking four times per interval, so a
// silent peer is still alive after 2.4 intervals and gone by 2.75. Any
// message received restarts the count.
func TestHeartbeatDetectionBounds(t *testing.T) {
	const interval = 200 * time.Millisecond // rawAgent's hello
	at := func(intervals float64) time.Duration { return time.Duration(intervals * float64(interval)) }
	for _, mode := range modes {
		t.Run(mode+"/silent", func(t *testing.T) {
			clk := newFakeClock()
			_, gwCh := rawAgentConfig(t, mode, Config{clock: clk})
			gw := <-gwCh
			d := newHeartbeatDriver(t, clk, gw)
			if d.advance(at(2.4)) {
				t.Fatalf("session ended after 2.4 intervals of silence: %v", gw.Err())
			}
			if !d.advance(at(2.75)) {
				t.Fatal("session still up after 2.75 intervals of silence")
			}
			if err := gw.Err(); !errors.Is(err, ErrPeerTimeout) {
				t.Fatalf("session ended with %v, want ErrPeerTimeout", err)
			}
		})
		t.Run(mode+"/sign of life", func(t *testing.T) {
			clk := newFakeClock()
			ws, gwCh := rawAgentConfig(t, mode, Config{clock: clk})
			gw := <-gwCh
			d := newHeartbeatDriver(t, clk, gw)
			if d.advance(at(2.1)) {
				t.Fatalf("session ended after 2.1 intervals of silence: %v", gw.Err())
			}
			// A heartbeat at 2.1 intervals, off the ticker's grid; its ack
			// says the gateway has read it.
			ws.WriteMessage(websocket.TextMessage, mustEncode(&protocol.Heartbeat{Seq: 77, TS: 1}))
			ws.SetReadDeadline(time.Now().Add(20 * time.Second))
			for i := 0; ; i++ {
				typ, b, err := ws.ReadMessage()
				if err != nil || i > 1000 {
					t.Fatalf("waiting for the heartbeat_ack: %v (%d messages)", err, i)
				}
				if typ != websocket.TextMessage {
					continue // yamux frames
				}
				if m, err := protocol.Decode(b); err == nil {
					if ack, ok := m.(*protocol.HeartbeatAck); ok && ack.Seq == 77 {
						break
					}
				}
			}
			if d.advance(at(2.1 + 2.4)) {
				t.Fatalf("session ended 2.4 intervals after the last message: %v", gw.Err())
			}
			if !d.advance(at(2.1 + 2.75)) {
				t.Fatal("session still up 2.75 intervals after the last message")
			}
			if err := gw.Err(); !errors.Is(err, ErrPeerTimeout) {
				t.Fatalf("session ended with %v, want ErrPeerTimeout", err)
			}
		})
	}
}

func mustEncode(m protocol.Message) []byte {
	b, err := protocol.Encode(m)
	if err != nil {
		panic(err)
	}
	return b
}

// Streams are opened by the gateway only: one the agent opens is reset by
// the gateway's yamux at once, so nothing is parked in a backlog, and the
// session carries on (no goroutine per session waits to refuse them).
func TestAgentOpenedStreamIsReset(t *testing.T) {
	gw, ag := pair(t, testHello("yamux"), "yamux")
	st, err := ag.mux.(*yamuxMux).ym.OpenStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	st.Write(make([]byte, 1000))
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := st.Read(make([]byte, 1)); !errors.Is(err, yamux.ErrStreamReset) {
		t.Fatalf("read on the agent-opened stream: %v, want a reset", err)
	}
	if n := gw.mux.(*yamuxMux).ym.NumStreams(); n != 0 {
		t.Fatalf("the gateway holds %d streams", n)
	}
	// The session still works: a stream the gateway opens goes through.
	go func() {
		in, err := ag.Accept(context.Background())
		if err == nil {
			in.Reject(protocol.StatusRefused)
		}
	}()
	s2, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "x"})
	if err != nil {
		t.Fatal(err)
	}
	var oe *protocol.OpenError
	if _, err := s2.Read(make([]byte, 1)); !errors.As(err, &oe) {
		t.Fatalf("stream after the reset: %v, want the agent's refusal", err)
	}
	if err := gw.Err(); err != nil {
		t.Fatalf("gateway session ended: %v", err)
	}
}

func TestYamuxLogLinesLoseTheirTimestamp(t *testing.T) {
	var got []string
	done := make(chan struct{})
	w := newLogWriter(warnFunc(func(msg string, args ...any) { got = append(got, fmt.Sprint(args...)) }), done)
	w.Write([]byte("2026/11/26 01:02:03 [WARN] yamux: backlog exceeded\n"))
	if len(got) != 1 || got[0] != "detail[WARN] yamux: backlog exceeded" {
		t.Fatalf("logged %q", got)
	}
	// Once the session is closing, yamux's complaints about the closed
	// connection are not logged: the session reports why it ended.
	close(done)
	w.now = func() time.Time { return time.Now().Add(time.Hour) }
	w.Write([]byte("2026/11/26 01:02:04 [ERR] yamux: Failed to read stream data on stream 1: use of closed network connection\n"))
	if len(got) != 1 {
		t.Fatalf("logged after close: %q", got[1:])
	}
}

// A flood of per-stream warnings from yamux is logged at most once per
// interval, with the count of what was left out.
func TestYamuxLogLinesAreRateLimited(t *testing.T) {
	var got []string
	w := newLogWriter(warnFunc(func(msg string, args ...any) { got = append(got, fmt.Sprint(args...)) }), nil)
	clock := time.Unix(1000, 0)
	w.now = func() time.Time { return clock }
	line := []byte("2026/11/26 01:02:03 [WARN] yamux: MaxIncomingStreams exceeded, forcing stream reset\n")
	for range 1000 {
		if n, err := w.Write(line); n != len(line) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if len(got) != 1 {
		t.Fatalf("1000 lines within a second logged %d times: %q", len(got), got)
	}
	clock = clock.Add(logInterval)
	w.Write(line)
	want := "detail[WARN] yamux: MaxIncomingStreams exceeded, forcing stream resetsuppressed_since_last999"
	if len(got) != 2 || got[1] != want {
		t.Fatalf("after the interval logged %q, want the line with the 999 left out", got)
	}
}

type warnFunc func(string, ...any)

func (f warnFunc) Warn(msg string, args ...any) { f(msg, args...) }

// bufStream is a Stream over an in-memory buffer, for what the datagram
// framing itself costs.
type bufStream struct{ bytes.Buffer }

func (*bufStream) CloseWrite() error   { return nil }
func (*bufStream) Close() error        { return nil }
func (*bufStream) Reset() error        { return nil }
func (*bufStream) WaitReadable() error { return nil }

// Framing datagrams on a stream (yamux mode) allocates nothing per
// datagram, one at a time or in a batch.
func TestFramedPacketsAllocateNothing(t *testing.T) {
	st := &bufStream{}
	st.Grow(1 << 20)
	pc := AsPackets(st)
	fw := pc.(interface{ WriteFramed([]byte) error })
	frame := make([]byte, PacketHeadroom+100)
	batch := make([]byte, 0, 2*len(frame))
	buf := make([]byte, 200)
	allocs := testing.AllocsPerRun(200, func() {
		if err := pc.WritePacket(frame); err != nil {
			t.Fatal(err)
		}
		batch = append(append(batch[:0], frame...), frame...)
		if err := fw.WriteFramed(batch); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if n, err := pc.ReadPacket(buf); err != nil || n != 100 {
				t.Fatalf("ReadPacket = %d, %v", n, err)
			}
		}
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations per round, want 0", allocs)
	}
}

// BenchmarkFramedPackets measures framing and unframing 64-byte datagrams
// on a stream, one at a time and in batches of 32.
func BenchmarkFramedPackets(b *testing.B) {
	for _, batch := range []int{1, 32} {
		b.Run(fmt.Sprintf("batch%d", batch), func(b *testing.B) {
			st := &bufStream{}
			pc := AsPackets(st)
			fw := pc.(interface{ WriteFramed([]byte) error })
			frame := make([]byte, PacketHeadroom+64)
			if err := protocol.PutDatagramHeader(frame, 64); err != nil {
				b.Fatal(err)
			}
			frames := bytes.Repeat(frame, batch)
			buf := make([]byte, 128)
			b.SetBytes(int64(64 * batch))
			b.ReportAllocs()
			for b.Loop() {
				var err error
				if batch == 1 {
					err = pc.WritePacket(frame)
				} else {
					err = fw.WriteFramed(frames)
				}
				if err != nil {
					b.Fatal(err)
				}
				for range batch {
					if _, err := pc.ReadPacket(buf); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// The JSON streams' queue keeps FIFO order across the compaction that lets
// it reuse its array, and a drained queue holds no large array.
func TestChunkQueue(t *testing.T) {
	var q chunkQueue
	next, want := 0, 0
	bufs := make([][]byte, 1000)
	push := func(k int) {
		for range k {
			bufs[next] = make([]byte, next%7)
			q.push(chunk{buf: &bufs[next]})
			next++
		}
	}
	pop := func(k int) {
		for range k {
			if c := q.pop(); c.buf != &bufs[want] {
				t.Fatalf("pop %d returned chunk %p, want %p", want, c.buf, &bufs[want])
			}
			want++
		}
	}
	push(10)
	pop(7)
	push(30) // the array fills at the back with room at the front
	pop(20)
	push(100)
	if q.len() != next-want {
		t.Fatalf("len = %d, want %d", q.len(), next-want)
	}
	pop(next - want)
	if q.len() != 0 || cap(q.items) > keptChunks {
		t.Fatalf("drained queue: len %d, cap %d (keeps at most %d)", q.len(), cap(q.items), keptChunks)
	}
	push(5)
	pop(5)
	if cap(q.items) == 0 {
		t.Error("a small drained queue let its array go: the next burst would allocate again")
	}
}

// A stream the gateway closes while the agent's answer is on its way is
// forgotten, and the late answer ignored, also when the reader had looked
// the stream up just before the close: that answer is not a second one,
// which would end the session.
func TestOpenResultAfterCloseIsIgnored(t *testing.T) {
	for _, status := range []protocol.Status{protocol.StatusOK, protocol.StatusRefused} {
		t.Run(status.String(), func(t *testing.T) {
			gw, _ := pair(t, testHello("json"), "json")
			m := gw.mux.(*jsonMux)
			st, err := gw.Open(context.Background(), protocol.StreamHeader{Kind: protocol.KindTCP, Service: "x"})
			if err != nil {
				t.Fatal(err)
			}
			js := st.(*jsonStream)
			st.Close()
			// Where the reader's lookup found it, just before the close.
			m.mu.Lock()
			m.streams[js.id] = js
			m.mu.Unlock()
			if err := m.onOpenResult(&protocol.OpenResult{Kind: protocol.KindTCP, ID: js.id, Status: status}); err != nil {
				t.Fatalf("late open result: %v", err)
			}
			if _, err := st.Read(make([]byte, 1)); !errors.Is(err, errStreamClosed) {
				t.Fatalf("Read after Close = %v, want errStreamClosed", err)
			}
		})
	}
}
