package gateway

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/tunnel"
)

const testToken = "agent-a-token-0123456789"

// startTestGateway runs a gateway on loopback with one agent, agent-a. The
// caller closes it (a wedged gateway cannot be closed, so the tests that
// look for a wedge decide themselves).
func startTestGateway(t *testing.T, opts ...func(*config.GatewayFile)) *Gateway {
	t.Helper()
	cfg := config.DefaultGateway()
	cfg.Listen = "127.0.0.1:0"
	cfg.PublicHost = "127.0.0.1"
	cfg.BindAddress = "127.0.0.1"
	cfg.StateFile = ""
	cfg.Insecure = true
	cfg.HeartbeatInterval = config.D(time.Second)
	cfg.Agents = []config.AgentIdentity{{Name: "agent-a", Token: testToken}}
	cfg.Admin = config.Admin{Listen: "127.0.0.1:0", Token: "admin-token-0123456789"}
	for _, o := range opts {
		o(cfg)
	}
	log, _ := testlog.New(t, "gateway")
	g, err := New(Options{Config: cfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return g
}

// fakeAgent is the agent's side of a tunnel, driven by the test.
type fakeAgent struct {
	sess *tunnel.Session
	ack  *protocol.RegisterAck
}

// connectFakeAgent opens a tunnel as agent-a, registers services and
// waits for the acknowledgement. accept handles the streams the gateway
// opens (nil: refuse them all).
func connectFakeAgent(ctx context.Context, g *Gateway, mode string, services []protocol.Service, accept func(*tunnel.Incoming)) (*fakeAgent, error) {
	return connectFakeAgentInstance(ctx, g, mode, "", services, accept)
}

func udpSpec(id string) protocol.Service {
	return protocol.Service{ID: id, Protocol: protocol.KindUDP, Port: 53}
}

// udpSources keeps n goroutines sending to addr, each from a fresh source
// port every few datagrams, so that new clients keep arriving, until stop
// is called.
func udpSources(t *testing.T, addr string, n int) (stop func()) {
	t.Helper()
	ua := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr))
	done := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := []byte("ping")
			for {
				c, err := net.DialUDP("udp", nil, ua)
				if err != nil {
					select {
					case <-done:
						return
					case <-time.After(10 * time.Millisecond):
					}
					continue
				}
				for j := 0; j < 3; j++ {
					c.Write(msg)
				}
				c.Close()
				select {
				case <-done:
					return
				case <-time.After(time.Millisecond):
				}
			}
		}()
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			close(done)
			wg.Wait()
		})
	}
	t.Cleanup(stop)
	return stop
}

// lockWaiters summarizes the goroutines waiting for a mutex inside this
// package: one line per distinct waiting function, with a count.
func lockWaiters() string {
	buf := make([]byte, 4<<20)
	dump := string(buf[:runtime.Stack(buf, true)])
	count := map[string]int{}
	var order []string
	for _, blk := range strings.Split(dump, "\n\n") {
		if !strings.Contains(blk, "sync.(*Mutex).Lock") {
			continue
		}
		for _, line := range strings.Split(blk, "\n") {
			if strings.HasPrefix(line, "github.com/portway/portway/internal/gateway.") {
				fn, _, _ := strings.Cut(line, "(0x")
				if count[fn] == 0 {
					order = append(order, fn)
				}
				count[fn]++
				break
			}
		}
	}
	var b strings.Builder
	for _, fn := range order {
		fmt.Fprintf(&b, "  %d × %s\n", count[fn], fn)
	}
	return b.String()
}

// An agent whose tunnel drops and comes back again and again while
// hundreds of UDP sources keep arriving at its public UDP port must find
// the gateway answering every time: the per-datagram path and the
// registration path once took their two locks in opposite orders.
func TestReconnectUnderUDPLoadDoesNotWedge(t *testing.T) {
	// The default heartbeat: the sources load a shared machine heavily.
	g := startTestGateway(t, func(c *config.GatewayFile) { c.HeartbeatInterval = config.D(5 * time.Second) })
	wedged := false
	defer func() {
		if !wedged {
			g.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	first, err := connectFakeAgent(ctx, g, "yamux", []protocol.Service{udpSpec("dns")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if e := first.ack.Endpoints[0]; e.Error != "" {
		t.Fatalf("udp service not exposed: %s", e.Error)
	}
	stop := udpSources(t, first.ack.Endpoints[0].Address, 200)
	defer stop()
	fa := first
	var slowest time.Duration
	defer func() { t.Logf("slowest reconnect: %v", slowest.Round(time.Millisecond)) }()
	const reconnects = 15
	for i := 0; i < reconnects; i++ {
		time.Sleep(30 * time.Millisecond) // let sessions start on this tunnel
		fa.sess.Close()
		began := time.Now()
		res := make(chan error, 1)
		go func() {
			// Bounded below the guard, so the goroutine never outlives
			// the test by long.
			cctx, ccancel := context.WithTimeout(ctx, 25*time.Second)
			defer ccancel()
			next, err := connectFakeAgent(cctx, g, "yamux", []protocol.Service{udpSpec("dns")}, nil)
			if err == nil {
				fa = next
			}
			res <- err
		}()
		select {
		case err := <-res:
			if err != nil {
				t.Fatalf("reconnect %d: %v", i+1, err)
			}
			slowest = max(slowest, time.Since(began))
		case <-time.After(30 * time.Second): // a wedge is for ever; a loaded machine is slow
			wedged = true
			t.Fatalf("reconnect %d not registered within 30s: the gateway is wedged; goroutines blocked on its locks:\n%s",
				i+1, lockWaiters())
		}
	}
	fa.sess.Close()
}

// /healthz is the liveness check: it fails, naming the lock, when the
// registration path is wedged, and answers again once it is free.
func TestHealthzFailsWhenWedged(t *testing.T) {
	g := startTestGateway(t)
	defer g.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	fa, err := connectFakeAgent(ctx, g, "json", []protocol.Service{udpSpec("dns")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.sess.Close()
	url := "http://" + g.AdminAddr().String() + "/healthz"
	get := func() (int, string) {
		t.Helper()
		c := http.Client{Timeout: 20 * time.Second}
		resp, err := c.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get(); code != 200 {
		t.Fatalf("healthy gateway: %d %s", code, body)
	}
	g.mu.Lock()
	a := g.agents["agent-a"]
	g.mu.Unlock()
	for _, c := range []struct {
		mu   *sync.Mutex
		want string
	}{
		{&g.mu, "agents lock"},
		{&a.mu, "agent agent-a"},
		{&g.ports.mu, "port allocations"},
	} {
		c.mu.Lock()
		code, body := get()
		c.mu.Unlock()
		if code != http.StatusServiceUnavailable || !strings.Contains(body, c.want) {
			t.Errorf("with the %s held: %d %q, want 503 naming it", c.want, code, body)
		}
		if code, body := get(); code != 200 {
			t.Fatalf("after releasing the %s: %d %s", c.want, code, body)
		}
	}
}
