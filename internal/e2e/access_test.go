package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/proxyproto"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testservers"
	"github.com/portway/portway/internal/testwait"
)

// haproxyReportingSource starts a real HAProxy whose frontend requires a
// PROXY protocol header (v1 or v2, accept-proxy) and answers each HTTP
// request with the client address and the destination it saw. It returns
// the frontend's address.
func haproxyReportingSource(t *testing.T) (string, *testservers.HAProxyServer) {
	t.Helper()
	hp := testservers.HAProxy(t, 1, func(ports []int) string {
		return fmt.Sprintf(`
frontend pp
    mode http
    bind 127.0.0.1:%d accept-proxy
    http-request return status 200 content-type text/plain lf-string "%%[src] %%[dst]:%%[dst_port]"
`, ports[0])
	})
	return fmt.Sprintf("127.0.0.1:%d", hp.Ports[0]), hp
}

// dialFrom connects to addr from the local address src.
func dialFrom(t *testing.T, src, addr string) (net.Conn, error) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	return d.Dial("tcp", addr)
}

// askSource sends an HTTP request from src through addr and returns the
// body HAProxy answered with.
func askSource(t *testing.T, src, addr string) string {
	t.Helper()
	c, err := dialFrom(t, src, addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, src, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := io.ReadAll(bufio.NewReader(c))
	if err != nil {
		t.Fatalf("reading the answer from %s: %v", addr, err)
	}
	_, body, ok := strings.Cut(string(resp), "\r\n\r\n")
	if !ok || !strings.HasPrefix(string(resp), "HTTP/1.") {
		t.Fatalf("answer from %s is not HTTP: %q", addr, resp)
	}
	return body
}

// udpProxyBackend is a UDP backend that requires a PROXY protocol v2
// header in front of every datagram and answers with the source it
// carries, then the payload.
func udpProxyBackend(t *testing.T) string {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			h, off, err := proxyproto.ParseDatagram(buf[:n])
			reply := "no header: " + fmt.Sprint(err)
			if err == nil {
				reply = h.Source.String() + " " + h.Destination.String() + " " + string(buf[off:n])
			}
			c.WriteToUDPAddrPort([]byte(reply), from)
		}
	}()
	return c.LocalAddr().String()
}

func udpClientFrom(t *testing.T, src, addr string) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.ParseIP(src)}, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ipv6Loopback() bool {
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

// The real client address reaches the backend: a real HAProxy requiring
// the PROXY protocol behind the agent reports the address of a client
// bound to 127.0.0.7 (and ::1), for v1 and v2, in both modes; the UDP
// header carries it in front of every datagram. The same holds through a
// HAProxy with send-proxy-v2 in front of the gateway (proxy_protocol_from),
// and an agent connecting through it is known by its own address.
func TestClientAddressReachesBackend(t *testing.T) {
	backend, _ := haproxyReportingSource(t)
	udpBackend := udpProxyBackend(t)
	v6 := ipv6Loopback()
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t, func(c *config.GatewayFile) {
				if v6 {
					c.BindAddress = "::" // dual-stack: IPv4 clients arrive IPv4-mapped
				}
				c.ProxyProtocolFrom = []string{"127.0.0.9/32"}
			})
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{
				{Name: "pp1", Protocol: "tcp", Port: 80, Backend: backend, ProxyProtocol: "v1"},
				{Name: "pp2", Protocol: "tcp", Port: 81, Backend: backend, ProxyProtocol: "v2"},
				{Name: "plain", Protocol: "tcp", Port: 82, Backend: backend},
				{Name: "dgram", Protocol: "udp", Port: 83, Backend: udpBackend, ProxyProtocol: "v2"},
			})
			eps := a.waitReady(t)
			for _, svc := range []string{"pp1", "pp2"} {
				_, port := splitHostPort(t, eps[svc])
				want := fmt.Sprintf("127.0.0.7 127.0.0.1:%d", port)
				if got := askSource(t, "127.0.0.7", eps[svc]); got != want {
					t.Errorf("%s: backend saw %q, want %q", svc, got, want)
				}
				if v6 {
					want := fmt.Sprintf("::1 ::1:%d", port)
					if got := askSource(t, "::1", fmt.Sprintf("[::1]:%d", port)); got != want {
						t.Errorf("%s over IPv6: backend saw %q, want %q", svc, got, want)
					}
				}
			}
			// Without a header HAProxy's accept-proxy refuses: the
			// header is only written when asked for.
			if c, err := dialFrom(t, "127.0.0.7", eps["plain"]); err == nil {
				c.SetDeadline(time.Now().Add(10 * time.Second))
				io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
				b, _ := io.ReadAll(c)
				c.Close()
				if strings.Contains(string(b), "127.0.0.7") {
					t.Errorf("a service without proxy_protocol sent a header: %q", b)
				}
			}

			uc := udpClientFrom(t, "127.0.0.7", eps["udp/dgram"])
			for i := range 3 {
				msg := "datagram-" + strconv.Itoa(i)
				got, err := exchange(uc, []byte(msg), 5*time.Second)
				_, port := splitHostPort(t, eps["udp/dgram"])
				// Bound to the wildcard address (dual-stack), the gateway's
				// UDP socket cannot tell which address a datagram was sent
				// to: public_host (127.0.0.1) stands for it.
				want := fmt.Sprintf("%s 127.0.0.1:%d %s", uc.LocalAddr(), port, msg)
				if err != nil || string(got) != want {
					t.Fatalf("udp: got %q, %v; want %q", got, err, want)
				}
			}

			// A HAProxy with send-proxy-v2 in front of the gateway: its
			// connections come from 127.0.0.9, which is in
			// proxy_protocol_from.
			_, pubPort := splitHostPort(t, eps["pp2"])
			_, tunPort := splitHostPort(t, g.TunnelAddr().String())
			front := testservers.HAProxy(t, 2, func(ports []int) string {
				return fmt.Sprintf(`
listen lb
    bind 127.0.0.1:%d
    server gw 127.0.0.1:%d send-proxy-v2 source 127.0.0.9
listen lbtunnel
    bind 127.0.0.1:%d
    server gw 127.0.0.1:%d send-proxy source 127.0.0.9
`, ports[0], pubPort, ports[1], tunPort)
			})
			lb := fmt.Sprintf("127.0.0.1:%d", front.Ports[0])
			want := fmt.Sprintf("127.0.0.7 127.0.0.1:%d", front.Ports[0])
			if got := askSource(t, "127.0.0.7", lb); got != want {
				t.Errorf("through a PROXY-speaking balancer: backend saw %q, want %q", got, want)
			}
			// From a listed source, a connection without a header is
			// refused and counted.
			if c, err := dialFrom(t, "127.0.0.9", eps["pp2"]); err == nil {
				c.SetDeadline(time.Now().Add(10 * time.Second))
				io.WriteString(c, "GET / HTTP/1.0\r\n\r\n")
				b, _ := io.ReadAll(c)
				c.Close()
				if len(b) > 0 {
					t.Errorf("a listed source without a header got an answer: %q", b)
				}
			}
			testwait.For(t, 10*time.Second, "proxy_header refusal counted", func() bool {
				return testmetrics.Value(t, g.reg, "portway_gateway_refusals_total", map[string]string{"service": "pp2", "reason": "proxy_header"}) == 1
			})

			// agent-b reaches the agent endpoint through the balancer
			// (send-proxy v1): the gateway knows it by its own address,
			// not the balancer's.
			b := startAgent(t, fmt.Sprintf("ws://127.0.0.1:%d/v1/tunnel", front.Ports[1]), tokenB, mode, nil)
			b.waitReady(t)
			for _, ai := range g.Agents() {
				if ai.Name == "agent-b" && !strings.HasPrefix(ai.Remote, "127.0.0.1:") {
					t.Errorf("agent-b through the balancer is known as %q, want its own 127.0.0.1 address", ai.Remote)
				}
			}
		})
	}
}

// Allow lists: the gateway lets 127.0.0.7 in and refuses 127.0.0.8, for
// TCP (closed before any stream) and UDP (dropped before any session), in
// both modes; an agent's allow list wider than the operator's ceiling is
// refused with a per-service error naming the CIDR; a per-source
// connection limit refuses the source over it and nobody else.
func TestSourceAllowLists(t *testing.T) {
	echo := echoBackend(t)
	udpBackend := udpEcho(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t, func(c *config.GatewayFile) {
				c.Agents[0].AllowCIDRs = []string{"127.0.0.0/24"}
			})
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{
				{Name: "tcp", Protocol: "tcp", Port: 1, Backend: echo, SourcePolicy: config.SourcePolicy{AllowCIDRs: []string{"127.0.0.7", "127.0.0.10/31"}}},
				{Name: "udp", Protocol: "udp", Port: 2, Backend: udpBackend, SourcePolicy: config.SourcePolicy{DenyCIDRs: []string{"127.0.0.8/32"}}},
				{Name: "wide", Protocol: "tcp", Port: 3, Backend: echo, SourcePolicy: config.SourcePolicy{AllowCIDRs: []string{"127.0.0.0/8"}}},
				{Name: "perip", Protocol: "tcp", Port: 4, Backend: echo, SourcePolicy: config.SourcePolicy{MaxConnectionsPerSource: 1}},
			})
			eps := a.waitReady(t)
			if e := eps["wide"]; !strings.HasPrefix(e, "error: ") || !strings.Contains(e, "127.0.0.0/8") {
				t.Errorf("widening service: endpoint %q, want an error naming 127.0.0.0/8", e)
			}

			echoes := func(src, addr string) bool {
				c, err := dialFrom(t, src, addr)
				if err != nil {
					return false
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.WriteString(c, "ping\n"); err != nil {
					return false
				}
				b := make([]byte, 5)
				_, err = io.ReadFull(c, b)
				return err == nil && string(b) == "ping\n"
			}
			if !echoes("127.0.0.7", eps["tcp"]) {
				t.Error("tcp: 127.0.0.7 is allowed but got no echo")
			}
			if echoes("127.0.0.8", eps["tcp"]) {
				t.Error("tcp: 127.0.0.8 is not allowed but got an echo")
			}
			if !echoes("127.0.0.11", eps["tcp"]) {
				t.Error("tcp: 127.0.0.11 is in 127.0.0.10/31 but got no echo")
			}
			// Refused at the gateway: no stream reached the agent.
			if n := testmetrics.Value(t, g.reg, "portway_gateway_refusals_total", map[string]string{"service": "tcp", "reason": "denied"}); n != 1 {
				t.Errorf("tcp: %v denied refusals counted, want 1", n)
			}
			if n := testmetrics.Value(t, a.reg, "pipeops_agent_tcp_tunnel_connections_total", map[string]string{"service": "tcp"}); n != 2 {
				t.Errorf("tcp: the agent saw %v connections, want 2 (the denied one must not reach it)", n)
			}

			ok := udpClientFrom(t, "127.0.0.7", eps["udp/udp"])
			if got, err := exchange(ok, []byte("hello"), 5*time.Second); err != nil || string(got) != "hello" {
				t.Errorf("udp: 127.0.0.7 got %q, %v", got, err)
			}
			bad := udpClientFrom(t, "127.0.0.8", eps["udp/udp"])
			for range 3 {
				bad.Write([]byte("let me in"))
			}
			testwait.For(t, 10*time.Second, "denied datagrams counted", func() bool {
				return testmetrics.Value(t, g.reg, "portway_gateway_udp_dropped_total", map[string]string{"service": "udp", "reason": "denied"}) == 3
			})
			if n := testmetrics.Value(t, g.reg, "portway_gateway_udp_sessions_total", map[string]string{"service": "udp"}); n != 1 {
				t.Errorf("udp: %v sessions, want 1 (none for the denied source)", n)
			}
			bad.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			if n, err := bad.Read(make([]byte, 64)); err == nil {
				t.Errorf("udp: the denied source got a %d-byte reply", n)
			}

			// max_connections_per_source: 1 — a second connection from
			// the same source is refused, another source is not.
			held, err := dialFrom(t, "127.0.0.7", eps["perip"])
			if err != nil {
				t.Fatal(err)
			}
			defer held.Close()
			held.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(held, "x\n")
			if _, err := io.ReadFull(held, make([]byte, 2)); err != nil {
				t.Fatalf("perip: first connection: %v", err)
			}
			if echoes("127.0.0.7", eps["perip"]) {
				t.Error("perip: a second connection from 127.0.0.7 got through max_connections_per_source 1")
			}
			if !echoes("127.0.0.12", eps["perip"]) {
				t.Error("perip: another source was refused")
			}
			if n := testmetrics.Value(t, g.reg, "portway_gateway_refusals_total", map[string]string{"service": "perip", "reason": "source_limit"}); n != 1 {
				t.Errorf("perip: %v source_limit refusals, want 1", n)
			}
			held.Close()
			testwait.For(t, 10*time.Second, "the source's slot freed", func() bool { return echoes("127.0.0.7", eps["perip"]) })

			// A reload of the ceiling applies to the existing service's
			// next connection.
			next := *g.cfg
			next.Agents = append([]config.AgentIdentity(nil), g.cfg.Agents...)
			next.Agents[0].DenyCIDRs = []string{"127.0.0.7"}
			if _, err := g.Reload(&next); err != nil {
				t.Fatal(err)
			}
			if echoes("127.0.0.7", eps["tcp"]) {
				t.Error("tcp: 127.0.0.7 got through after the reloaded ceiling denied it")
			}
			if !echoes("127.0.0.11", eps["tcp"]) {
				t.Error("tcp: 127.0.0.11 refused after a reload that did not touch it")
			}

			var tcpInfo bool
			for _, si := range g.Services() {
				if si.ID == "tcp" {
					tcpInfo = true
					if si.Denied != 2 || strings.Join(si.AllowCIDRs, ",") != "127.0.0.7,127.0.0.10/31" {
						t.Errorf("admin API: tcp service shows denied %d, allow %v", si.Denied, si.AllowCIDRs)
					}
				}
			}
			if !tcpInfo {
				t.Error("admin API: tcp service missing")
			}
		})
	}
}
