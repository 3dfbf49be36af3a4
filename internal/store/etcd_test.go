//go:build linux

package store

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/portway/portway/internal/testetcd"
)

// TestEtcd runs the conformance suite and the multi-replica checks on one
// 3-member cluster, each subtest under a prefix of its own.
func TestEtcd(t *testing.T) {
	cl := testetcd.Start(t)
	client := testetcd.Client(t, cl.Endpoints()...)
	n := 0
	prefix := func() string { n++; return fmt.Sprintf("/test-%d/", n) }
	t.Run("Conformance", func(t *testing.T) {
		runConformance(t, func(t *testing.T, opt Options) Store { return NewEtcd(client, prefix(), opt) })
	})
	t.Run("Contention", func(t *testing.T) { testContention(t, cl, prefix()) })
	t.Run("RetentionExpiryByAnotherReplica", func(t *testing.T) {
		p := prefix()
		c := newClock()
		a := NewEtcd(testetcd.Client(t, cl.Endpoint(0)), p, Options{Retention: time.Hour, Now: c.now})
		b := NewEtcd(testetcd.Client(t, cl.Endpoint(1)), p, Options{Retention: time.Hour, Now: c.now})
		ctx, cancel := context.WithTimeout(context.Background(), conformanceTimeout)
		defer cancel()
		if _, err := a.Claim(ctx, alloc("agent-a", "pg", 10000)); err != nil {
			t.Fatal(err)
		}
		if _, err := a.Retain(ctx, alloc("agent-a", "pg", 10000)); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Claim(ctx, alloc("agent-b", "redis", 10000)); !errors.Is(err, ErrTaken) {
			t.Fatalf("replica b took a retained port: %v", err)
		}
		c.add(time.Hour + time.Second)
		got, err := b.Claim(ctx, alloc("agent-b", "redis", 10000))
		if err != nil || got.Agent != "agent-b" {
			t.Fatalf("replica b's claim of an expired port: %+v, %v", got, err)
		}
		if _, err := a.Retain(ctx, alloc("agent-a", "pg", 10000)); !errors.Is(err, ErrNotHeld) {
			t.Fatalf("replica a still holds the expired port: %v", err)
		}
	})
	t.Run("UndecodableValueIsFree", func(t *testing.T) {
		p := prefix()
		ctx, cancel := context.WithTimeout(context.Background(), conformanceTimeout)
		defer cancel()
		if _, err := client.Put(ctx, p+"ports/tcp/10001", "{not json"); err != nil {
			t.Fatal(err)
		}
		st := NewEtcd(client, p, Options{})
		if all, _, err := st.List(ctx); err != nil || len(all) != 0 {
			t.Fatalf("list with a corrupt value: %+v, %v", all, err)
		}
		if _, err := st.Claim(ctx, alloc("a", "s", 10001)); err != nil {
			t.Fatalf("claim over a corrupt value: %v", err)
		}
	})
}

// testContention has three store clients, one per etcd member, standing
// for three replicas, claim ports for 20 agents × 3 services at once, all
// preferring the same ports, while a fourth client claims too and is cut
// off mid-claim. No port may be won twice, and every acknowledged claim,
// the cut-off client's too, must be in etcd afterwards.
func testContention(t *testing.T, cl *testetcd.Cluster, prefix string) {
	const agents, services, low, high = 20, 3, 20000, 20099
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var mu sync.Mutex
	var won []Allocation
	record := func(a Allocation) {
		mu.Lock()
		won = append(won, a)
		mu.Unlock()
	}
	// claimFirst claims the first port it can win for (agent, svc), as the
	// gateway does.
	claimFirst := func(ctx context.Context, st Store, agent, svc string) (Allocation, error) {
		for port := low; port <= high; port++ {
			got, err := st.Claim(ctx, alloc(agent, svc, port))
			if errors.Is(err, ErrTaken) {
				continue
			}
			return got, err
		}
		return Allocation{}, errors.New("range full")
	}
	var replicas []Store
	for i := range 3 {
		replicas = append(replicas, NewEtcd(testetcd.Client(t, cl.Endpoint(i)), prefix, Options{Retention: time.Hour}))
	}
	var wg sync.WaitGroup
	errs := make(chan error, agents*services+1)
	for ag := range agents {
		for s := range services {
			st := replicas[(ag+s)%3]
			wg.Go(func() {
				got, err := claimFirst(ctx, st, fmt.Sprintf("agent-%02d", ag), fmt.Sprintf("svc-%d", s))
				if err != nil {
					errs <- err
					return
				}
				record(got)
			})
		}
	}
	// The victim: its claims are acknowledged until its client closes.
	victimClient, err := clientv3.New(clientv3.Config{Endpoints: []string{cl.Endpoint(2)}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	victim := NewEtcd(victimClient, prefix, Options{Retention: time.Hour})
	vctx, vcancel := context.WithCancel(ctx)
	var acked []Allocation
	vdone := make(chan struct{})
	someAcked := make(chan struct{})
	go func() {
		defer close(vdone)
		for i := 0; ; i++ {
			got, err := claimFirst(vctx, victim, "victim", fmt.Sprintf("svc-%d", i))
			if err != nil {
				return
			}
			acked = append(acked, got)
			if len(acked) == 3 {
				close(someAcked)
			}
		}
	}()
	// Cut it off once it has some acknowledged claims, at a random
	// point of the ones in flight.
	select {
	case <-someAcked:
	case <-vdone:
		t.Fatal("the cut-off client failed before it was cut off")
	case <-ctx.Done():
		t.Fatal("the cut-off client got no claim acknowledged")
	}
	time.Sleep(time.Duration(rand.IntN(5000)) * time.Microsecond)
	vcancel()
	victimClient.Close()
	<-vdone
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("claim: %v", err)
	}
	for _, a := range acked {
		record(a)
	}

	// No port twice among the acknowledgements, and every (agent,
	// service) once.
	byPort := map[Key]Allocation{}
	owners := map[string]bool{}
	for _, a := range won {
		if prev, dup := byPort[a.Key()]; dup {
			t.Errorf("port %d acknowledged to %s/%s and to %s/%s", a.Port, prev.Agent, prev.Service, a.Agent, a.Service)
		}
		byPort[a.Key()] = a
		o := a.Agent + "/" + a.Service
		if owners[o] {
			t.Errorf("%s acknowledged twice", o)
		}
		owners[o] = true
	}
	if n := len(won) - len(acked); n != agents*services {
		t.Errorf("%d claims acknowledged to the replicas, want %d", n, agents*services)
	}
	// etcd holds every acknowledged claim as acknowledged.
	all, _, err := NewEtcd(testetcd.Client(t, cl.Endpoint(0)), prefix, Options{}).List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stored := map[Key]Allocation{}
	for _, a := range all {
		stored[a.Key()] = a
	}
	for k, a := range byPort {
		s, ok := stored[k]
		if !ok || !s.sameOwner(a) {
			t.Errorf("acknowledged %s/%s on port %d; etcd holds %+v", a.Agent, a.Service, k.Port, s)
		}
	}
	// A claim the victim's cut-off interrupted may have landed without
	// its acknowledgement: that is the only allowed extra, and only the
	// victim's.
	for k, s := range stored {
		if _, ok := byPort[k]; !ok && !strings.HasPrefix(s.Agent, "victim") {
			t.Errorf("etcd holds unacknowledged %+v", s)
		}
	}
	t.Logf("%d claims acknowledged (%d to the cut-off client), %d allocations in etcd", len(won), len(acked), len(all))
}

// With two of three members gone the store refuses claims, with
// ErrUnavailable once the caller's timeout passes rather than hanging,
// and works again when the members return.
func TestEtcdQuorumLoss(t *testing.T) {
	cl := testetcd.Start(t)
	st := NewEtcd(testetcd.Client(t, cl.Endpoints()...), "/quorum/", Options{Retention: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := st.Claim(ctx, alloc("a", "s", 10000)); err != nil {
		t.Fatal(err)
	}
	cl.Kill(1)
	cl.Kill(2)
	cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
	_, err := st.Claim(cctx, alloc("a", "t", 10001))
	ccancel()
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("claim without quorum: %v, want ErrUnavailable", err)
	}
	t.Logf("claim without quorum: %v", err)
	cl.Restart(1)
	cl.Restart(2)
	for i := range 3 {
		cl.WaitHealthy(i)
	}
	var got Allocation
	for attempt := 0; ; attempt++ {
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
		got, err = st.Claim(cctx, alloc("a", "t", 10001))
		ccancel()
		if err == nil || attempt == 10 {
			break
		}
	}
	if err != nil || got.Port != 10001 {
		t.Fatalf("claim after quorum returned: %+v, %v", got, err)
	}
	all, _, err := st.List(ctx)
	if err != nil || len(all) != 2 {
		t.Fatalf("after recovery: %+v, %v", all, err)
	}
}

// FuzzDecodeEtcd checks the decoder of etcd keys and values: it never
// panics, accepts only valid allocations stored under their own port's
// key, and what it accepts encodes to a value it accepts the same.
func FuzzDecodeEtcd(f *testing.F) {
	const prefix = "/portway/ports/"
	f.Add([]byte(prefix+"tcp/10000"), []byte(`{"agent":"a","service":"s","protocol":"tcp","port":10000,"live":true}`))
	f.Add([]byte(prefix+"udp/00053"), []byte(`{"agent":"a","service":"dns","protocol":"udp","port":53,"last_used":"2026-11-28T09:00:00Z"}`))
	f.Add([]byte(prefix+"tcp/+1000"), []byte(`{"agent":"a","service":"s","protocol":"tcp","port":1000}`))
	f.Fuzz(func(t *testing.T, key, value []byte) {
		a, err := decodeEtcd(prefix, key, value, 7)
		if err != nil {
			return
		}
		if a.valid() != nil || a.Revision != 7 {
			t.Fatalf("accepted %+v", a)
		}
		if want := fmt.Sprintf("%s%s/%05d", prefix, a.Protocol, a.Port); string(key) != want {
			t.Fatalf("accepted key %q for %s port %d (canonical %q)", key, a.Protocol, a.Port, want)
		}
		again, err := decodeEtcd(prefix, key, []byte(encode(a)), 7)
		if err != nil || !again.sameOwner(a) || again.Port != a.Port || again.Live != a.Live || !again.LastUsed.Equal(a.LastUsed) {
			t.Fatalf("%+v re-encoded reads back as %+v, %v", a, again, err)
		}
	})
}
