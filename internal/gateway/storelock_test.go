package gateway

import (
	"context"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/store"
	"github.com/portway/portway/internal/testlog"
)

// blockingStore holds its next Claim or Retain call, once armed, until
// the test lets it go: a store that does not answer (etcd without quorum).
type blockingStore struct {
	store.Store
	claim, retain blocker
}

// blocker holds one call when armed: the call hands the test its release
// channel and waits on it.
type blocker struct {
	armed   atomic.Bool
	entered chan chan struct{}
}

func (b *blocker) hold() {
	if b.armed.CompareAndSwap(true, false) {
		release := make(chan struct{})
		b.entered <- release
		<-release
	}
}

func (b *blockingStore) Claim(ctx context.Context, a store.Allocation) (store.Allocation, error) {
	b.claim.hold()
	return b.Store.Claim(ctx, a)
}

func (b *blockingStore) Retain(ctx context.Context, a store.Allocation) (store.Allocation, error) {
	b.retain.hold()
	return b.Store.Retain(ctx, a)
}

// While a registration waits on the allocation store, and while a
// disconnect's withdrawal does, the gateway holds none of the locks its
// liveness check takes: a slow store never wedges the gateway.
func TestStoreCallsHoldNoGatewayLock(t *testing.T) {
	cfg := config.DefaultGateway()
	cfg.Listen, cfg.PublicHost, cfg.BindAddress, cfg.StateFile, cfg.Insecure = "127.0.0.1:0", "127.0.0.1", "127.0.0.1", "", true
	cfg.Agents = []config.AgentIdentity{{Name: "agent-a", Token: testToken}}
	cfg.Admin = config.Admin{Listen: "127.0.0.1:0", Token: "admin-token-0123456789"}
	st := &blockingStore{Store: &store.Memory{}}
	st.claim.entered = make(chan chan struct{}, 1)
	st.retain.entered = make(chan chan struct{}, 1)
	log, _ := testlog.New(t, "gateway")
	g, err := New(Options{Config: cfg, Logger: log, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	healthz := func(when string) {
		t.Helper()
		c := http.Client{Timeout: 20 * time.Second}
		resp, err := c.Get("http://" + g.AdminAddr().String() + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("/healthz %s: %d %s", when, resp.StatusCode, b)
		}
	}
	// wait returns the held call's release channel.
	wait := func(b *blocker, what string) chan struct{} {
		t.Helper()
		select {
		case r := <-b.entered:
			return r
		case <-time.After(20 * time.Second):
			t.Fatalf("no %s call reached the store", what)
		}
		return nil
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	type result struct {
		fa  *fakeAgent
		err error
	}
	done := make(chan result, 1)
	st.claim.armed.Store(true)
	go func() {
		fa, err := connectFakeAgent(ctx, g, "yamux", []protocol.Service{tcpSpec("pg", 5432)}, nil)
		done <- result{fa, err}
	}()
	release := wait(&st.claim, "claim")
	healthz("while a claim waits on the store")
	close(release)
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if e := r.fa.ack.Endpoints[0]; e.Error != "" || e.PublicPort == 0 {
		t.Fatalf("pg: %+v", e)
	}

	st.retain.armed.Store(true)
	r.fa.sess.Close()
	release = wait(&st.retain, "retain")
	healthz("while a withdrawal waits on the store")
	close(release)
}
