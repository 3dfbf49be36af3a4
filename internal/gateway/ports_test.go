package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/store"
)

// testPorts returns an allocator over low-high with a fake clock that
// moves one second per call of tick, a cap of limit retained allocations
// per agent (limit < 0: none) and a log of its evictions.
func testPorts(low, high, limit int, st store.Store) (*ports, *fakeClock, *[]eviction) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	p := newPorts(low, high, time.Hour, st)
	p.now = clk.now
	if limit >= 0 {
		p.maxRetained = func(string) int { return limit }
	}
	var log []eviction
	p.onEvict = func(ev []eviction) { log = append(log, ev...) }
	return p, clk, &log
}

func tcp(id string) *protocol.Service {
	return &protocol.Service{ID: id, Protocol: protocol.KindTCP, Port: 1}
}

func tcpKey(id string) protocol.ServiceKey {
	return protocol.ServiceKey{ID: id, Kind: protocol.KindTCP}
}

// retainKey withdraws an agent's service, wherever its port is.
func retainKey(p *ports, agent string, svc protocol.ServiceKey) {
	p.mu.Lock()
	a := p.byKey[allocKey{agent, svc}]
	p.mu.Unlock()
	if a != nil {
		p.retain(agent, svc, a.port)
	}
}

// writeState writes a state file as an earlier build did.
func writeState(t *testing.T, path string, allocs []store.Allocation) {
	t.Helper()
	b, err := json.Marshal(map[string]any{"version": 1, "allocations": allocs})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// held counts an agent's allocations: live and retained.
func held(p *ports, agent string) (live, retained int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, a := range p.byAgent[agent] {
		if a.live {
			live++
		} else {
			retained++
		}
	}
	return live, retained
}

// churn has agent register n fresh service ids one after another, each
// replacing the last (acquire the new one, then withdraw the old one), as
// a token holder changing ids would.
func churn(t *testing.T, p *ports, clk *fakeClock, agent string, n int) {
	t.Helper()
	prev := ""
	for i := 0; i < n; i++ {
		clk.t = clk.t.Add(time.Second)
		id := fmt.Sprintf("churn-%03d", i)
		if _, err := p.acquire(context.Background(), agent, tcp(id), bindExcept()); err != nil {
			t.Fatalf("%s: %s: %v", agent, id, err)
		}
		if prev != "" {
			retainKey(p, agent, tcpKey(prev))
		}
		prev = id
	}
}

// An agent's retained allocations are capped, the oldest evicted first, so
// a token holder churning service ids cannot take the whole range from
// another agent.
func TestPortsRetainedCapStopsChurn(t *testing.T) {
	p, clk, evicted := testPorts(10000, 10009, 3, &store.Memory{})
	churn(t, p, clk, "churner", 50)
	if live, retained := held(p, "churner"); live != 1 || retained != 3 {
		t.Fatalf("churner holds %d live and %d retained, want 1 and the cap of 3", live, retained)
	}
	// 49 withdrawn, 3 kept: 46 evicted, oldest first, for the cap.
	if len(*evicted) != 46 {
		t.Fatalf("%d evictions, want 46", len(*evicted))
	}
	for i, e := range *evicted {
		if want := fmt.Sprintf("churn-%03d", i); e.svc.ID != want || e.reason != evictAgentCap {
			t.Fatalf("eviction %d: %s (%v), want %s (agent_cap): not oldest first", i, e.svc.ID, e.reason, want)
		}
	}
	// The other agent gets the rest of the range without evicting anyone.
	for i := 0; i < 6; i++ {
		if _, err := p.acquire(context.Background(), "other", tcp(fmt.Sprintf("svc-%d", i)), bindExcept()); err != nil {
			t.Fatalf("other agent's service %d: %v", i, err)
		}
	}
	if len(*evicted) != 46 {
		t.Errorf("the other agent's services evicted %d allocations, want none", len(*evicted)-46)
	}
}

// With the range full, a new service takes the oldest retained allocation,
// its own agent's first, and only when nothing is retained is it refused.
func TestPortsRangeFullEvictsOldestRetained(t *testing.T) {
	p, clk, evicted := testPorts(10000, 10003, -1, &store.Memory{})
	step := func() { clk.t = clk.t.Add(time.Second) }
	for _, s := range []struct{ agent, id string }{{"a", "a1"}, {"c", "c1"}, {"a", "a2"}, {"b", "b1"}} {
		step()
		if _, err := p.acquire(context.Background(), s.agent, tcp(s.id), bindExcept()); err != nil {
			t.Fatal(err)
		}
	}
	// Retained, oldest first: a1, c1, a2; b1 stays live.
	for _, s := range []struct{ agent, id string }{{"a", "a1"}, {"c", "c1"}, {"a", "a2"}} {
		step()
		retainKey(p, s.agent, tcpKey(s.id))
	}
	want := map[string]int{}
	p.mu.Lock()
	for k, a := range p.byKey {
		want[k.svc.ID] = a.port
	}
	p.mu.Unlock()

	// b has nothing retained: the oldest of anyone's, a1, makes room.
	step()
	if port, err := p.acquire(context.Background(), "b", tcp("b2"), bindExcept()); err != nil || port != want["a1"] {
		t.Fatalf("b2 got %d (%v), want a1's %d", port, err, want["a1"])
	}
	// a has a2 retained: its own goes before c's older c1.
	step()
	if port, err := p.acquire(context.Background(), "a", tcp("a3"), bindExcept()); err != nil || port != want["a2"] {
		t.Fatalf("a3 got %d (%v), want a's own a2's %d", port, err, want["a2"])
	}
	// c1's port held by another process: c1 is not evicted for nothing.
	step()
	if _, err := p.acquire(context.Background(), "b", tcp("b3"), bindExcept(want["c1"])); !errors.Is(err, errNoPort) {
		t.Fatalf("b3 with c1's port busy on the host: %v, want errNoPort", err)
	}
	if port, err := p.acquire(context.Background(), "b", tcp("b3"), bindExcept()); err != nil || port != want["c1"] {
		t.Fatalf("b3 got %d (%v), want c1's %d", port, err, want["c1"])
	}
	// Everything live: refused.
	if _, err := p.acquire(context.Background(), "b", tcp("b4"), bindExcept()); !errors.Is(err, errNoPort) {
		t.Fatalf("full range, nothing retained: %v, want errNoPort", err)
	}
	var got []string
	for _, e := range *evicted {
		if e.reason != evictRangeFull {
			t.Errorf("eviction of %s for %v, want range_full", e.svc.ID, e.reason)
		}
		got = append(got, e.agent+"/"+e.svc.ID)
	}
	if w := []string{"a/a1", "a/a2", "c/c1"}; !reflect.DeepEqual(got, w) {
		t.Errorf("evicted %v, want %v", got, w)
	}
}

// An agent that reconnects with all its services gets every port back,
// even when it is at its cap of retained allocations: the cap evicts the
// older ones.
func TestPortsReconnectKeepsPortsAtTheCap(t *testing.T) {
	p, clk, evicted := testPorts(10000, 10099, 3, &store.Memory{})
	churn(t, p, clk, "a", 4) // three old ids retained: at the cap
	retainKey(p, "a", tcpKey("churn-003"))
	*evicted = nil

	ports := map[string]int{}
	for _, id := range []string{"x", "y", "z"} {
		clk.t = clk.t.Add(time.Second)
		port, err := p.acquire(context.Background(), "a", tcp(id), bindExcept())
		if err != nil {
			t.Fatal(err)
		}
		ports[id] = port
	}
	clk.t = clk.t.Add(time.Second)
	for _, id := range []string{"x", "y", "z"} { // the session drops
		retainKey(p, "a", tcpKey(id))
	}
	for _, id := range []string{"x", "y", "z"} { // and comes back
		if port, err := p.acquire(context.Background(), "a", tcp(id), bindExcept()); err != nil || port != ports[id] {
			t.Errorf("%s came back on %d (%v), want %d", id, port, err, ports[id])
		}
	}
	if len(*evicted) != 3 {
		t.Fatalf("evicted %v, want the three old ids", *evicted)
	}
	for _, e := range *evicted {
		if e.svc.ID == "x" || e.svc.ID == "y" || e.svc.ID == "z" {
			t.Errorf("a reconnecting service's port was evicted: %+v", e)
		}
	}
}

// The cap holds across a restart: allocations reloaded from the state file
// are retained until their services register again, and an agent over its
// cap loses the oldest.
func TestPortsRetainedCapAfterReload(t *testing.T) {
	st := &store.Memory{}
	p, clk, _ := testPorts(10000, 10099, -1, st) // an older build: no cap
	churn(t, p, clk, "a", 10)
	retainKey(p, "a", tcpKey("churn-009"))
	q, _, evicted := testPorts(10000, 10099, 4, st)
	if err := q.load(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, retained := held(q, "a"); retained != 4 {
		t.Fatalf("after reload %d retained, want the cap of 4", retained)
	}
	if len(*evicted) != 6 {
		t.Fatalf("%d evicted on load, want 6", len(*evicted))
	}
	for i, e := range *evicted {
		if want := fmt.Sprintf("churn-%03d", i); e.svc.ID != want {
			t.Errorf("eviction %d on load: %s, want %s", i, e.svc.ID, want)
		}
	}
	q.mu.Lock()
	kept := q.byKey[allocKey{"a", tcpKey("churn-009")}]
	q.mu.Unlock()
	if kept == nil {
		t.Fatal("the newest allocation was evicted")
	}
	if port, err := q.acquire(context.Background(), "a", tcp("churn-009"), bindExcept()); err != nil || port != kept.port {
		t.Errorf("churn-009 came back on %d (%v), want %d", port, err, kept.port)
	}
}

// The gateway applies max_retained_ports to the state file it starts from
// and counts the evictions in portway_gateway_port_evictions_total.
func TestGatewayEnforcesRetainedCapOnStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gateway.db")
	var allocs []store.Allocation
	for i := 0; i < 10; i++ {
		allocs = append(allocs, store.Allocation{Agent: "a", Service: fmt.Sprintf("s%d", i), Protocol: protocol.KindTCP,
			Port: 10000 + i, LastUsed: time.Now().Add(time.Duration(i-20) * time.Minute).UTC().Truncate(time.Second)})
	}
	writeState(t, path, allocs)
	cfg := config.DefaultGateway()
	cfg.Listen, cfg.BindAddress, cfg.Insecure, cfg.StateFile = "127.0.0.1:0", "127.0.0.1", true, path
	cfg.PortRange, cfg.MaxServices = "10000-10099", 2
	cfg.Agents = []config.AgentIdentity{{Name: "a", Token: "agent-a-token-0123456789", MaxRetainedPorts: 4}}
	reg := prometheus.NewRegistry()
	g, err := New(Options{Config: cfg, Registry: reg, Gatherer: reg})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	g.Close()
	var m dto.Metric
	if err := g.metrics.PortEvictions.WithLabelValues("agent_cap").Write(&m); err != nil {
		t.Fatal(err)
	}
	if n := m.GetCounter().GetValue(); n != 6 {
		t.Errorf("agent_cap evictions %v, want 6", n)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := store.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, a := range got {
		ids = append(ids, a.Service)
	}
	if want := []string{"s6", "s7", "s8", "s9"}; !reflect.DeepEqual(ids, want) {
		t.Errorf("state file after the restart holds %v, want the newest %v", ids, want)
	}
}

// A service asking for its agent's retained port takes it over only once
// the port is bound: when the bind fails, the retained allocation stays
// with the service that left it.
func TestPortsFailedTakeOverKeepsRetainedPort(t *testing.T) {
	p := newPorts(10000, 10010, time.Hour, &store.Memory{})
	// 10005 is busy at first, so pg's port is one it would not get again
	// by preference.
	pg := &protocol.Service{ID: "pg", Protocol: protocol.KindTCP, Port: 5}
	if port, err := p.acquire(context.Background(), "a", pg, bindExcept(10005)); err != nil || port != 10006 {
		t.Fatalf("pg: %d %v", port, err)
	}
	retainKey(p, "a", pg.Key())
	other := &protocol.Service{ID: "other", Protocol: protocol.KindTCP, Port: 1, PublicPort: 10006}
	if _, err := p.acquire(context.Background(), "a", other, bindExcept(10006)); err == nil {
		t.Fatal("took over a port that could not be bound")
	}
	if port, err := p.acquire(context.Background(), "a", pg, bindExcept()); err != nil || port != 10006 {
		t.Fatalf("pg came back on %d (%v), want its retained 10006", port, err)
	}
}

// With a shared store, an allocation another replica serves (live in the
// store) is never evicted here, not even for a full range: only its expiry
// frees it.
func TestPortsNeverEvictAnotherReplicasLivePort(t *testing.T) {
	st := &store.Memory{}
	ctx := context.Background()
	other, err := st.Claim(ctx, store.Allocation{Agent: "b", Service: "web", Protocol: protocol.KindTCP, Port: 10001})
	if err != nil {
		t.Fatal(err)
	}
	p, _, evicted := testPorts(10000, 10001, -1, st)
	p.shared = true
	if err := p.load(ctx); err != nil {
		t.Fatal(err)
	}
	if port, err := p.acquire(ctx, "a", tcp("pg"), bindExcept()); err != nil || port != 10000 {
		t.Fatalf("pg: %d, %v", port, err)
	}
	if _, err := p.acquire(ctx, "a", tcp("redis"), bindExcept()); !errors.Is(err, errNoPort) {
		t.Fatalf("full range with another replica's live port: %v, want errNoPort", err)
	}
	all, _, err := st.List(ctx)
	if err != nil || len(all) != 2 || len(*evicted) != 0 {
		t.Fatalf("store holds %+v (%v), evictions %v", all, err, *evicted)
	}
	for _, a := range all {
		if a.Port == other.Port && (a.Agent != "b" || a.Revision != other.Revision) {
			t.Fatalf("another replica's live port changed: %+v", a)
		}
	}
}

// In a cluster, a replica that cannot open a port the service already
// holds (another program has it on this host) neither releases the
// allocation, which other replicas serve, nor moves the service to
// another port: the registration fails here only.
func TestPortsSharedBindFailureKeepsAllocation(t *testing.T) {
	st := &store.Memory{}
	ctx := context.Background()
	held, err := st.Claim(ctx, store.Allocation{Agent: "a", Service: "pg", Protocol: protocol.KindTCP, Port: 10005})
	if err != nil {
		t.Fatal(err)
	}
	p, _, _ := testPorts(10000, 10010, -1, st)
	p.shared = true
	if err := p.load(ctx); err != nil {
		t.Fatal(err)
	}
	pg := &protocol.Service{ID: "pg", Protocol: protocol.KindTCP, Port: 5}
	if port, err := p.acquire(ctx, "a", pg, bindExcept(10005)); err == nil {
		t.Fatalf("pg moved to %d on a replica that cannot open its port", port)
	}
	all, _, err := st.List(ctx)
	if err != nil || len(all) != 1 || all[0].Port != held.Port || all[0].Agent != "a" {
		t.Fatalf("store holds %+v (%v), want pg's allocation of %d kept", all, err, held.Port)
	}
}
