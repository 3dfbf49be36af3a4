package e2e

// Behaviour the docs promise, each checked end to end through an in-process
// gateway and agent: session error codes, the handshake's bounds, TCP
// resets and half-closes carried through, backend dial timeouts, UDP
// refusals and keep-alive, and re-registration leaving open connections be.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testservers"
	"github.com/portway/portway/internal/testwait"
)

// rawDial upgrades with a valid token and reads the gateway_hello, without
// answering it.
func rawDial(t *testing.T, g *gw, token string) *websocket.Conn {
	t.Helper()
	ws, _, err := websocket.DefaultDialer.Dial(g.url(), http.Header{"Authorization": {"Bearer " + token}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, msg, err := ws.ReadMessage(); err != nil || !strings.Contains(string(msg), `"gateway_hello"`) {
		t.Fatalf("first message %q, %v; want the gateway_hello", msg, err)
	}
	return ws
}

// readError reads until the gateway's error message and returns its code,
// or "" if the WebSocket closed first.
func readError(t *testing.T, ws *websocket.Conn) string {
	t.Helper()
	ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i := 0; i < 100; i++ {
		_, msg, err := ws.ReadMessage()
		if err != nil {
			if isTimeout(err) {
				t.Fatal("no error message and no close within 10s")
			}
			t.Logf("closed without an error message: %v", err)
			return ""
		}
		var m struct{ Type, Code string }
		if json.Unmarshal(msg, &m) == nil && m.Type == "error" {
			return m.Code
		}
	}
	t.Fatal("100 messages without an error message")
	return ""
}

// An ack naming a protocol the gateway did not offer gets bad_protocol; an
// upgrade that never acks is cut after handshake_timeout; a message over
// max_message_size is closed with WebSocket code 1009.
func TestHandshakeAndMessageLimits(t *testing.T) {
	g := startGateway(t, func(c *config.GatewayFile) {
		c.HandshakeTimeout = config.D(time.Second)
		c.MaxMessageSize = protocol.MinMessageSize
	})
	t.Run("bad_protocol", func(t *testing.T) {
		// A known protocol the gateway does not offer (an unknown name is
		// a malformed message, a protocol violation).
		yamuxOnly := startGateway(t, func(c *config.GatewayFile) { c.Protocols = []string{"yamux"} })
		ws := rawDial(t, yamuxOnly, tokenA)
		ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"gateway_hello_ack","version":1,"protocol":"json"}`))
		if code := readError(t, ws); code != "bad_protocol" {
			t.Fatalf("error code %q, want bad_protocol", code)
		}
	})
	t.Run("no ack", func(t *testing.T) {
		ws := rawDial(t, g, tokenA)
		start := time.Now()
		err := waitClosed(t, ws)
		el := time.Since(start)
		t.Logf("silent agent cut after %v (handshake_timeout 1s): %v", el.Round(time.Millisecond), err)
		// Not before the agent's time to answer is up, and well before the
		// 10 s default.
		if el < 900*time.Millisecond || el >= 5*time.Second {
			t.Fatalf("cut after %v; handshake_timeout is 1s", el)
		}
	})
	t.Run("1009", func(t *testing.T) {
		ws := rawAgent(t, g, tokenA, "json")
		ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"heartbeat","x":"`+strings.Repeat("a", protocol.MinMessageSize)+`"}`))
		if err := waitClosed(t, ws); !websocket.IsCloseError(err, websocket.CloseMessageTooBig) {
			t.Fatalf("closed with %v, want close code 1009", err)
		}
	})
}

// A second session of the same agent instance replaces the first, which is
// told `replaced`; a stopping gateway tells its agents `shutdown`.
func TestSessionReplacedAndShutdown(t *testing.T) {
	g := startGateway(t)
	// The agent started below names its instance by POD_NAME, as the raw
	// session's ack does: the same instance, reconnecting.
	t.Setenv("POD_NAME", "pod-a")
	ws, _, err := websocket.DefaultDialer.Dial(g.url(), http.Header{"Authorization": {"Bearer " + tokenA}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	if _, _, err := ws.ReadMessage(); err != nil {
		t.Fatal(err)
	}
	ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"gateway_hello_ack","version":1,"protocol":"json","instance":"pod-a"}`))
	testwait.For(t, 5*time.Second, "the raw session to start", func() bool { return g.log.Count("agent connected") == 1 })
	a := startAgent(t, g.url(), tokenA, "yamux", []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}})
	ep := a.waitReady(t)["echo"]
	if code := readError(t, ws); code != "replaced" {
		t.Fatalf("the older session got error code %q, want replaced", code)
	}
	if err := testnet.EchoRoundTrip(ep, []byte("the newer session serves")); err != nil {
		t.Fatal(err)
	}
	if g.log.Count("agent session replaced") != 1 {
		t.Error("the gateway did not log the replacement")
	}
	g.Close()
	testwait.For(t, 10*time.Second, "the agent to report the gateway's shutdown", func() bool {
		return a.log.Count("peer closed: shutdown") > 0
	})
}

// rstBackend accepts connections, reads one byte, and aborts with a TCP RST.
func rstBackend(t *testing.T) string {
	t.Helper()
	return testnet.ServeTCP(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Read(make([]byte, 1))
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	})
}

// halfCloseBackend greets, closes its sending side first, then reads what
// the client sends until the client's FIN and hands it to got.
func halfCloseBackend(t *testing.T, got chan<- string) string {
	t.Helper()
	return testnet.ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte("hello, then FIN"))
		c.(*net.TCPConn).CloseWrite()
		b, err := io.ReadAll(c)
		if err != nil {
			b = append(b, " (error: "+err.Error()+")"...)
		}
		got <- string(b)
	})
}

// A backend's RST reaches the client as a reset, and a backend's FIN sent
// first ends only that direction: the client still sends afterwards.
func TestTCPResetAndBackendHalfClose(t *testing.T) {
	got := make(chan string, 1)
	rst, half := rstBackend(t), halfCloseBackend(t, got)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{
				{Name: "rst", Protocol: "tcp", Port: 1, Backend: rst},
				{Name: "half", Protocol: "tcp", Port: 2, Backend: half},
			})
			eps := a.waitReady(t)

			c, err := net.Dial("tcp", eps["rst"])
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			c.Write([]byte("x"))
			if _, err := io.ReadAll(c); !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("client of a backend that reset: %v, want connection reset", err)
			}

			c2, err := net.Dial("tcp", eps["half"])
			if err != nil {
				t.Fatal(err)
			}
			defer c2.Close()
			c2.SetDeadline(time.Now().Add(10 * time.Second))
			greeting, err := io.ReadAll(c2) // up to the backend's FIN
			if err != nil || string(greeting) != "hello, then FIN" {
				t.Fatalf("greeting %q, %v", greeting, err)
			}
			if _, err := c2.Write([]byte("sent after the backend's FIN")); err != nil {
				t.Fatal(err)
			}
			c2.(*net.TCPConn).CloseWrite()
			select {
			case s := <-got:
				if s != "sent after the backend's FIN" {
					t.Fatalf("backend received %q after its FIN", s)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("backend never saw the client's data and FIN")
			}
		})
	}
}

// unansweredBackend returns a loopback address whose SYNs go unanswered: a
// listener with a backlog of 0 whose one queue slot is taken and which never
// accepts. It fails the test if the kernel answers anyway.
func unansweredBackend(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := (&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: sa.(*syscall.SockaddrInet4).Port}).String()
	// Fill the accept queue until a dial goes unanswered.
	for i := 0; i < 8; i++ {
		c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		if err != nil {
			if isTimeout(err) {
				return addr
			}
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Fatal("the kernel accepted 8 connections on a listener with backlog 0: cannot make a dial time out")
	return ""
}

// A backend that does not answer within tcp.connection_timeout: the agent
// reports `timeout`, the client's connection is reset at once, and it is
// counted as a timeout.
func TestBackendDialTimeout(t *testing.T) {
	backend := unansweredBackend(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{{Name: "slow", Protocol: "tcp", Port: 1, Backend: backend}},
				func(c *config.AgentFile) { c.Tunnels.TCP.ConnectionTimeout = config.D(300 * time.Millisecond) })
			c, err := net.Dial("tcp", a.waitReady(t)["slow"])
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			n, err := c.Read(make([]byte, 1))
			if n != 0 || isTimeout(err) {
				t.Fatalf("client read %d bytes, %v; want its connection closed", n, err)
			}
			var v float64
			testwait.For(t, 5*time.Second, "the timeout to be counted", func() bool {
				v = testmetrics.Sum(testmetrics.Scrape(t, "http://"+a.MetricsAddr().String()+"/metrics"), "pipeops_agent_tcp_tunnel_errors_total", map[string]string{"reason": "timeout"})
				return v > 0
			})
			if v != 1 {
				t.Errorf("timeouts counted %v, want 1", v)
			}
			// The status the gateway got is `timeout`.
			testwait.For(t, 5*time.Second, "the gateway to count a timeout refusal", func() bool {
				return testmetrics.Sum(testmetrics.Scrape(t, "http://"+g.AdminAddr().String()+"/metrics"), "portway_gateway_refusals_total", map[string]string{"reason": "timeout"}) == 1
			})
		})
	}
}

// ownUDPPort limits the gateway's port range to one UDP port of the
// kernel's choosing instead of 10000+port, where stray datagrams of other
// tests on the machine could arrive and be counted.
func ownUDPPort(t *testing.T) func(*config.GatewayFile) {
	port := testservers.FreePort(t, "udp")
	return func(c *config.GatewayFile) { c.PortRange = fmt.Sprintf("%d-%d", port, port) }
}

// A UDP client refused for udp.max_sessions is held for 2 s: its datagrams
// in that time open no stream, and after it they try again.
func TestUDPRefusedClientHeld(t *testing.T) {
	echo := udpEcho(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t, ownUDPPort(t))
			a, ep := udpAgent(t, g, mode, echo, func(c *config.AgentFile) { c.Tunnels.UDP.MaxSessions = 1 })
			refusals := func() float64 {
				return testmetrics.Sum(testmetrics.Scrape(t, "http://"+a.MetricsAddr().String()+"/metrics"), "portway_agent_udp_tunnel_dropped_total",
					map[string]string{"reason": "session_over_limit"})
			}
			c1, c2 := udpClient(t, ep), udpClient(t, ep)
			if _, err := exchange(c1, []byte("one"), 5*time.Second); err != nil {
				t.Fatal(err)
			}
			c2.Write([]byte("refused"))
			testwait.For(t, 5*time.Second, "the refusal", func() bool { return refusals() == 1 })
			refusedAt := time.Now()
			for i := 0; i < 5; i++ {
				c2.Write([]byte("held"))
				time.Sleep(100 * time.Millisecond)
			}
			// The c1 round trip orders the check after c2's datagrams
			// reached the gateway.
			if _, err := exchange(c1, []byte("one again"), 5*time.Second); err != nil {
				t.Fatal(err)
			}
			if since := time.Since(refusedAt); since < 2*time.Second {
				if v := refusals(); v != 1 {
					t.Fatalf("%v refusals within %v of the first: the held client's datagrams opened streams", v, since.Round(time.Millisecond))
				}
			} else {
				t.Logf("the machine was too slow to check the hold (%v)", since)
			}
			time.Sleep(time.Until(refusedAt.Add(2100 * time.Millisecond)))
			c2.Write([]byte("again"))
			testwait.For(t, 5*time.Second, "a new attempt after the hold", func() bool { return refusals() == 2 })
		})
	}
}

// periodicBackend answers a client's first datagram with count datagrams,
// every interval, and nothing else.
func periodicBackend(t *testing.T, count int, interval time.Duration) string {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 2048)
		_, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		for i := 0; i < count; i++ {
			time.Sleep(interval)
			if _, err := c.WriteToUDPAddrPort([]byte{byte(i)}, from); err != nil {
				return
			}
		}
	}()
	return c.LocalAddr().String()
}

// Traffic from the backend alone keeps a UDP session alive: a client that
// sent once receives a stream of datagrams lasting several session
// timeouts.
func TestUDPSessionKeptAliveByBackendTraffic(t *testing.T) {
	// 2.5 session timeouts of backend traffic, one datagram every tenth of
	// a timeout: room for a loaded machine's scheduling delays.
	const count, interval, timeout = 25, 100 * time.Millisecond, time.Second
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			backend := periodicBackend(t, count, interval)
			g := startGateway(t, ownUDPPort(t))
			_, ep := udpAgent(t, g, mode, backend, func(c *config.AgentFile) {
				c.Tunnels.UDP.SessionTimeout = config.D(timeout)
			})
			c := udpClient(t, ep)
			c.Write([]byte("start"))
			buf := make([]byte, 64)
			for i := 0; i < count; i++ {
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, err := c.Read(buf)
				if err != nil || n != 1 || buf[0] != byte(i) {
					t.Fatalf("datagram %d of %d (%.1f session timeouts in): %v; the session ended", i+1, count, float64(i+1)*interval.Seconds()/timeout.Seconds(), err)
				}
			}
		})
	}
}

// Registering again with the same services (a discovered service added)
// keeps the unchanged listeners: a TCP connection and a UDP session open
// through them carry on, and the UDP session is the same one.
func TestOpenConnectionSurvivesReRegister(t *testing.T) {
	uecho := udpEcho(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			echo := echoBackend(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{
				{Name: "echo", Protocol: "tcp", Port: 7, Backend: echo},
				{Name: "uecho", Protocol: "udp", Port: 7, Backend: uecho},
			})
			eps := a.waitReady(t)
			ep := eps["echo"]
			u := udpClient(t, eps["udp/uecho"])
			if _, err := exchange(u, []byte("before"), 5*time.Second); err != nil {
				t.Fatal(err)
			}
			c, err := net.Dial("tcp", ep)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			roundTrip := func(msg string) {
				t.Helper()
				c.Write([]byte(msg))
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
					t.Fatalf("open connection: %q, %v", got, err)
				}
			}
			roundTrip("before")
			a.SetDiscovered([]agent.Service{{ID: "extra", Protocol: protocol.KindTCP, Port: 4242, Backend: echo, Mode: "tunnel"}})
			testwait.For(t, 5*time.Second, "the new service", func() bool {
				for _, e := range a.Endpoints() {
					if e.Service.ID == "extra" && e.Address != "" {
						return true
					}
				}
				return false
			})
			roundTrip("after the re-register")
			if got, err := exchange(u, []byte("after"), 5*time.Second); err != nil || string(got) != "after" {
				t.Fatalf("UDP after the re-register: %q, %v", got, err)
			}
			// The session was never closed (a closed one would be
			// replaced by a new one silently): neither side logged its end.
			me := "client=" + u.LocalAddr().String()
			if n := g.log.CountLines("udp session closed", me) + a.log.CountLines("udp session closed", me); n != 0 {
				t.Errorf("the UDP session was closed by the re-register (%d log lines)", n)
			}
			if got := a.waitReady(t)["echo"]; got != ep {
				t.Errorf("echo moved from %s to %s", ep, got)
			}
		})
	}
}

// The tunnel endpoint bounds request headers to 16 KiB (plus the HTTP
// server's 4 KiB read slack): a larger request gets 431 and never reaches
// authentication.
func TestOversizedHeadersRefused(t *testing.T) {
	g := startGateway(t)
	send := func(headerBytes int) string {
		c, err := net.Dial("tcp", g.TunnelAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		req := "GET /v1/tunnel HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " + tokenA + "\r\nX-Pad: " + strings.Repeat("p", headerBytes) + "\r\n\r\n"
		go c.Write([]byte(req))
		resp, _ := io.ReadAll(c)
		return strings.SplitN(string(resp), "\r\n", 2)[0]
	}
	if status := send(21 << 10); !strings.Contains(status, " 431 ") {
		t.Errorf("21 KiB of headers: %q, want 431", status)
	}
	// The control: the same request with small headers is authenticated
	// (and refused as a plain GET, not for its size).
	if status := send(100); strings.Contains(status, " 431 ") || status == "" {
		t.Errorf("small headers: %q", status)
	}
}

// The agent reaches the gateway through a real HTTP CONNECT proxy
// (tinyproxy) named by HTTP_PROXY. The agent runs as a process: Go reads
// the proxy variables once per process, and never proxies a loopback IP
// literal or "localhost", so the gateway is named "127.1", which only the
// proxy's resolver (inet_aton) turns into 127.0.0.1 — the agent cannot
// reach it any other way. "127.1" is no loopback literal to the agent
// either, so it takes gateway.insecure for plain ws://.
func TestAgentThroughHTTPProxy(t *testing.T) {
	proxy := testservers.StartHTTPProxy(t)
	g := startGateway(t)
	_, port := splitHostPort(t, g.TunnelAddr().String())
	url := fmt.Sprintf("ws://127.1:%d/v1/tunnel", port)
	cfg := writeConfig(t, "agent.yaml", fmt.Sprintf(`
gateway: {url: %q, protocol: yamux, insecure: true}
metrics: {listen: "127.0.0.1:0"}
services:
  - {name: echo, port: 7, backend: %q}
`, url, echoBackend(t)))
	startProc(t, "agent", []string{"PORTWAY_GATEWAY_TOKEN=" + tokenA,
		"HTTP_PROXY=" + proxy.URL(), "http_proxy=" + proxy.URL(), "NO_PROXY=", "no_proxy="},
		"agent", "--config", cfg, "--log-level", "debug")
	ep := waitProcEndpoint(t, &procGateway{admin: g.AdminAddr().String()}, "echo")
	if err := testnet.EchoRoundTrip(ep, []byte("through the proxy")); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("CONNECT 127.1:%d", port); !strings.Contains(proxy.Log(), want) {
		t.Fatalf("the proxy did not log %q:\n%s", want, proxy.Log())
	}
}

// The gateway ends an idle UDP session by itself, after the idle_timeout_ms
// the agent registered: a hand-driven JSON-mode agent answers the session's
// first datagram and then stays silent, never closing anything, so only the
// gateway's own timer can send the udp_close.
func TestGatewayEndsIdleUDPSession(t *testing.T) {
	g := startGateway(t, ownUDPPort(t))
	ws := rawAgent(t, g, tokenA, "json")
	type msg struct {
		Type, Service, Client, Data string
		ID, Seq, TS                 int64
		Endpoints                   []struct{ Address, Error string }
	}
	msgs := make(chan msg, 64)
	var wmu sync.Mutex
	write := func(s string) {
		wmu.Lock()
		defer wmu.Unlock()
		ws.WriteMessage(websocket.TextMessage, []byte(s))
	}
	go func() {
		defer close(msgs)
		for {
			ws.SetReadDeadline(time.Now().Add(20 * time.Second))
			_, b, err := ws.ReadMessage()
			if err != nil {
				return
			}
			var m msg
			if json.Unmarshal(b, &m) != nil {
				continue
			}
			if m.Type == "heartbeat" { // stay alive without other traffic
				write(fmt.Sprintf(`{"type":"heartbeat_ack","seq":%d,"ts":%d}`, m.Seq, m.TS))
				continue
			}
			msgs <- m
		}
	}()
	next := func(typ string) msg {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case m, ok := <-msgs:
				if !ok {
					t.Fatalf("session closed while waiting for %s", typ)
				}
				if m.Type == typ {
					return m
				}
				if m.Type != "heartbeat_ack" {
					t.Fatalf("got %s while waiting for %s", m.Type, typ)
				}
			case <-timeout:
				t.Fatalf("no %s within 10s", typ)
			}
		}
	}
	write(`{"type":"register","seq":1,"services":[{"id":"u","protocol":"udp","port":7,"public_port":0,"idle_timeout_ms":500,"max_datagram":0,"mode":"tunnel"}]}`)
	ack := next("register_ack")
	if len(ack.Endpoints) != 1 || ack.Endpoints[0].Error != "" {
		t.Fatalf("register_ack %+v", ack)
	}
	c := udpClient(t, ack.Endpoints[0].Address)
	c.Write([]byte("ping"))
	open := next("udp_open")
	write(fmt.Sprintf(`{"type":"udp_open_result","id":%d,"status":"ok"}`, open.ID))
	if d := next("udp_data"); d.ID != open.ID || d.Data != "cGluZw==" {
		t.Fatalf("udp_data %+v, want ping on stream %d", d, open.ID)
	}
	write(fmt.Sprintf(`{"type":"udp_data","id":%d,"data":"cG9uZw=="}`, open.ID))
	buf := make([]byte, 16)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "pong" {
		t.Fatalf("client got %q, %v; want the agent's pong", buf[:n], err)
	}
	idleFrom := time.Now()
	closed := next("udp_close")
	el := time.Since(idleFrom)
	t.Logf("the gateway closed the idle session after %v (idle_timeout_ms 500)", el.Round(time.Millisecond))
	if closed.ID != open.ID {
		t.Fatalf("udp_close for stream %d, want %d", closed.ID, open.ID)
	}
	if el < 400*time.Millisecond {
		t.Fatalf("closed after %v of silence, before the 500ms timeout", el)
	}
}

// A UDP session flooded past what the tunnel carries drops its excess
// without slowing the others: while one client floods a sink, another UDP
// service and a TCP service on the same agent keep answering.
func TestCongestedUDPSessionDoesNotStallOthers(t *testing.T) {
	sink, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, err := sink.Read(buf); err != nil {
				return
			}
		}
	}()
	uecho, techo := udpEcho(t), echoBackend(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{
				{Name: "sink", Protocol: "udp", Port: 1, Backend: sink.LocalAddr().String()},
				{Name: "uecho", Protocol: "udp", Port: 2, Backend: uecho},
				{Name: "techo", Protocol: "tcp", Port: 3, Backend: techo},
			})
			eps := a.waitReady(t)
			flood := udpClient(t, eps["udp/sink"])
			stop := make(chan struct{})
			flooded := make(chan struct{})
			go func() {
				defer close(flooded)
				p := make([]byte, 512)
				for i := 0; i < 2_000_000; i++ {
					select {
					case <-stop:
						return
					default:
					}
					flood.Write(p)
				}
			}()
			stopped := false
			defer func() {
				if !stopped {
					close(stop)
					<-flooded
				}
			}()
			// Let the flood's queue fill first.
			time.Sleep(200 * time.Millisecond)
			u := udpClient(t, eps["udp/uecho"])
			c, err := net.Dial("tcp", eps["techo"])
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			got := make([]byte, 5)
			for i := 0; i < 20; i++ {
				msg := []byte{'m', 's', 'g', byte('a' + i%26), byte(i)}
				// Generous hang guards: a stalled session would hang.
				if r, err := exchange(u, msg, 5*time.Second); err != nil || string(r) != string(msg) {
					t.Fatalf("UDP round trip %d during the flood: %q, %v", i, r, err)
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				c.Write(msg)
				if _, err := io.ReadFull(c, got); err != nil || string(got) != string(msg) {
					t.Fatalf("TCP round trip %d during the flood: %q, %v", i, got, err)
				}
			}
			select {
			case <-flooded:
				t.Fatal("the flood ended before the other services were checked")
			default:
			}
			// Stop the flood and let the gateway take in what the kernel
			// still holds before the session ends at cleanup: ending a
			// session while a flood keeps starting UDP sessions is another
			// matter than the one this test is about.
			close(stop)
			<-flooded
			stopped = true
			last, still := -1.0, 0
			for i := 0; i < 100 && still < 3; i++ {
				m := testmetrics.Scrape(t, "http://"+g.AdminAddr().String()+"/metrics")
				n := testmetrics.Sum(m, "portway_gateway_udp_packets_total", nil) + testmetrics.Sum(m, "portway_gateway_udp_dropped_total", nil)
				if n == last {
					still++
				} else {
					last, still = n, 0
				}
				time.Sleep(100 * time.Millisecond)
			}
			// Where the excess went depends on the machine (the gateway's
			// queue or, on a slow one, the kernel's socket buffer): logged.
			dropped := testmetrics.Sum(testmetrics.Scrape(t, "http://"+g.AdminAddr().String()+"/metrics"), "portway_gateway_udp_dropped_total", nil)
			t.Logf("%s: 20 UDP and 20 TCP round trips beside a flood; the gateway dropped %v of its datagrams so far", mode, dropped)
		})
	}
}
