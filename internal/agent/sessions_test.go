package agent

import (
	"context"
	"net"
	"testing"

	"github.com/portway/portway/internal/config"
)

func newTestAgent(t *testing.T, gw config.GatewayConn) *Agent {
	t.Helper()
	cfg := config.DefaultAgent()
	gw.Token, gw.Protocol = "t", "auto"
	cfg.Gateway = gw
	cfg.Metrics.Listen = ""
	a, err := New(Options{Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// A URL whose host has several addresses is one target per address, and
// the default keeps two sessions; each slot takes a target no other slot
// holds, and dials that address while the URL (so the TLS server name and
// the Host header) stays the same.
func TestSeveralAddressesAreSeveralTargets(t *testing.T) {
	a := newTestAgent(t, config.GatewayConn{URL: "wss://gw.example.com/v1/tunnel"})
	a.lookupHost = func(context.Context, string) ([]string, error) { return []string{"127.0.0.11", "127.0.0.12"}, nil }
	ctx := context.Background()
	if n := a.connections(ctx); n != 2 {
		t.Fatalf("default connections %d, want 2 for a name with two addresses", n)
	}
	t0, t1 := a.chooseTarget(ctx, 0), a.chooseTarget(ctx, 1)
	if t0.addr == t1.addr || t0.url != "wss://gw.example.com/v1/tunnel" || t1.url != t0.url {
		t.Fatalf("slots chose %v and %v, want the two addresses of one URL", t0, t1)
	}
	for _, tgt := range []target{t0, t1} {
		var dialed string
		a.netDial = func(_ context.Context, _, addr string) (net.Conn, error) { dialed = addr; return nil, net.ErrClosed }
		a.dialer(tgt)(ctx, "tcp", "gw.example.com:443")
		if dialed != tgt.addr || (dialed != "127.0.0.11:443" && dialed != "127.0.0.12:443") {
			t.Fatalf("target %v dialed %q", tgt, dialed)
		}
	}
	// Slot 0 fails and tries again: slot 1 holds the other address, so
	// slot 0 keeps to its own.
	if again := a.chooseTarget(ctx, 0); again != t0 {
		t.Fatalf("slot 0 moved to %v, which slot 1 holds", again)
	}
}

// One URL with one address is one session, as before gateway.urls; two
// URLs are two; gateway.connections overrides the default.
func TestDefaultConnections(t *testing.T) {
	ctx := context.Background()
	if n := newTestAgent(t, config.GatewayConn{URL: "ws://127.0.0.1:1/v1/tunnel"}).connections(ctx); n != 1 {
		t.Fatalf("one address: %d connections, want 1", n)
	}
	two := config.GatewayConn{URLs: []string{"ws://127.0.0.11:1/v1/tunnel", "ws://127.0.0.12:1/v1/tunnel"}}
	if n := newTestAgent(t, two).connections(ctx); n != 2 {
		t.Fatalf("two URLs: %d connections, want 2", n)
	}
	two.Connections = 1
	if n := newTestAgent(t, two).connections(ctx); n != 1 {
		t.Fatalf("gateway.connections 1: %d connections", n)
	}
	one := newTestAgent(t, config.GatewayConn{URL: "ws://127.0.0.1:1/v1/tunnel", Connections: 3})
	if n := one.connections(ctx); n != 3 {
		t.Fatalf("gateway.connections 3: %d connections", n)
	}
}

// An instance id: POD_NAME when set, else random; with several
// connections each carries its number.
func TestInstanceIDs(t *testing.T) {
	if id := instanceID(func(string) string { return "agent-7d9f-x2k4q" }); id != "agent-7d9f-x2k4q" {
		t.Fatalf("with POD_NAME: %q", id)
	}
	none := func(string) string { return "" }
	if a, b := instanceID(none), instanceID(none); a == b || len(a) != 16 {
		t.Fatalf("random ids %q and %q", a, b)
	}
	a := &Agent{instance: "pod"}
	if a.slotInstance(0, 1) != "pod" || a.slotInstance(1, 2) != "pod/1" {
		t.Fatalf("slot instances %q %q", a.slotInstance(0, 1), a.slotInstance(1, 2))
	}
}
