package gateway

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/tunnel"
)

// connectAs opens a tunnel with token, registers one TCP service and waits
// for the acknowledgement.
func connectAs(ctx context.Context, t *testing.T, g *Gateway, token string) *tunnel.Session {
	t.Helper()
	ws, err := tunnel.Dial(ctx, "ws://"+g.TunnelAddr().String()+tunnel.Path, tunnel.DialOptions{Token: token})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	sess, err := tunnel.Client(ctx, ws, tunnel.Config{})
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	t.Cleanup(sess.Close)
	if err := sess.Send(&protocol.Register{Seq: 1, Services: []protocol.Service{*tcp("svc")}}); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case m := <-sess.Control():
			if ack, ok := m.(*protocol.RegisterAck); ok {
				if ack.Endpoints[0].Error != "" {
					t.Fatalf("register: %s", ack.Endpoints[0].Error)
				}
				return sess
			}
		case <-sess.Done():
			t.Fatalf("session ended before the register ack: %v", sess.Err())
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
	}
}

func tokenFor(name string) string { return name + "-token-0123456789abcdef" }

// Beyond max_concurrent_handshakes, an agent gets 503 with Retry-After
// before any upgrade, counted; agents already connected are untouched; the
// slot is free again once the handshake in progress ends.
func TestHandshakesBeyondTheLimitAreDeferred(t *testing.T) {
	g := startTestGateway(t, func(c *config.GatewayFile) {
		c.MaxConcurrentHandshakes = 1
		c.Agents = nil
		for _, n := range []string{"a", "b", "c"} {
			c.Agents = append(c.Agents, config.AgentIdentity{Name: n, Token: tokenFor(n)})
		}
	})
	defer g.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a := connectAs(ctx, t, g, tokenFor("a"))

	// b upgrades but does not answer the hello: its handshake holds the
	// only slot.
	wsB, err := tunnel.Dial(ctx, "ws://"+g.TunnelAddr().String()+tunnel.Path, tunnel.DialOptions{Token: tokenFor("b")})
	if err != nil {
		t.Fatal(err)
	}
	defer wsB.Close()
	if got := gaugeValue(t, g.metrics.HandshakesInFlight); got != 1 {
		t.Fatalf("handshakes in flight %d, want 1", got)
	}
	_, err = tunnel.Dial(ctx, "ws://"+g.TunnelAddr().String()+tunnel.Path, tunnel.DialOptions{Token: tokenFor("c")})
	var de *tunnel.DialError
	if !errors.As(err, &de) || de.StatusCode != http.StatusServiceUnavailable || de.RetryAfter != minHandshakeRetryAfter {
		t.Fatalf("third agent during b's handshake: %v, want 503 with Retry-After", err)
	}
	if got := counterValue(g.metrics.HandshakesDeferred); got != 1 {
		t.Fatalf("deferred %v, want 1", got)
	}
	select {
	case <-a.Done():
		t.Fatalf("a connected agent's session ended: %v", a.Err())
	default:
	}

	// b completes its handshake: the slot is free for c.
	sessB, err := tunnel.Client(ctx, wsB, tunnel.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer sessB.Close()
	// The gateway gives the slot back once it has read b's ack, just
	// after b's side returns.
	for i := 0; gaugeValue(t, g.metrics.HandshakesInFlight) != 0; i++ {
		if i == 1000 {
			t.Fatal("the slot of a finished handshake was not given back")
		}
		time.Sleep(5 * time.Millisecond)
	}
	connectAs(ctx, t, g, tokenFor("c"))
	if a.Err() != nil || a.RTT() < 0 {
		t.Fatalf("a: %v", a.Err())
	}
}

// writeGatewayConfig writes cfg (JSON, which is YAML) and the agents file
// lines, and loads the config as the gateway command does.
func writeGatewayConfig(t *testing.T, dir string, cfg *config.GatewayFile, agents ...string) *config.GatewayFile {
	t.Helper()
	af := filepath.Join(dir, "agents")
	var lines string
	for _, n := range agents {
		sum := sha256.Sum256([]byte(tokenFor(n)))
		lines += fmt.Sprintf("%s sha256:%s\n", n, hex.EncodeToString(sum[:]))
	}
	if err := os.WriteFile(af, []byte(lines), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.AgentsFile = af
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "gateway.yaml")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	loaded, err := config.LoadGateway(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	return loaded
}

// Agents from the agents file: adding one and revoking another by editing
// the file and reloading touches no other session.
func TestAgentsFileAddAndRevokeTouchNoOtherSession(t *testing.T) {
	dir := t.TempDir()
	base := config.DefaultGateway()
	base.Listen, base.PublicHost, base.BindAddress = "127.0.0.1:0", "127.0.0.1", "127.0.0.1"
	base.StateFile, base.Insecure = "", true
	cfg := writeGatewayConfig(t, dir, base, "keep-1", "keep-2", "gone")
	log, _ := testlog.New(t, "gateway")
	g, err := New(Options{Config: cfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	keep1 := connectAs(ctx, t, g, tokenFor("keep-1"))
	keep2 := connectAs(ctx, t, g, tokenFor("keep-2"))
	gone := connectAs(ctx, t, g, tokenFor("gone"))
	if _, ok := g.authenticate("Bearer " + tokenFor("new")); ok {
		t.Fatal("an agent not yet in the file authenticates")
	}
	sessions := func(name string) *tunnel.Session {
		ins := g.agentNamed(name).liveInstances()
		if len(ins) != 1 {
			t.Fatalf("agent %s has %d live instances, want 1", name, len(ins))
		}
		return ins[0].sess
	}
	live1, live2 := sessions("keep-1"), sessions("keep-2")

	next := writeGatewayConfig(t, dir, base, "keep-1", "new", "keep-2")
	if _, err := g.Reload(next); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gone.Done():
		var pe *tunnel.PeerError
		if !errors.As(gone.Err(), &pe) || pe.Code != protocol.CodeTokenRevoked {
			t.Fatalf("revoked agent's session ended with %v", gone.Err())
		}
	case <-ctx.Done():
		t.Fatal("the revoked agent's session is still up")
	}
	connectAs(ctx, t, g, tokenFor("new"))
	for name, s := range map[string]*tunnel.Session{"keep-1": keep1, "keep-2": keep2} {
		if err := s.Err(); err != nil {
			t.Fatalf("%s's session ended: %v", name, err)
		}
	}
	if sessions("keep-1") != live1 || sessions("keep-2") != live2 {
		t.Fatal("a kept agent's gateway session was replaced")
	}
}

// Retry-After is the time the gateway needs to admit the attempts it
// deferred in the last window, at the pace of its recent handshakes, within
// 1–10 s.
func TestRetryAfterFollowsTheLoad(t *testing.T) {
	now := time.Unix(1000, 0)
	a := &admission{now: func() time.Time { return now }}
	const limit = 2
	handshake := func(took time.Duration) {
		t.Helper()
		if ok, _ := a.admit(limit); !ok {
			t.Fatal("a free slot was not given")
		}
		a.done(now.Add(-took))
	}
	handshake(100 * time.Millisecond)
	a.admit(limit)
	a.admit(limit) // both slots taken
	for range 60 {
		if ok, ra := a.admit(limit); ok || ra != time.Second {
			t.Fatalf("admit over the limit: %v, Retry-After %v; want deferred, 1s", ok, ra)
		}
	}
	// 60 deferred, 2 at a time, 100 ms each: 3 s.
	now = now.Add(time.Second)
	if _, ra := a.admit(limit); ra != 3*time.Second {
		t.Fatalf("after 60 deferred: Retry-After %v, want 3s", ra)
	}
	for range 1000 {
		a.admit(limit)
	}
	now = now.Add(time.Second)
	if _, ra := a.admit(limit); ra != 10*time.Second {
		t.Fatalf("after 1000 deferred: Retry-After %v, want the 10s cap", ra)
	}
	a.done(now)
	a.done(now)
	now = now.Add(time.Second)
	handshake(0)
	now = now.Add(time.Second)
	a.admit(limit)
	a.admit(limit)
	if ok, ra := a.admit(limit); ok || ra != time.Second {
		t.Fatalf("after a quiet window: %v, Retry-After %v; want deferred, 1s", ok, ra)
	}
}
