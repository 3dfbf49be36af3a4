package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portway/portway/internal/protocol"
)

// clock is a settable clock for a store's Options.Now.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *clock) now() time.Time      { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) add(d time.Duration) { c.ns.Add(int64(d)) }
func alloc(agent, svc string, port int) Allocation {
	return Allocation{Agent: agent, Service: svc, Protocol: protocol.KindTCP, Port: port}
}

// opener returns a new, empty store with opt's policy.
type opener func(t *testing.T, opt Options) Store

// conformanceTimeout is a hang guard for one subtest's store calls.
const conformanceTimeout = 20 * time.Second

// runConformance checks the semantics every Store shares.
func runConformance(t *testing.T, open opener) {
	ctx := func(t *testing.T) context.Context {
		c, cancel := context.WithTimeout(context.Background(), conformanceTimeout)
		t.Cleanup(cancel)
		return c
	}
	t.Run("ClaimFreeOwnTaken", func(t *testing.T) {
		c := newClock()
		st := open(t, Options{Retention: time.Hour, Now: c.now})
		ctx := ctx(t)
		got, err := st.Claim(ctx, alloc("a", "s1", 100))
		if err != nil || !got.Live || got.Revision == 0 || !got.LastUsed.Equal(c.now()) {
			t.Fatalf("claim of a free port: %+v, %v", got, err)
		}
		c.add(time.Second)
		again, err := st.Claim(ctx, alloc("a", "s1", 100))
		if err != nil || again.Revision <= got.Revision || !again.LastUsed.Equal(c.now()) {
			t.Fatalf("claim of its own port: %+v, %v", again, err)
		}
		for _, other := range []Allocation{alloc("b", "s1", 100), alloc("a", "s2", 100)} {
			_, err := st.Claim(ctx, other)
			var te *TakenError
			if !errors.Is(err, ErrTaken) || !errors.As(err, &te) || te.Holder.Agent != "a" || te.Holder.Service != "s1" {
				t.Fatalf("claim by %s/%s of a's port: %v", other.Agent, other.Service, err)
			}
		}
		// UDP 100 is another port.
		u := alloc("b", "dns", 100)
		u.Protocol = protocol.KindUDP
		if _, err := st.Claim(ctx, u); err != nil {
			t.Fatalf("udp 100 beside tcp 100: %v", err)
		}
		if _, err := st.Claim(ctx, Allocation{Agent: "a", Service: "x", Protocol: protocol.KindTCP}); err == nil {
			t.Fatal("claim of port 0 accepted")
		}
	})
	t.Run("SpecKeptThroughRefreshRetainAndList", func(t *testing.T) {
		// Replicas without the agent serve its port from the spec the
		// claim stored: a refresh or a withdrawal must not lose it.
		c := newClock()
		st := open(t, Options{Retention: time.Hour, Now: c.now})
		ctx := ctx(t)
		a := alloc("a", "pg", 200)
		a.Spec = &protocol.Service{ID: "pg", Protocol: protocol.KindTCP, Port: 5432, ProxyProtocol: "v2", AllowCIDRs: []string{"10.0.0.0/8"}}
		if _, err := st.Claim(ctx, a); err != nil {
			t.Fatal(err)
		}
		check := func(step string) {
			t.Helper()
			all, _, err := st.List(ctx)
			if err != nil || len(all) != 1 {
				t.Fatalf("%s: list %+v, %v", step, all, err)
			}
			if s := all[0].Spec; s == nil || s.ProxyProtocol != "v2" || len(s.AllowCIDRs) != 1 || s.AllowCIDRs[0] != "10.0.0.0/8" || s.Port != 5432 {
				t.Fatalf("%s: stored spec %+v", step, s)
			}
		}
		check("claim")
		c.add(time.Minute)
		if _, lost, err := st.Refresh(ctx, []Allocation{alloc("a", "pg", 200)}); err != nil || len(lost) != 0 {
			t.Fatalf("refresh: lost %v, %v", lost, err)
		}
		check("refresh")
		if _, err := st.Retain(ctx, alloc("a", "pg", 200)); err != nil {
			t.Fatal(err)
		}
		check("retain")
	})
	t.Run("RetainExpireTakeOver", func(t *testing.T) {
		c := newClock()
		st := open(t, Options{Retention: time.Hour, Now: c.now})
		ctx := ctx(t)
		if _, err := st.Claim(ctx, alloc("a", "s", 200)); err != nil {
			t.Fatal(err)
		}
		r, err := st.Retain(ctx, alloc("a", "s", 200))
		if err != nil || r.Live {
			t.Fatalf("retain: %+v, %v", r, err)
		}
		c.add(time.Hour)
		if _, err := st.Claim(ctx, alloc("b", "t", 200)); !errors.Is(err, ErrTaken) {
			t.Fatalf("claim of a retained port at the end of its retention: %v", err)
		}
		c.add(time.Second)
		got, err := st.Claim(ctx, alloc("b", "t", 200))
		if err != nil || got.Agent != "b" {
			t.Fatalf("claim of an expired port: %+v, %v", got, err)
		}
		_, lost, err := st.Refresh(ctx, []Allocation{alloc("a", "s", 200)})
		if err != nil || len(lost) != 1 {
			t.Fatalf("refresh by the former holder: lost %v, %v", lost, err)
		}
		if _, err := st.Retain(ctx, alloc("a", "s", 200)); !errors.Is(err, ErrNotHeld) {
			t.Fatalf("retain by the former holder: %v", err)
		}
		if err := st.Release(ctx, alloc("a", "s", 200)); !errors.Is(err, ErrNotHeld) {
			t.Fatalf("release by the former holder: %v", err)
		}
	})
	t.Run("RefreshKeepsLiveFromExpiring", func(t *testing.T) {
		c := newClock()
		st := open(t, Options{Retention: time.Hour, Now: c.now})
		ctx := ctx(t)
		if _, err := st.Claim(ctx, alloc("a", "s", 300)); err != nil {
			t.Fatal(err)
		}
		c.add(59 * time.Minute)
		got, lost, err := st.Refresh(ctx, []Allocation{alloc("a", "s", 300)})
		if err != nil || len(lost) != 0 || len(got) != 1 || !got[0].LastUsed.Equal(c.now()) || got[0].Revision == 0 {
			t.Fatalf("refresh: %+v, lost %v, %v", got, lost, err)
		}
		c.add(59 * time.Minute)
		if _, err := st.Claim(ctx, alloc("b", "t", 300)); !errors.Is(err, ErrTaken) {
			t.Fatalf("a refreshed allocation was taken: %v", err)
		}
		// Without retention nothing expires.
		st0 := open(t, Options{Now: c.now})
		if _, err := st0.Claim(ctx, alloc("a", "s", 301)); err != nil {
			t.Fatal(err)
		}
		c.add(1000 * time.Hour)
		if _, err := st0.Claim(ctx, alloc("b", "t", 301)); !errors.Is(err, ErrTaken) {
			t.Fatalf("retention 0 let an allocation expire: %v", err)
		}
	})
	t.Run("ReleaseComparesOwnerAndRevision", func(t *testing.T) {
		st := open(t, Options{Retention: time.Hour})
		ctx := ctx(t)
		first, err := st.Claim(ctx, alloc("a", "s", 400))
		if err != nil {
			t.Fatal(err)
		}
		// A withdrawal decided before a newer claim does not mark it
		// withdrawn.
		newer, err := st.Claim(ctx, alloc("a", "s", 400))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Retain(ctx, first); !errors.Is(err, ErrNotHeld) {
			t.Fatalf("retain at a stale revision: %v", err)
		}
		if _, err := st.Retain(ctx, newer); err != nil {
			t.Fatal(err)
		}
		if err := st.Release(ctx, alloc("b", "s", 400)); !errors.Is(err, ErrNotHeld) {
			t.Fatalf("release by another agent: %v", err)
		}
		// An eviction decided on the first read must not free the port
		// retained since.
		if err := st.Release(ctx, first); !errors.Is(err, ErrNotHeld) {
			t.Fatalf("release at a stale revision: %v", err)
		}
		if err := st.Release(ctx, alloc("a", "s", 400)); err != nil {
			t.Fatalf("release by the holder: %v", err)
		}
		if err := st.Release(ctx, alloc("a", "s", 400)); err != nil {
			t.Fatalf("release of a free port: %v", err)
		}
		if all, _, err := st.List(ctx); err != nil || len(all) != 0 {
			t.Fatalf("list after release: %v, %v", all, err)
		}
	})
	t.Run("ListAndWatch", func(t *testing.T) {
		st := open(t, Options{Retention: time.Hour})
		ctx := ctx(t)
		if _, err := st.Claim(ctx, alloc("a", "s", 500)); err != nil {
			t.Fatal(err)
		}
		all, rev, err := st.List(ctx)
		if err != nil || len(all) != 1 || all[0].Port != 500 || all[0].Revision == 0 || rev < all[0].Revision {
			t.Fatalf("list: %+v at %d, %v", all, rev, err)
		}
		wctx, stop := context.WithCancel(ctx)
		w := st.Watch(wctx, rev)
		if _, err := st.Claim(ctx, alloc("b", "t", 501)); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Retain(ctx, alloc("a", "s", 500)); err != nil {
			t.Fatal(err)
		}
		if err := st.Release(ctx, alloc("a", "s", 500)); err != nil {
			t.Fatal(err)
		}
		want := []struct {
			typ  EventType
			port int
			live bool
		}{{Put, 501, true}, {Put, 500, false}, {Delete, 500, false}}
		var revs []int64
		for i, wnt := range want {
			e := next(t, w)
			if e.Type != wnt.typ || e.Alloc.Port != wnt.port || e.Alloc.Live != wnt.live || e.Revision <= rev {
				t.Fatalf("event %d: %+v, want %+v after revision %d", i, e, wnt, rev)
			}
			revs = append(revs, e.Revision)
		}
		stop()
		// Resuming after the first event gives the other two.
		w2 := st.Watch(ctx, revs[0])
		for i := 1; i < 3; i++ {
			if e := next(t, w2); e.Revision != revs[i] || e.Alloc.Port != want[i].port {
				t.Fatalf("resumed event %d: %+v, want revision %d", i, e, revs[i])
			}
		}
	})
	t.Run("ConcurrentClaimsOneWinner", func(t *testing.T) {
		st := open(t, Options{Retention: time.Hour})
		ctx := ctx(t)
		const claimers = 8
		var wg sync.WaitGroup
		var won atomic.Int32
		errs := make(chan error, claimers)
		for i := range claimers {
			wg.Go(func() {
				_, err := st.Claim(ctx, alloc(fmt.Sprintf("agent-%d", i), "s", 600))
				switch {
				case err == nil:
					won.Add(1)
				case !errors.Is(err, ErrTaken):
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if n := won.Load(); n != 1 {
			t.Fatalf("%d claims of one port won, want 1", n)
		}
	})
}

// next returns the next event from w, failing after a hang guard.
func next(t *testing.T, w <-chan Event) Event {
	t.Helper()
	select {
	case e, ok := <-w:
		if !ok {
			t.Fatal("watch closed")
		}
		if e.Err != nil {
			t.Fatalf("watch: %v", e.Err)
		}
		return e
	case <-time.After(conformanceTimeout):
		t.Fatal("no watch event")
	}
	return Event{}
}
