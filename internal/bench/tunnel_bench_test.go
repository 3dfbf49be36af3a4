package bench

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/gateway"
	"github.com/portway/portway/internal/testgateway"
	"github.com/portway/portway/internal/tunnel"
)

// The Go benchmarks run a real gateway and agent in this process, so that
// `go test -bench . ./internal/bench` tracks the whole data path (public
// socket → relay → tunnel → agent → backend) without child processes. The
// figures `portway bench` reports are the reference; these catch
// regressions between its runs.

// inProcessTunnel starts a gateway and an agent in mode (yamux, json, or
// wss: yamux over TLS) exposing the sink and echo servers, and returns
// their public endpoints.
func inProcessTunnel(b *testing.B, mode, sinkAddr, echoAddr string) (sinkEP, echoEP string) {
	return inProcessTunnelWith(b, mode, sinkAddr, echoAddr, prometheus.NewRegistry(), prometheus.NewRegistry())
}

// inProcessTunnelWith is inProcessTunnel with the gateway's and the agent's
// metrics registries given.
func inProcessTunnelWith(b *testing.B, mode, sinkAddr, echoAddr string, gwReg, agReg *prometheus.Registry) (sinkEP, echoEP string) {
	b.Helper()
	const token = "bench-agent-token-0123456789"
	gcfg := testgateway.Config(b, config.AgentIdentity{Name: agentName, Token: token})
	gcfg.StateFile = ""
	var cert *benchCert
	if mode == string(WSS) {
		var err error
		if cert, err = newBenchCert(b.TempDir()); err != nil {
			b.Fatal(err)
		}
		gcfg.TLS = &config.TLS{CertFile: cert.certFile, KeyFile: cert.keyFile}
		gcfg.Insecure = false
	}
	g := testgateway.Start(b, gateway.Options{Config: gcfg, Registry: gwReg, Gatherer: gwReg})

	acfg := config.DefaultAgent()
	acfg.Gateway = config.GatewayConn{URL: testgateway.URL(g), Token: token, Protocol: mode}
	if cert != nil {
		acfg.Gateway.URL = "wss://" + g.TunnelAddr().String() + tunnel.Path
		acfg.Gateway.CAFile = cert.certFile
		acfg.Gateway.Protocol = string(Yamux)
	}
	acfg.Metrics.Listen = ""
	acfg.Services = []config.StaticService{staticService(sinkService, sinkAddr), staticService(echoService, echoAddr)}
	a, err := agent.New(agent.Options{Config: acfg, Registry: agReg, Gatherer: agReg})
	if err != nil {
		b.Fatal(err)
	}
	runAgent(b, context.Background(), a)
	for _, e := range a.Endpoints() {
		switch e.Service.ID {
		case sinkService:
			sinkEP = e.Address
		case echoService:
			echoEP = e.Address
		}
	}
	if sinkEP == "" || echoEP == "" {
		b.Fatalf("endpoints missing: %+v", a.Endpoints())
	}
	return sinkEP, echoEP
}

func startBackends(b *testing.B) (*sink, *tcpServer) {
	b.Helper()
	snk, err := startSink()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(snk.Close)
	echo, err := startEcho()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(echo.Close)
	return snk, echo
}

// BenchmarkTunnelStream sends bulk data through one tunneled connection to
// a sink; the MB/s column is the stream's throughput.
func BenchmarkTunnelStream(b *testing.B) {
	for _, mode := range []string{"yamux", "wss", "json"} {
		b.Run(mode, func(b *testing.B) {
			snk, echo := startBackends(b)
			sinkEP, _ := inProcessTunnel(b, mode, snk.Addr(), echo.Addr())
			c, err := net.DialTimeout("tcp", sinkEP, dialTimeout)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, throughputWrite)
			b.SetBytes(int64(len(buf)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkTunnelRoundTrip exchanges 1-byte messages on one tunneled
// connection with an echo server; ns/op is the round-trip latency.
func BenchmarkTunnelRoundTrip(b *testing.B) {
	for _, mode := range []string{"yamux", "wss", "json"} {
		b.Run(mode, func(b *testing.B) {
			snk, echo := startBackends(b)
			_, echoEP := inProcessTunnel(b, mode, snk.Addr(), echo.Addr())
			c, err := net.DialTimeout("tcp", echoEP, dialTimeout)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			msg := []byte{1}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkMetricsScrape measures what metrics cost the data path: bulk
// data through a yamux tunnel while nobody reads the metrics, and while
// both registries are gathered every 10 ms (a Prometheus server scrapes
// every 15-60 s). Counting itself is always on: one atomic add per read.
func BenchmarkMetricsScrape(b *testing.B) {
	for _, every := range []time.Duration{0, 10 * time.Millisecond} {
		name := "not-scraped"
		if every > 0 {
			name = "scraped-every-10ms"
		}
		b.Run(name, func(b *testing.B) {
			snk, echo := startBackends(b)
			gwReg, agReg := prometheus.NewRegistry(), prometheus.NewRegistry()
			sinkEP, _ := inProcessTunnelWith(b, "yamux", snk.Addr(), echo.Addr(), gwReg, agReg)
			c, err := net.DialTimeout("tcp", sinkEP, dialTimeout)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			stop := make(chan struct{})
			scraped := make(chan int)
			go func() {
				n := 0
				defer func() { scraped <- n }()
				if every == 0 {
					<-stop
					return
				}
				t := time.NewTicker(every)
				defer t.Stop()
				for {
					select {
					case <-stop:
						return
					case <-t.C:
						gwReg.Gather()
						agReg.Gather()
						n++
					}
				}
			}()
			buf := make([]byte, throughputWrite)
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			close(stop)
			if n := <-scraped; every > 0 && n == 0 && b.Elapsed() > 100*time.Millisecond {
				b.Fatal("the scraper never ran")
			}
		})
	}
}

// runAgent runs a until the benchmark ends and waits until it has
// registered.
func runAgent(b *testing.B, ctx context.Context, a *agent.Agent) {
	b.Helper()
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.Run(ctx)
	}()
	b.Cleanup(func() {
		cancel()
		<-done
	})
	deadline := time.Now().Add(startupTimeout)
	for !a.Ready() {
		if time.Now().After(deadline) {
			b.Fatalf("agent not registered within %v", startupTimeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
