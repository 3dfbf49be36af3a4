package gateway

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testwait"
	"github.com/portway/portway/internal/tunnel"
)

// A flood toward an agent that does not keep up (here: answers no open
// at all) is held to the queue budget: the heap grows by the budget plus a
// small constant, the rest is dropped and counted, and the budget is all
// given back when the sessions end.
func TestUDPFloodHeldToBudget(t *testing.T) {
	const budget = 2 << 20
	g := startTestGateway(t, func(c *config.GatewayFile) {
		c.UDPQueueBytesPerService = budget
		c.HeartbeatInterval = config.D(5 * time.Second)
	})
	defer g.Close()
	release := make(chan struct{})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	defer unblock()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	fa, err := connectFakeAgent(ctx, g, "yamux", []protocol.Service{udpSpec("dns")}, func(in *tunnel.Incoming) {
		<-release
		in.Reject(protocol.StatusRefused)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer fa.sess.Close()
	addr := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(fa.ack.Endpoints[0].Address))

	runtime.GC()
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	// 128 clients × 300 datagrams of 1025 bytes: unbounded, the queues
	// would hold 128 × 256 of them (40 MB at 1280 bytes each, 67 MB at the
	// general pool's 4 KiB).
	const clients, perClient, size = 128, 300, 1025
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialUDP("udp", nil, addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			msg := make([]byte, size)
			for j := 0; j < perClient; j++ {
				c.Write(msg)
				time.Sleep(time.Millisecond) // let the read loop keep up
			}
		}()
	}
	wg.Wait()
	overBudget := g.metrics.UDPDropped.WithLabelValues("agent-a", "dns", "over_budget")
	// The read loop drains what the kernel still holds.
	last := -1.0
	testwait.For(t, 10*time.Second, "the read loop to drain", func() bool {
		n := counterValue(overBudget) + float64(g.udp.queued.Load())
		done := n == last && n > 0
		last = n
		if !done {
			time.Sleep(100 * time.Millisecond)
		}
		return done
	})
	// Two collections: the first moves sync.Pool's buffers to its victim
	// cache, the second frees them. Pooled buffers are reclaimable, not
	// held; under load many are in flight at once and would count.
	runtime.GC()
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapInuse) - int64(before.HeapInuse)
	queued := g.udp.queued.Load()
	t.Logf("heap in use grew %.1f MiB; %d bytes queued; %.0f datagrams dropped over budget, %.0f as their queue was full",
		float64(grew)/(1<<20), queued, counterValue(overBudget),
		counterValue(g.metrics.UDPDropped.WithLabelValues("agent-a", "dns", "queue_full")))
	if queued > budget {
		t.Errorf("%d bytes queued, over the %d budget", queued, budget)
	}
	// Wide margin: sessions, goroutines and the test's own sockets.
	if limit := int64(budget + 8<<20); grew > limit {
		t.Errorf("heap grew by %d bytes, more than the budget plus 8 MiB (%d)", grew, limit)
	}
	unblock()
	testwait.For(t, 20*time.Second, "the budget to be given back", func() bool {
		return g.udp.queued.Load() == 0
	})
}

// A map full of expired refusals is swept, so that a newly refused client
// is still held.
func TestRefusedHoldsSweptWhenFull(t *testing.T) {
	u := newUDPSessions()
	now := time.Unix(1000, 0)
	for i := 0; i < maxRefused; i++ {
		u.refused[netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 53)] = now.Add(-time.Second)
	}
	client := netip.MustParseAddrPort("192.0.2.1:4000")
	u.hold(client, now)
	if until, ok := u.refused[client]; !ok || !until.After(now) {
		t.Fatal("a client refused after 65,536 stale holds is not held")
	}
	if len(u.refused) != 1 {
		t.Fatalf("%d holds left after the sweep, want 1", len(u.refused))
	}
	// Full of live holds: the client goes unheld, the map stays bounded.
	for i := 0; len(u.refused) < maxRefused; i++ {
		u.refused[netip.AddrPortFrom(netip.AddrFrom4([4]byte{11, byte(i >> 16), byte(i >> 8), byte(i)}), 53)] = now.Add(time.Second)
	}
	u.hold(netip.MustParseAddrPort("192.0.2.2:4000"), now.Add(time.Second))
	if len(u.refused) > maxRefused {
		t.Fatalf("%d holds, over %d", len(u.refused), maxRefused)
	}
}

// A public_port change that cannot be made (the port is held by another
// process) leaves the service listening on its old port with its old
// allocation; one that can be made moves it and frees the old port.
func TestFailedPublicPortChangeKeepsOldPort(t *testing.T) {
	g := startTestGateway(t)
	defer g.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	web := protocol.Service{ID: "web", Protocol: protocol.KindTCP, Port: 80}
	fa, err := connectFakeAgent(ctx, g, "json", []protocol.Service{web}, holdStreams)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.sess.Close()
	oldAddr := fa.ack.Endpoints[0].Address
	oldPort := fa.ack.Endpoints[0].PublicPort
	if oldAddr == "" {
		t.Fatalf("not exposed: %s", fa.ack.Endpoints[0].Error)
	}
	// A port in the range, held by another process.
	var foreign net.Listener
	for p := 15000; p < 15100 && foreign == nil; p++ {
		foreign, _ = net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
	}
	if foreign == nil {
		t.Fatal("no free port to occupy")
	}
	busy := foreign.Addr().(*net.TCPAddr).Port
	moved := web
	moved.PublicPort = busy
	ack := register(t, fa, 2, moved)
	if e := ack.Endpoints[0]; e.Error != "" || e.Address != oldAddr {
		t.Errorf("failed change answered %+v, want the old endpoint %s", e, oldAddr)
	}
	c, err := net.DialTimeout("tcp", oldAddr, 5*time.Second)
	if err != nil {
		t.Fatalf("old port closed after a failed change: %v", err)
	}
	c.Close()
	key := allocKey{"agent-a", web.Key()}
	g.ports.mu.Lock()
	a := g.ports.byKey[key]
	g.ports.mu.Unlock()
	if a == nil || a.port != oldPort || !a.live {
		t.Fatalf("allocation after the failed change: %+v, want port %d live", a, oldPort)
	}
	// Now the port is free: the change goes through, the old port is
	// released.
	foreign.Close()
	ack = register(t, fa, 3, moved)
	if e := ack.Endpoints[0]; e.Error != "" || e.PublicPort != busy {
		t.Fatalf("change to a free port answered %+v", e)
	}
	g.ports.mu.Lock()
	left := g.ports.byPort[portKey{protocol.KindTCP, oldPort}]
	g.ports.mu.Unlock()
	if left != nil {
		t.Fatalf("old port %d still allocated to %v after the move", oldPort, left.key)
	}
	if c, err := net.DialTimeout("tcp", oldAddr, time.Second); err == nil {
		c.Close()
		t.Fatal("old port still listening after the move")
	}
}

// register sends a register message on the fake agent's session and
// waits for its acknowledgement.
func register(t *testing.T, fa *fakeAgent, seq uint64, services ...protocol.Service) *protocol.RegisterAck {
	t.Helper()
	if err := fa.sess.Send(&protocol.Register{Seq: seq, Services: services}); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(20 * time.Second)
	for {
		select {
		case m := <-fa.sess.Control():
			if ack, ok := m.(*protocol.RegisterAck); ok && ack.Seq == seq {
				return ack
			}
		case <-fa.sess.Done():
			t.Fatalf("session ended: %v", fa.sess.Err())
		case <-timeout:
			t.Fatal("no register ack within 20s")
		}
	}
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	c.Write(&m)
	return m.GetCounter().GetValue()
}
