// Package e2e runs a real gateway and a real agent in-process on loopback,
// connected through a real WebSocket, and drives real servers (PostgreSQL,
// Redis, sshd, dnsmasq) with their real clients through them, in both
// protocol modes.
package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/gateway"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/quickstart"
	"github.com/portway/portway/internal/testgateway"
	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/testservers"
)

var modes = []string{"yamux", "json"}

const (
	tokenA     = "agent-a-token-0123456789"
	tokenB     = "agent-b-token-0123456789"
	adminToken = "admin-token-0123456789"
)

type gw struct {
	*gateway.Gateway
	cfg *config.GatewayFile
	reg *prometheus.Registry
	log *testlog.Buffer
}

// startGateway starts a gateway on loopback with two agents (agent-a and
// agent-b) allowed. opts may adjust the config before it starts.
func startGateway(t *testing.T, opts ...func(*config.GatewayFile)) *gw {
	t.Helper()
	cfg := testgateway.Config(t, config.AgentIdentity{Name: "agent-a", Token: tokenA}, config.AgentIdentity{Name: "agent-b", Token: tokenB})
	cfg.HeartbeatInterval = config.D(time.Second)
	cfg.Admin = config.Admin{Listen: "127.0.0.1:0", Token: adminToken}
	for _, o := range opts {
		o(cfg)
	}
	log, lb := testlog.New(t, "gateway")
	secrets := []string{cfg.Admin.Token}
	for _, a := range cfg.Agents {
		secrets = append(secrets, a.Token)
	}
	// Registered before Close, so it runs after: the whole log is in.
	t.Cleanup(func() { checkNoSecrets(t, "gateway", lb.String(), secrets...) })
	reg := prometheus.NewRegistry()
	g := testgateway.Start(t, gateway.Options{Config: cfg, Logger: log, Registry: reg, Gatherer: reg, Version: "test"})
	return &gw{Gateway: g, cfg: cfg, reg: reg, log: lb}
}

// checkNoSecrets fails the test if log contains any of the secrets (empty
// ones ignored) or the harness's own tokens: no token is ever logged, at
// any level, valid or not. Every e2e component logs at debug level.
func checkNoSecrets(t *testing.T, name, log string, secrets ...string) {
	t.Helper()
	seen := map[string]bool{"": true}
	for _, s := range append(secrets, tokenA, tokenB, adminToken) {
		if !seen[s] && strings.Contains(log, s) {
			seen[s] = true
			t.Errorf("the %s log contains a token (%s...)", name, s[:min(4, len(s))])
		}
	}
}

func (g *gw) url() string { return testgateway.URL(g.Gateway) }

type ag struct {
	*agent.Agent
	cfg    *config.AgentFile
	reg    *prometheus.Registry
	log    *testlog.Buffer
	cancel context.CancelFunc
	done   chan struct{}
}

// startAgent starts an agent connected to g in the given mode exposing
// services, without waiting for registration.
func startAgent(t *testing.T, url, token, mode string, services []config.StaticService, opts ...func(*config.AgentFile)) *ag {
	t.Helper()
	cfg := config.DefaultAgent()
	cfg.Gateway = config.GatewayConn{URL: url, Token: token, Protocol: mode}
	cfg.Metrics.Listen = "127.0.0.1:0"
	cfg.Services = services
	for _, o := range opts {
		o(cfg)
	}
	log, lb := testlog.New(t, "agent")
	t.Cleanup(func() { checkNoSecrets(t, "agent", lb.String(), cfg.Gateway.Token) })
	reg := prometheus.NewRegistry()
	a, err := agent.New(agent.Options{Config: cfg, Logger: log, Registry: reg, Gatherer: reg, Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.StartMetrics(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &ag{Agent: a, cfg: cfg, reg: reg, log: lb, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		a.Run(ctx)
	}()
	t.Cleanup(h.stop)
	return h
}

func (a *ag) stop() {
	a.cancel()
	<-a.done
}

// waitReady waits until the agent has registered and returns its endpoints
// by service id ("udp/" prefix for UDP services).
func (a *ag) waitReady(t *testing.T) map[string]string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !a.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("agent did not register within 15s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	eps := map[string]string{}
	for _, e := range a.Endpoints() {
		k := e.Service.ID
		if e.Service.Protocol == protocol.KindUDP {
			k = "udp/" + k
		}
		if e.Error != "" {
			eps[k] = "error: " + e.Error
		} else {
			eps[k] = e.Address
		}
	}
	return eps
}

// echoBackend starts a TCP echo server for the test.
func echoBackend(t *testing.T) string {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	addr, err := quickstart.StartEcho(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return addr.String()
}

func splitHostPort(t *testing.T, addr string) (string, int) {
	t.Helper()
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("endpoint %q: %v", addr, err)
	}
	var port int
	fmt.Sscan(p, &port)
	return h, port
}

// httpGet fetches url with an optional bearer token.
func httpGet(t *testing.T, url, token string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func freePort(t *testing.T) int { return testservers.FreePort(t, "tcp") }

// httpGetQuiet fetches url and returns the status (0 on a transport error).
func httpGetQuiet(url string) (int, string) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
