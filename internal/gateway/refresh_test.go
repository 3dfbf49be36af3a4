package gateway

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/store"
	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/testwait"
)

// A live allocation is saved again now and then, stamped with the time of
// the save: after a crash, the state file does not make a port that was in
// use until the crash look unused for longer than port_retention.
func TestLiveAllocationsAreStampedPeriodically(t *testing.T) {
	var clock atomic.Int64
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock.Store(start.UnixNano())
	now := func() time.Time { return time.Unix(0, clock.Load()) }

	cfg := config.DefaultGateway()
	cfg.Listen, cfg.PublicHost, cfg.BindAddress = "127.0.0.1:0", "127.0.0.1", "127.0.0.1"
	cfg.StateFile = ""
	cfg.Insecure = true
	cfg.PortRetention = config.D(time.Hour)
	cfg.Agents = []config.AgentIdentity{{Name: "agent-a", Token: testToken}}
	st := &store.Memory{Options: store.Options{Now: func() time.Time { return now().UTC() }}}
	log, _ := testlog.New(t, "gateway")
	g, err := New(Options{Config: cfg, Logger: log, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	g.ports.now = now
	g.stateRefresh = 20 * time.Millisecond
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fa, err := connectFakeAgent(ctx, g, "yamux", []protocol.Service{{ID: "pg", Protocol: protocol.KindTCP, Port: 5432}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.sess.Close()

	// Two retention periods later, with nothing changed, the saved stamp
	// has moved on with the clock.
	later := start.Add(2 * time.Hour)
	clock.Store(later.UnixNano())
	testwait.For(t, 10*time.Second, "the live allocation to be saved again", func() bool {
		allocs, _, _ := st.List(context.Background())
		return len(allocs) == 1 && !allocs[0].LastUsed.Before(later.Truncate(time.Second))
	})

}
