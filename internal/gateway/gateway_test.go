package gateway

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/store"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func TestAuthLimiterWindows(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	l := newAuthLimiter(3, time.Minute)
	l.now = clk.now
	for i := 0; i < 2; i++ {
		if !l.allowed("1.2.3.4") || l.fail("1.2.3.4") {
			t.Fatalf("attempt %d throttled early", i)
		}
	}
	if !l.fail("1.2.3.4") {
		t.Fatal("third failure did not report going over the limit")
	}
	if l.allowed("1.2.3.4") {
		t.Fatal("source over the limit still allowed")
	}
	if !l.allowed("5.6.7.8") {
		t.Fatal("another source was throttled")
	}
	if l.fail("1.2.3.4") {
		t.Fatal("over-limit reported twice in one window")
	}
	clk.t = clk.t.Add(time.Minute)
	if !l.allowed("1.2.3.4") {
		t.Fatal("source still throttled after its window")
	}
}

func TestAuthLimiterBoundedMemory(t *testing.T) {
	l := newAuthLimiter(3, time.Minute)
	for i := 0; i < maxTrackedSources+100; i++ {
		l.fail(fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255))
	}
	if n := len(l.sources); n > maxTrackedSources {
		t.Fatalf("tracking %d sources, limit %d", n, maxTrackedSources)
	}
}

// bindExcept binds every port but the busy ones.
func bindExcept(busy ...int) bindFunc {
	return func(port int) (func(), error) {
		for _, b := range busy {
			if b == port {
				return nil, fmt.Errorf("listen: %w", syscall.EADDRINUSE)
			}
		}
		return func() {}, nil
	}
}

func TestPortsPreferenceRetentionAndOwnership(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	st := &store.Memory{}
	p := newPorts(10000, 10010, time.Hour, st)
	p.now = clk.now
	svc := func(id string, port int) *protocol.Service {
		return &protocol.Service{ID: id, Protocol: protocol.KindTCP, Port: port}
	}
	if port, err := p.acquire(context.Background(), "a", svc("pg", 5), bindExcept()); err != nil || port != 10005 {
		t.Fatalf("preferred port: %d %v", port, err)
	}
	// Busy on the host: skipped.
	if port, err := p.acquire(context.Background(), "a", svc("web", 6), bindExcept(10006)); err != nil || port != 10007 {
		t.Fatalf("busy port not skipped: %d %v", port, err)
	}
	// Another agent wanting 10005 gets another port, and may not ask for it.
	if port, _ := p.acquire(context.Background(), "b", svc("pg", 5), bindExcept()); port == 10005 {
		t.Fatal("agent b got agent a's port")
	}
	exact := &protocol.Service{ID: "x", Protocol: protocol.KindTCP, Port: 1, PublicPort: 10005}
	if _, err := p.acquire(context.Background(), "b", exact, bindExcept()); err == nil {
		t.Fatal("agent b took agent a's port by asking for it")
	}
	// Withdrawn: retained for a, not given to b, and back the same for a.
	p.retain("a", protocol.ServiceKey{ID: "pg", Kind: protocol.KindTCP}, 10005)
	if port, _ := p.acquire(context.Background(), "b", svc("other", 5), bindExcept()); port == 10005 {
		t.Fatal("retained port given away")
	}
	if port, _ := p.acquire(context.Background(), "a", svc("pg", 5), bindExcept()); port != 10005 {
		t.Fatalf("service came back on %d, want 10005", port)
	}
	// After the retention period a withdrawn port is free again.
	p.retain("a", protocol.ServiceKey{ID: "pg", Kind: protocol.KindTCP}, 10005)
	clk.t = clk.t.Add(2 * time.Hour)
	if port, _ := p.acquire(context.Background(), "c", svc("pg", 5), bindExcept()); port != 10005 {
		t.Fatalf("expired port not reused: got %d", port)
	}
	// Persisted and reloaded.
	q := newPorts(10000, 10010, time.Hour, st)
	if err := q.load(context.Background()); err != nil {
		t.Fatal(err)
	}
	if port, _ := q.acquire(context.Background(), "c", svc("pg", 5), bindExcept()); port != 10005 {
		t.Fatalf("after reload: %d", port)
	}
	// Exhaustion is an error, not a hang.
	small := newPorts(10000, 10001, time.Hour, &store.Memory{})
	small.acquire(context.Background(), "a", svc("1", 1), bindExcept())
	small.acquire(context.Background(), "a", svc("2", 2), bindExcept())
	if _, err := small.acquire(context.Background(), "a", svc("3", 3), bindExcept()); !errors.Is(err, errNoPort) {
		t.Fatalf("full range: %v", err)
	}
}
