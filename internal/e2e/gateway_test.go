package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testservers"
	"github.com/portway/portway/internal/testwait"
	"github.com/portway/portway/internal/tunnel"
)

// TestGatewayRestartKeepsPorts restarts the gateway (same listen address,
// same state file): open connections end promptly, the agent comes back by
// itself, and every service gets the same public port.
func TestGatewayRestartKeepsPorts(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			state := t.TempDir() + "/gateway.db"
			listen := fmt.Sprintf("127.0.0.1:%d", testservers.FreePort(t, "tcp"))
			// A port range of its own: another test's gateway binding
			// 10000+port in the moment between the two gateways would
			// move the service, as it should, and fail this test.
			low := 30000 + rand.IntN(9000)
			same := func(c *config.GatewayFile) {
				c.Listen, c.StateFile, c.PortRange = listen, state, fmt.Sprintf("%d-%d", low, low+99)
			}
			g1 := startGateway(t, same)
			echo := echoBackend(t)
			a := startAgent(t, g1.url(), tokenA, mode, []config.StaticService{
				{Name: "echo", Protocol: "tcp", Port: 7, Backend: echo},
				{Name: "other", Protocol: "tcp", Port: 4000, Backend: echo},
			})
			before := a.waitReady(t)

			c, err := net.Dial("tcp", before["echo"])
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write([]byte("ping"))
			io.ReadFull(c, make([]byte, 4))

			g1.Close()
			// The open connection ends instead of hanging.
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, errTimeout(err)) {
				t.Fatalf("connection through the stopped gateway: read err = %v, want a close", err)
			}
			testwait.For(t, 5*time.Second, "agent to notice the gateway is gone", func() bool { return !a.Ready() })

			start := time.Now()
			startGateway(t, same)
			after := a.waitReady(t)
			t.Logf("agent registered again %v after the gateway restarted", time.Since(start).Round(time.Millisecond))
			for id, ep := range before {
				if after[id] != ep {
					t.Errorf("service %s moved from %s to %s", id, ep, after[id])
				}
			}
			if err := testnet.EchoRoundTrip(after["echo"], []byte("after restart")); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func errTimeout(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return err
	}
	return errors.New("not a timeout")
}

func TestWrongTokenIsRefusedAndRetried(t *testing.T) {
	g := startGateway(t)
	const bad = "not-the-right-token-42"
	a := startAgent(t, g.url(), bad, "auto", []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}})
	// The agent says why, and keeps retrying with backoff.
	testwait.For(t, 10*time.Second, "two refused attempts", func() bool { return a.log.Count("HTTP 401") >= 2 })
	if a.Ready() {
		t.Fatal("agent with a wrong token is ready")
	}
	if !strings.Contains(a.log.String(), "check gateway.token") {
		t.Error("agent log does not say what to check")
	}
	if n := g.log.Count("rejected tunnel connection"); n < 2 {
		t.Errorf("gateway logged %d rejections, want >= 2", n)
	}
	if strings.Contains(g.log.String()+a.log.String(), bad) {
		t.Error("a token appears in the logs")
	}
	if v := testmetrics.Sum(testmetrics.Scrape(t, "http://"+g.AdminAddr().String()+"/metrics"), "portway_gateway_auth_failures_total", map[string]string{"reason": "bad_token"}); v < 2 {
		t.Errorf("auth failures counted: %v", v)
	}
	// Plain HTTP without a token gets 401 before any upgrade.
	code, _ := httpGet(t, "http://"+g.TunnelAddr().String()+"/v1/tunnel", "")
	if code != http.StatusUnauthorized {
		t.Errorf("request without a token: HTTP %d, want 401", code)
	}
}

// rawAgent connects with a valid token, completes the handshake by hand
// and returns the WebSocket, for sending what a real agent never would.
func rawAgent(t *testing.T, g *gw, token, proto string) *websocket.Conn {
	t.Helper()
	h := http.Header{"Authorization": {"Bearer " + token}}
	ws, _, err := websocket.DefaultDialer.Dial(g.url(), h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	if _, _, err := ws.ReadMessage(); err != nil {
		t.Fatal(err)
	}
	ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"gateway_hello_ack","version":1,"protocol":"`+proto+`"}`))
	return ws
}

// waitClosed reads until the gateway closes the WebSocket.
func waitClosed(t *testing.T, ws *websocket.Conn) error {
	t.Helper()
	ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		if _, _, err := ws.ReadMessage(); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("gateway did not close the session")
			}
			return err
		}
	}
}

// Garbage and oversized messages close only the offending session; another
// agent's traffic is unaffected, and the gateway says why.
func TestBadMessagesCloseOnlyThatSession(t *testing.T) {
	g := startGateway(t, func(c *config.GatewayFile) { c.MaxMessageSize = protocol.MinMessageSize })
	good := startAgent(t, g.url(), tokenA, "yamux", []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}})
	ep := good.waitReady(t)["echo"]
	cases := []struct {
		name, proto string
		typ         int
		msg         []byte
		wantLog     string
	}{
		{"garbage", "json", websocket.TextMessage, []byte("\xff\xfe not json at all"), "protocol_violation"},
		{"garbage binary in yamux", "yamux", websocket.BinaryMessage, bytes.Repeat([]byte{0xee}, 40), "Invalid protocol version"},
		{"oversized", "json", websocket.TextMessage, bytes.Repeat([]byte("a"), protocol.MinMessageSize+1), "read limit exceeded"},
		{"deep nesting", "json", websocket.TextMessage, []byte(`{"type":"register","x":` + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `}`), "protocol_violation"},
		{"bad register", "json", websocket.TextMessage, []byte(`{"type":"register","seq":1,"services":[{"id":"../etc","protocol":"tcp","port":99999}]}`), "protocol_violation"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := g.log.Count(`msg="agent disconnected" agent=agent-b`)
			ws := rawAgent(t, g, tokenB, c.proto)
			ws.WriteMessage(c.typ, c.msg)
			waitClosed(t, ws)
			testwait.For(t, 5*time.Second, "the gateway to log the disconnect", func() bool {
				return g.log.Count(`msg="agent disconnected" agent=agent-b`) > before
			})
			if tail := g.log.Since(before, `msg="agent disconnected" agent=agent-b`); !strings.Contains(tail, c.wantLog) {
				t.Errorf("gateway log for this session does not mention %q:\n%s", c.wantLog, tail)
			}
			if err := testnet.EchoRoundTrip(ep, []byte("still fine after "+c.name)); err != nil {
				t.Fatalf("the other agent broke: %v", err)
			}
		})
	}
}

// An agent may not take ports outside the range or held by another agent,
// and a port held by another process is skipped. The ports are picked at
// run time: the squatter holds a port the kernel chose, and the range is
// laid around it.
func TestPortAllocationRules(t *testing.T) {
	// Something else on the host holds the port the web service prefers
	// (10000 + its port).
	squat, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer squat.Close()
	_, held := splitHostPort(t, squat.Addr().String())
	if held <= 10000+1 {
		t.Fatalf("the kernel's ephemeral port %d is too low for this test's layout", held)
	}
	fixed := freePort(t)
	low, high := min(held, fixed)-20, max(held, fixed)+20
	g := startGateway(t, func(c *config.GatewayFile) { c.PortRange = fmt.Sprintf("%d-%d", low, high); c.MaxServices = 3 })
	echo := echoBackend(t)
	a := startAgent(t, g.url(), tokenA, "yamux", []config.StaticService{
		{Name: "web", Protocol: "tcp", Port: held - 10000, Backend: echo},
		{Name: "fixed", Protocol: "tcp", Port: 5000, Backend: echo, PublicPort: fixed},
		{Name: "outside", Protocol: "tcp", Port: 5001, Backend: echo, PublicPort: low - 1},
		{Name: "zz-over-quota", Protocol: "tcp", Port: 5002, Backend: echo},
	})
	eps := a.waitReady(t)
	// The allocator walks up from the preferred port; held+1 may be taken
	// by another process too, so any later port in the range will do.
	if _, port := splitHostPort(t, eps["web"]); port <= held || port > high || port == fixed {
		t.Errorf("web got %s, want a port in (%d, %d] other than %d (%d is held by another process)", eps["web"], held, high, fixed, held)
	}
	if want := fmt.Sprintf("127.0.0.1:%d", fixed); eps["fixed"] != want {
		t.Errorf("fixed got %s, want the requested %s", eps["fixed"], want)
	}
	if !strings.Contains(eps["outside"], "outside the gateway's port_range") {
		t.Errorf("outside got %q, want a port_range error", eps["outside"])
	}
	if !strings.Contains(eps["zz-over-quota"], "quota of 3 services") {
		t.Errorf("zz-over-quota got %q, want a quota error", eps["zz-over-quota"])
	}
	// Another agent asks for agent-a's port: refused, and agent-a's
	// listener is undisturbed.
	b := startAgent(t, g.url(), tokenB, "json", []config.StaticService{{Name: "thief", Protocol: "tcp", Port: 1, Backend: echo, PublicPort: fixed}})
	if ep := b.waitReady(t)["thief"]; !strings.Contains(ep, "allocated to another agent") {
		t.Errorf("thief got %q, want a refusal", ep)
	}
	if err := testnet.EchoRoundTrip(eps["fixed"], []byte("mine")); err != nil {
		t.Fatal(err)
	}
}

// A hostile or buggy gateway opens streams for services the agent never
// registered: the agent refuses them and dials nothing.
func TestAgentRefusesUnregisteredServices(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			backend, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer backend.Close()
			dialed := make(chan struct{}, 10)
			go func() {
				for {
					c, err := backend.Accept()
					if err != nil {
						return
					}
					dialed <- struct{}{}
					c.Close()
				}
			}()
			sessCh := make(chan *tunnel.Session, 1)
			up := tunnel.NewUpgrader(5 * time.Second)
			fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				ws, _ := up.Upgrade(w, r, nil)
				s, err := tunnel.Server(r.Context(), ws, &protocol.Hello{Version: 1, Protocols: []string{"yamux", "json"},
					HeartbeatIntervalMS: 1000, MaxMessageSize: 1 << 20, MaxServices: 10, StreamWindow: 256 << 10}, tunnel.Config{})
				if err == nil {
					sessCh <- s
					<-s.Done()
				}
			}))
			defer fake.Close()
			a := startAgent(t, "ws"+strings.TrimPrefix(fake.URL, "http")+"/v1/tunnel", tokenA, mode,
				[]config.StaticService{{Name: "allowed", Protocol: "tcp", Port: 1, Backend: backend.Addr().String()}})
			s := <-sessCh
			// Wait for its register so the agent's set is known.
			select {
			case <-s.Control():
			case <-time.After(5 * time.Second):
				t.Fatal("no register")
			}
			for _, h := range []protocol.StreamHeader{
				{Kind: protocol.KindTCP, Service: "not-registered"},
				{Kind: protocol.KindUDP, Service: "allowed"}, // right id, wrong protocol
				{Kind: protocol.KindTCP, Service: "kube-system/coredns"},
			} {
				st, err := s.Open(context.Background(), h)
				if err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				err = tunnel.WaitOpen(ctx, st)
				cancel()
				var oe *protocol.OpenError
				if !errors.As(err, &oe) || oe.Status != protocol.StatusUnknownService {
					t.Errorf("%s/%s: %v, want unknown_service", h.Kind, h.Service, err)
				}
			}
			select {
			case <-dialed:
				t.Fatal("the agent dialed a backend for an unregistered service")
			case <-time.After(100 * time.Millisecond):
			}
			if !strings.Contains(a.log.String(), "did not register") {
				t.Error("agent did not log the refusal")
			}
		})
	}
}
