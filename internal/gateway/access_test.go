package gateway

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/proxyproto"
	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/tunnel"
)

// The per-source table stays bounded under a flood of distinct (spoofed)
// sources, and forgets a source once it holds nothing.
func TestSourceTableBounded(t *testing.T) {
	p := &sourcePolicy{rate: 1, burst: 1}
	tab := newSourceTable()
	now := time.Unix(1000, 0)
	admitted := 0
	for i := range maxSources + 1000 {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		if tab.admit(a, p, now) {
			admitted++
			tab.release(a, p, now)
		}
	}
	if n := tab.size(); n > maxSources {
		t.Fatalf("table holds %d sources, more than %d", n, maxSources)
	}
	if admitted != maxSources {
		t.Errorf("%d sources admitted while the table had room, want %d", admitted, maxSources)
	}
	// A second later every bucket is full again: a sweep frees them all.
	later := now.Add(time.Second)
	if !tab.admit(netip.MustParseAddr("192.0.2.1"), p, later) {
		t.Fatal("a new source was refused after the old entries expired")
	}
	if n := tab.size(); n != 1 {
		t.Errorf("after the sweep the table holds %d sources, want 1", n)
	}
}

// The new-connection rate per source: a burst, then one per 1/rate.
func TestSourceTableRate(t *testing.T) {
	p := &sourcePolicy{rate: 2, burst: 3}
	tab := newSourceTable()
	a := netip.MustParseAddr("127.0.0.7")
	now := time.Unix(1000, 0)
	for i := range 3 {
		if !tab.admit(a, p, now) {
			t.Fatalf("connection %d of the burst refused", i)
		}
		tab.release(a, p, now)
	}
	if tab.admit(a, p, now) {
		t.Fatal("a fourth connection at once got through a burst of 3")
	}
	if !tab.admit(netip.MustParseAddr("127.0.0.8"), p, now) {
		t.Fatal("another source was refused")
	}
	if !tab.admit(a, p, now.Add(500*time.Millisecond)) {
		t.Fatal("no token after 1/rate")
	}
	// max open per source.
	q := &sourcePolicy{maxOpen: 2}
	a = netip.MustParseAddr("127.0.0.9")
	for i := range 2 {
		if !tab.admit(a, q, now) {
			t.Fatalf("open connection %d refused", i+1)
		}
	}
	if tab.admit(a, q, now) {
		t.Fatal("a third open connection got through max 2")
	}
	tab.release(a, q, now)
	if !tab.admit(a, q, now) {
		t.Fatal("refused after a release")
	}
}

// The agent narrows, never widens, the operator's ceiling; the ceiling's
// deny list and the service's lists all apply at accept.
func TestSourcePolicyCeiling(t *testing.T) {
	ceil := &config.Ceiling{
		Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("2001:db8::/32")},
		Deny:  []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")},
	}
	svc := func(allow, deny []string) *protocol.Service {
		return &protocol.Service{ID: "pg", Protocol: protocol.KindTCP, AllowCIDRs: allow, DenyCIDRs: deny}
	}
	if _, err := checkService(svc([]string{"10.1.0.0/16", "2001:db8:1::/48"}, nil), ceil); err != nil {
		t.Fatalf("a narrower allow list refused: %v", err)
	}
	for _, wide := range []string{"0.0.0.0/0", "10.0.0.0/7", "192.0.2.1", "2001:db9::/32"} {
		_, err := checkService(svc([]string{"10.1.0.0/16", wide}, nil), ceil)
		if err == nil || !strings.Contains(err.Error(), wide) {
			t.Errorf("allow %s: error %v, want one naming it", wide, err)
		}
	}
	for _, bad := range []*protocol.Service{
		svc([]string{"10.0.0.1/8"}, nil),
		svc(nil, []string{"nonsense"}),
		{ID: "dns", Protocol: protocol.KindUDP, ProxyProtocol: "v1"},
		{ID: "pg", Protocol: protocol.KindTCP, ProxyProtocol: "v3"},
		{ID: "pg", Protocol: protocol.KindTCP, MaxConnectionsPerSource: -1},
	} {
		if _, err := checkService(bad, nil); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}

	pol, err := checkService(svc(nil, []string{"10.1.2.3"}), ceil)
	if err != nil {
		t.Fatal(err)
	}
	for src, want := range map[string]bool{
		"10.1.1.1":         true,
		"::ffff:10.1.1.1":  true, // an IPv4 client on a dual-stack listener
		"10.1.2.3":         false,
		"10.9.1.1":         false, // the ceiling's deny list
		"192.0.2.1":        false, // outside the ceiling
		"2001:db8::7":      true,
		"2001:db9::7":      false,
		"::ffff:192.0.2.1": false,
	} {
		if got := pol.allowed(netip.MustParseAddr(src), ceil); got != want {
			t.Errorf("allowed(%s) = %v, want %v", src, got, want)
		}
	}
	if open, _ := checkService(svc(nil, nil), nil); !open.allowed(netip.MustParseAddr("192.0.2.1"), nil) {
		t.Error("no lists and no ceiling must allow every source")
	}
}

// The allow check runs on every accepted connection: it allocates nothing.
func TestSourcePolicyAllocs(t *testing.T) {
	ceil := &config.Ceiling{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}
	pol, err := checkService(&protocol.Service{ID: "x", Protocol: protocol.KindTCP, AllowCIDRs: []string{"127.0.0.7"}, DenyCIDRs: []string{"127.0.0.8"}}, ceil)
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("127.0.0.7")
	if n := testing.AllocsPerRun(100, func() { pol.allowed(a, ceil) }); n != 0 {
		t.Errorf("allowed allocates %v times per call", n)
	}
}

// startHeaderGateway starts a gateway whose proxy_protocol_from is
// 127.0.0.9 and whose header timeout is short, with a Prometheus registry.
func startHeaderGateway(t *testing.T) (*Gateway, *prometheus.Registry) {
	t.Helper()
	cfg := config.DefaultGateway()
	cfg.Listen = "127.0.0.1:0"
	cfg.PublicHost = "127.0.0.1"
	cfg.BindAddress = "127.0.0.1"
	cfg.StateFile = ""
	cfg.Insecure = true
	cfg.Agents = []config.AgentIdentity{{Name: "agent-a", Token: testToken}}
	cfg.ProxyProtocolFrom = []string{"127.0.0.9"}
	log, _ := testlog.New(t, "gateway")
	reg := prometheus.NewRegistry()
	g, err := New(Options{Config: cfg, Logger: log, Registry: reg, Gatherer: reg})
	if err != nil {
		t.Fatal(err)
	}
	g.hdrTimeout = 300 * time.Millisecond
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	return g, reg
}

// closedWithin reports whether the peer closes c (read: EOF or reset)
// within the guard; data read is an error.
func closedWithin(t *testing.T, c net.Conn, guard time.Duration) bool {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(guard))
	n, err := c.Read(make([]byte, 64))
	if n > 0 {
		t.Errorf("read %d bytes, want the connection closed", n)
	}
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// A proxy_protocol_from source must send a header: half a header
// (slow-loris) is cut off at the header timeout, on a public port and on
// the agent endpoint, without a stream opened; a full header's addresses
// reach the agent in the stream header.
func TestProxyHeaderFromListedSource(t *testing.T) {
	g, reg := startHeaderGateway(t)
	headers := make(chan protocol.StreamHeader, 4)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fa, err := connectFakeAgent(ctx, g, "yamux", []protocol.Service{{ID: "pg", Protocol: protocol.KindTCP, Port: 5432, ProxyProtocol: "v2"}},
		func(in *tunnel.Incoming) {
			if h, err := in.Header(); err == nil {
				headers <- h
			}
			in.Reject(protocol.StatusRefused)
		})
	if err != nil {
		t.Fatal(err)
	}
	defer fa.sess.Close()
	pub := fa.ack.Endpoints[0].Address
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.9")}, Timeout: 5 * time.Second}

	for _, addr := range []string{pub, g.TunnelAddr().String()} {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "PROXY TCP4 203.0.113.7 ")
		if !closedWithin(t, c, 10*time.Second) {
			t.Errorf("%s: half a header held the connection open", addr)
		}
		c.Close()
	}
	if n := testmetrics.Value(t, reg, "portway_gateway_refusals_total", map[string]string{"service": "pg", "reason": "proxy_header"}); n != 1 {
		t.Errorf("public port: %v proxy_header refusals, want 1", n)
	}
	if n := testmetrics.Value(t, reg, "portway_gateway_auth_failures_total", map[string]string{"reason": "proxy_header"}); n != 1 {
		t.Errorf("agent endpoint: %v proxy_header failures, want 1", n)
	}
	select {
	case h := <-headers:
		t.Fatalf("a stream was opened for a connection without a header: %+v", h)
	default:
	}

	port := netip.MustParseAddrPort(pub).Port()
	c, err := d.Dial("tcp", pub)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "PROXY TCP4 203.0.113.7 198.51.100.1 5555 %d\r\nhello", port)
	select {
	case h := <-headers:
		if h.Client != netip.MustParseAddrPort("203.0.113.7:5555") || h.Public != netip.AddrPortFrom(netip.MustParseAddr("198.51.100.1"), port) {
			t.Errorf("stream header %+v, want the header's addresses", h)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no stream opened for a connection with a valid header")
	}
}

// FuzzProxyConn drives the agent endpoint's header reader with arbitrary
// input: it never panics; when the input starts with a valid header the
// connection reports its source (or the peer for LOCAL/UNKNOWN) and yields
// exactly the bytes after it; otherwise every read fails.
func FuzzProxyConn(f *testing.F) {
	f.Add([]byte("PROXY TCP4 203.0.113.7 127.0.0.1 5555 443\r\nGET / HTTP/1.1\r\n"))
	f.Add([]byte("PROXY UNKNOWN\r\nrest"))
	f.Add(proxyproto.AppendV2(nil, proxyproto.TransportStream, netip.MustParseAddrPort("[2001:db8::1]:1"), netip.MustParseAddrPort("[::1]:2")))
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Add([]byte("PROXY TCP4 1.2.3"))
	peer := netip.MustParseAddrPort("127.0.0.9:4000")
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		defer a.Close()
		go func() {
			b.Write(in)
			b.Close()
		}()
		c := &proxyConn{Conn: a, peer: peer, timeout: time.Second}
		remote := c.RemoteAddr()
		h, n, perr := proxyproto.Parse(in)
		rest, rerr := io.ReadAll(c)
		if perr != nil {
			if rerr == nil {
				t.Fatalf("input without a valid header read fine: %q", rest)
			}
			return
		}
		if rerr != nil {
			t.Fatalf("valid header (%d bytes), then read error %v", n, rerr)
		}
		if !bytes.Equal(rest, in[n:]) {
			t.Fatalf("after the header read %q, want %q", rest, in[n:])
		}
		want := peer
		if h.HasAddrs() {
			want = netip.AddrPortFrom(h.Source.Addr().Unmap(), h.Source.Port())
		}
		if got := remote.(*net.TCPAddr).AddrPort(); got != want {
			t.Fatalf("RemoteAddr %v, want %v", got, want)
		}
	})
}
