package bench

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/gateway"
	"github.com/portway/portway/internal/proxyproto"
	"github.com/portway/portway/internal/testgateway"
)

// The cost of client identity on connection setup and round trips, in one
// run: a plain service, the same with a PROXY protocol v2 header to the
// backend (which reads it, as a real one must), and the same with an allow
// list and the agent's ceiling checked at accept.
//
//	go test -run '^$' -bench 'Access' -benchtime 2000x ./internal/bench

// accessCases are the services compared, by sub-benchmark name.
var accessCases = []string{"plain", "proxy_v2", "allowlist"}

// accessTunnel starts a gateway and an agent (yamux) exposing one echo
// service per case, and returns their endpoints by case.
func accessTunnel(b *testing.B) map[string]string {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	echo := echoServer(b, ctx, false)
	ppEcho := echoServer(b, ctx, true)

	const token = "bench-agent-token-0123456789"
	gcfg := testgateway.Config(b, config.AgentIdentity{Name: agentName, Token: token,
		AllowCIDRs: []string{"127.0.0.0/8", "::1"}, DenyCIDRs: []string{"10.0.0.0/8"}})
	gcfg.StateFile = ""
	reg := prometheus.NewRegistry()
	g := testgateway.Start(b, gateway.Options{Config: gcfg, Registry: reg, Gatherer: reg})

	acfg := config.DefaultAgent()
	acfg.Gateway = config.GatewayConn{URL: testgateway.URL(g), Token: token, Protocol: "yamux"}
	acfg.Metrics.Listen = ""
	acfg.Services = []config.StaticService{
		{Name: "plain", Protocol: "tcp", Port: 1, Backend: echo},
		{Name: "proxy_v2", Protocol: "tcp", Port: 2, Backend: ppEcho, ProxyProtocol: config.ProxyProtocolV2},
		{Name: "allowlist", Protocol: "tcp", Port: 3, Backend: echo, SourcePolicy: config.SourcePolicy{
			AllowCIDRs: []string{"127.0.0.0/24", "127.0.1.0/24"}, DenyCIDRs: []string{"127.0.0.8"}}},
	}
	areg := prometheus.NewRegistry()
	a, err := agent.New(agent.Options{Config: acfg, Registry: areg, Gatherer: areg})
	if err != nil {
		b.Fatal(err)
	}
	runAgent(b, ctx, a)
	eps := map[string]string{}
	for _, e := range a.Endpoints() {
		if e.Error != "" {
			b.Fatalf("%s: %s", e.Service.ID, e.Error)
		}
		eps[e.Service.ID] = e.Address
	}
	// Warm every path (pools, goroutine stacks, the first stream) so the
	// case measured first is not charged for it.
	for range 200 {
		for _, name := range accessCases {
			c, err := net.Dial("tcp", eps[name])
			if err != nil {
				b.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			var buf [1]byte
			if _, err := c.Write([]byte{'x'}); err == nil {
				io.ReadFull(c, buf[:])
			}
			c.Close()
		}
	}
	return eps
}

// echoServer echoes each connection; with header set it first reads the
// PROXY protocol header, failing the connection without one.
func echoServer(b *testing.B, ctx context.Context, header bool) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if header {
					if _, err := proxyproto.Read(c); err != nil {
						return
					}
				}
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// BenchmarkAccessConnSetup opens a connection through the tunnel, sends a
// byte, reads its echo and closes, once per case per iteration, the cases
// interleaved (in a rotating order) so that drift in the machine's load
// and in its sockets' state falls on all of them alike: conn/s per case.
func BenchmarkAccessConnSetup(b *testing.B) {
	eps := accessTunnel(b)
	spent := make([]time.Duration, len(accessCases))
	var buf [1]byte
	b.ResetTimer()
	for i := range b.N {
		for j := range accessCases {
			k := (i + j) % len(accessCases)
			start := time.Now()
			c, err := net.Dial("tcp", eps[accessCases[k]])
			if err != nil {
				b.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write([]byte{'x'}); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, buf[:]); err != nil {
				b.Fatalf("%s: %v", accessCases[k], err)
			}
			c.Close()
			spent[k] += time.Since(start)
		}
	}
	for k, name := range accessCases {
		b.ReportMetric(float64(b.N)/spent[k].Seconds(), name+"-conn/s")
	}
}

// BenchmarkAccessRoundTrip sends one byte and waits for its echo on one
// connection per case, the cases interleaved: what the header and the
// allow list cost after setup (nothing is expected: both act once per
// connection). Reports µs per round trip per case.
func BenchmarkAccessRoundTrip(b *testing.B) {
	eps := accessTunnel(b)
	conns := make([]net.Conn, len(accessCases))
	for k, name := range accessCases {
		c, err := net.Dial("tcp", eps[name])
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		conns[k] = c
	}
	spent := make([]time.Duration, len(accessCases))
	var buf [1]byte
	b.ResetTimer()
	for i := range b.N {
		for j := range accessCases {
			k := (i + j) % len(accessCases)
			c := conns[k]
			start := time.Now()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write([]byte{'x'}); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, buf[:]); err != nil {
				if errors.Is(err, io.EOF) {
					b.Fatalf("%s: the backend closed the connection", accessCases[k])
				}
				b.Fatal(err)
			}
			spent[k] += time.Since(start)
		}
	}
	for k, name := range accessCases {
		b.ReportMetric(float64(spent[k].Microseconds())/float64(b.N), name+"-µs/rt")
	}
}
