package e2e

import (
	"bufio"
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

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testnet"
)

// Failed token attempts are limited per source address: past the limit the
// source gets 429 without its token being checked, with one log line.
func TestAuthAttemptsRateLimited(t *testing.T) {
	g := startGateway(t, func(c *config.GatewayFile) { c.AuthFailuresPerMinute = 3 })
	try := func(token string) int {
		h := http.Header{"Authorization": {"Bearer " + token}}
		ws, resp, err := websocket.DefaultDialer.Dial(g.url(), h)
		if err == nil {
			ws.Close()
			return http.StatusSwitchingProtocols
		}
		if resp == nil {
			t.Fatal(err)
		}
		// What each refusal must say (docs/protocol.md): 401 names the
		// scheme, 429 when to come back, and neither keeps the connection.
		switch resp.StatusCode {
		case http.StatusUnauthorized:
			if got := resp.Header.Get("WWW-Authenticate"); got != `Bearer realm="portway"` {
				t.Errorf("401 with WWW-Authenticate %q", got)
			}
		case http.StatusTooManyRequests:
			if got := resp.Header.Get("Retry-After"); got != "60" {
				t.Errorf("429 with Retry-After %q, want 60", got)
			}
		}
		if !resp.Close && resp.Header.Get("Connection") != "close" {
			t.Errorf("HTTP %d without Connection: close", resp.StatusCode)
		}
		return resp.StatusCode
	}
	for i := 0; i < 3; i++ {
		if code := try(fmt.Sprintf("guess-number-%d-xxxxxxxx", i)); code != http.StatusUnauthorized {
			t.Fatalf("attempt %d: HTTP %d, want 401", i+1, code)
		}
	}
	for i := 0; i < 5; i++ {
		if code := try("another-guess-xxxxxxxxxx"); code != http.StatusTooManyRequests {
			t.Fatalf("attempt past the limit: HTTP %d, want 429", code)
		}
	}
	// Even a right token waits out the window: a guesser learns nothing.
	if code := try(tokenA); code != http.StatusTooManyRequests {
		t.Fatalf("valid token from a throttled source: HTTP %d, want 429", code)
	}
	if n := g.log.Count("throttling tunnel authentication attempts"); n != 1 {
		t.Errorf("throttling logged %d times, want once", n)
	}
	m := testmetrics.Scrape(t, "http://"+g.AdminAddr().String()+"/metrics")
	if v := testmetrics.Sum(m, "portway_gateway_auth_failures_total", map[string]string{"reason": "rate_limited"}); v != 6 {
		t.Errorf("rate_limited counted %v, want 6", v)
	}
}

// Bytes that are not an authenticated upgrade never reach the tunnel code:
// the gateway answers 4xx (or, for bytes that never finish a request line,
// nothing) and closes the connection within handshake_timeout.
func TestUnauthenticatedFrames(t *testing.T) {
	g := startGateway(t, func(c *config.GatewayFile) { c.HandshakeTimeout = config.D(time.Second) })
	cases := map[string]string{
		"websocket frame without HTTP": "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
		"upgrade without a token": "GET /v1/tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
		"binary garbage": strings.Repeat("\x00\xff", 5000),
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			c, err := net.Dial("tcp", g.TunnelAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			c.Write([]byte(in))
			resp, err := io.ReadAll(bufio.NewReader(c))
			if isTimeout(err) {
				t.Fatal("connection left open")
			}
			status := strings.SplitN(string(resp), "\r\n", 2)[0]
			if len(resp) > 0 && !strings.HasPrefix(status, "HTTP/1.1 4") {
				t.Fatalf("answer %q, want a 4xx", status)
			}
			t.Logf("answer: %q", status)
		})
	}
	if n := g.log.Count("agent connected"); n != 0 {
		t.Fatalf("%d sessions started", n)
	}
}

// Connections that trickle their headers are cut after handshake_timeout,
// and an agent connects normally meanwhile.
func TestSlowlorisOnUpgrade(t *testing.T) {
	g := startGateway(t, func(c *config.GatewayFile) { c.HandshakeTimeout = config.D(time.Second) })
	var wg sync.WaitGroup
	closed := make(chan time.Duration, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", g.TunnelAddr().String())
			if err != nil {
				return
			}
			defer c.Close()
			start := time.Now()
			c.Write([]byte("GET /v1/tunnel HTTP/1.1\r\nHost: x\r\n"))
			c.SetReadDeadline(time.Now().Add(15 * time.Second))
			for {
				if _, err := c.Read(make([]byte, 512)); err != nil {
					if !isTimeout(err) {
						closed <- time.Since(start)
					}
					return
				}
			}
		}()
	}
	a := startAgent(t, g.url(), tokenA, "yamux", []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}})
	if err := testnet.EchoRoundTrip(a.waitReady(t)["echo"], []byte("unaffected")); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(closed)
	n := 0
	var longest time.Duration
	for d := range closed {
		n++
		longest = max(longest, d)
	}
	if n != 50 {
		t.Fatalf("%d of 50 slow connections were closed by the gateway", n)
	}
	t.Logf("50 slow header senders cut after at most %v (handshake_timeout 1s)", longest.Round(time.Millisecond))
	// Well under the 10 s default, with room for a loaded machine: a build
	// that ignored handshake_timeout would cut them at 10 s.
	if longest >= 5*time.Second {
		t.Errorf("a slow header sender was cut after %v; handshake_timeout is 1s", longest.Round(time.Millisecond))
	}
}

// An agent registering thousands of services gets its quota and errors for
// the rest; the session and its served services carry on.
func TestServiceQuota(t *testing.T) {
	g := startGateway(t, func(c *config.GatewayFile) { c.MaxServices = 50; c.PortRange = "10000-10999" })
	echo := echoBackend(t)
	svcs := make([]config.StaticService, 3000)
	for i := range svcs {
		svcs[i] = config.StaticService{Name: fmt.Sprintf("svc-%04d", i), Protocol: "tcp", Port: 20000 + i, Backend: echo}
	}
	a := startAgent(t, g.url(), tokenA, "json", svcs)
	eps := a.waitReady(t)
	ok, refused := 0, 0
	for _, ep := range eps {
		switch {
		case strings.Contains(ep, "quota of 50"):
			refused++
		case !strings.HasPrefix(ep, "error"):
			ok++
		}
	}
	if ok != 50 || refused != 2950 {
		t.Fatalf("%d exposed and %d refused, want 50 and 2950", ok, refused)
	}
	if err := testnet.EchoRoundTrip(eps["svc-0000"], []byte("within quota")); err != nil {
		t.Fatal(err)
	}
	if !a.Ready() {
		t.Fatal("agent session did not survive")
	}
}

// Two agents may use the same service ids: each public port leads to its
// own agent's backend, never the other's.
func TestAgentsAreIsolated(t *testing.T) {
	g := startGateway(t)
	marker := func(tag string) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte(tag))
				c.Close()
			}
		}()
		return ln.Addr().String()
	}
	a := startAgent(t, g.url(), tokenA, "yamux", []config.StaticService{{Name: "db", Protocol: "tcp", Port: 5432, Backend: marker("A")}})
	b := startAgent(t, g.url(), tokenB, "json", []config.StaticService{{Name: "db", Protocol: "tcp", Port: 5432, Backend: marker("B")}})
	for tag, ep := range map[string]string{"A": a.waitReady(t)["db"], "B": b.waitReady(t)["db"]} {
		for i := 0; i < 5; i++ {
			c, err := net.Dial("tcp", ep)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			got, _ := io.ReadAll(c)
			c.Close()
			if string(got) != tag {
				t.Fatalf("agent %s's endpoint %s answered %q", tag, ep, got)
			}
		}
	}
}

// Connections beyond tcp.max_connections are refused at once, counted, and
// logged at most once per second; the admitted ones are unaffected.
func TestMaxConnectionsPerService(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}},
				func(c *config.AgentFile) { c.Tunnels.TCP.MaxConnections = 5 })
			ep := a.waitReady(t)["echo"]
			var held []net.Conn
			for i := 0; i < 5; i++ {
				c, err := net.Dial("tcp", ep)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				c.Write([]byte("h"))
				if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
					t.Fatalf("admitted connection %d: %v", i, err)
				}
				held = append(held, c)
			}
			for i := 0; i < 20; i++ {
				c, err := net.Dial("tcp", ep)
				if errors.Is(err, syscall.ECONNRESET) {
					// The gateway's reset arrived before Dial looked at
					// the socket (a loaded machine): refused at once, as
					// checked below.
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				c.Write([]byte("x"))
				if n, err := c.Read(make([]byte, 1)); n != 0 || isTimeout(err) {
					t.Fatalf("connection over the limit: read %d bytes, %v; want an immediate close", n, err)
				}
				c.Close()
			}
			for _, c := range held {
				c.Write([]byte("z"))
				if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
					t.Fatalf("an admitted connection broke: %v", err)
				}
			}
			// A refusal whose reset beat Dial may still be being counted.
			var v float64
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				m := testmetrics.Scrape(t, "http://"+a.MetricsAddr().String()+"/metrics")
				v = testmetrics.Sum(m, "pipeops_agent_tcp_tunnel_errors_total", map[string]string{"reason": "over_limit"})
				if v >= 20 || time.Now().After(deadline) {
					break
				}
			}
			if v != 20 {
				t.Errorf("over_limit counted %v, want 20", v)
			}
			if n := a.log.Count("max_connections reached"); n < 1 || n > 3 {
				t.Errorf("max_connections logged %d times for 20 refusals, want 1-3 (once per second)", n)
			}
		})
	}
}
