//go:build linux

package cluster

import (
	"context"
	"testing"
	"time"

	"github.com/portway/portway/internal/testetcd"
)

// hangGuard bounds every wait of these tests; it is not a performance
// bound.
const hangGuard = 30 * time.Second

// A replica's records are visible to the others while its lease lives,
// vanish at once when it closes, and vanish by themselves when it is cut
// off from etcd, which it learns from Lost.
func TestPresence(t *testing.T) {
	cl := testetcd.Start(t)
	observer := testetcd.Client(t, cl.Endpoint(1), cl.Endpoint(2))
	ctx, cancel := context.WithTimeout(context.Background(), 2*hangGuard)
	defer cancel()

	t.Run("PublishAndClose", func(t *testing.T) {
		const prefix = "/close/"
		p, err := Join(ctx, testetcd.Client(t, cl.Endpoints()...), prefix, Replica{ID: "r1", Advertise: "127.0.0.11:8443"}, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []Session{{Agent: "a", Instance: "i/1", Protocol: "yamux"}, {Agent: "b", Protocol: "json"}} {
			if err := p.AddSession(ctx, s); err != nil {
				t.Fatal(err)
			}
		}
		v, err := Read(ctx, observer, prefix)
		if err != nil || len(v.Replicas) != 1 || v.Replicas[0].Advertise != "127.0.0.11:8443" || len(v.Sessions) != 2 {
			t.Fatalf("view: %+v, %v", v, err)
		}
		for _, s := range v.Sessions {
			if s.Replica != "r1" || (s.Agent == "a" && s.Instance != "i/1") {
				t.Fatalf("session record %+v", s)
			}
		}
		if err := p.RemoveSession(ctx, Session{Agent: "a", Instance: "i/1"}); err != nil {
			t.Fatal(err)
		}
		if v, _ := Read(ctx, observer, prefix); len(v.Sessions) != 1 || v.Sessions[0].Agent != "b" {
			t.Fatalf("after removing a's session: %+v", v.Sessions)
		}
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
		if v, _ := Read(ctx, observer, prefix); len(v.Replicas)+len(v.Sessions) != 0 {
			t.Fatalf("records left after Close: %+v", v)
		}
	})

	t.Run("LeaseLoss", func(t *testing.T) {
		const prefix = "/lost/"
		// The replica reaches etcd only through member 0; killing it
		// cuts the replica off while the other two keep quorum.
		p, err := Join(ctx, testetcd.Client(t, cl.Endpoint(0)), prefix, Replica{ID: "r2", Advertise: "127.0.0.12:8443"}, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.AddSession(ctx, Session{Agent: "a", Protocol: "yamux"}); err != nil {
			t.Fatal(err)
		}
		v, err := Read(ctx, observer, prefix)
		if err != nil || len(v.Replicas) != 1 || len(v.Sessions) != 1 {
			t.Fatalf("view: %+v, %v", v, err)
		}
		w := Watch(ctx, observer, prefix, v.Revision)
		cut := time.Now()
		cl.Kill(0)
		select {
		case <-p.Lost():
			t.Logf("the replica knew its lease was lost after %v", time.Since(cut).Round(10*time.Millisecond))
		case <-time.After(hangGuard):
			t.Fatal("the cut-off replica was not told it lost its lease")
		}
		gone := map[string]bool{}
		for len(gone) < 2 {
			select {
			case c := <-w:
				switch {
				case c.Err != nil:
					t.Fatal(c.Err)
				case !c.Deleted:
					t.Fatalf("unexpected record: %+v", c)
				case c.Replica != nil && c.Replica.ID == "r2":
					gone["replica"] = true
				case c.Session != nil && c.Session.Agent == "a":
					gone["session"] = true
				}
			case <-time.After(hangGuard):
				t.Fatalf("the others still see the cut-off replica's records (gone: %v)", gone)
			}
		}
		t.Logf("the others saw its records vanish after %v", time.Since(cut).Round(10*time.Millisecond))
		if err := p.AddSession(ctx, Session{Agent: "b"}); err == nil {
			t.Error("a replica without its lease published a session")
		}
		p.Close()
	})
}

// FuzzDecodePresence checks the presence record decoders: they never
// panic, and what they accept is stored under its own key.
func FuzzDecodePresence(f *testing.F) {
	const prefix = "/portway/"
	f.Add([]byte(prefix+"replicas/r1"), []byte(`{"id":"r1","advertise":"10.0.0.1:8443","since":"2026-11-28T09:00:00Z"}`))
	f.Add([]byte(prefix+"sessions/r1/a/-"), []byte(`{"replica":"r1","agent":"a","protocol":"yamux"}`))
	f.Add([]byte(prefix+"sessions/r1/a/i%2F1"), []byte(`{"replica":"r1","agent":"a","instance":"i/1","protocol":"json"}`))
	f.Fuzz(func(t *testing.T, key, value []byte) {
		if r, err := DecodeReplica(prefix, key, value); err == nil && replicaKey(prefix, r.ID) != string(key) {
			t.Fatalf("replica %+v accepted at key %q", r, key)
		}
		if s, err := DecodeSession(prefix, key, value); err == nil && sessionKey(prefix, s) != string(key) {
			t.Fatalf("session %+v accepted at key %q", s, key)
		}
	})
}
