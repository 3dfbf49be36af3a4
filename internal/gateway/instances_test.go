package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testwait"
	"github.com/portway/portway/internal/tunnel"
)

// fakeInstance is one agent process of agent-a, driven by the test: it
// counts the TCP streams it accepted and holds them open until closed.
type fakeInstance struct {
	id       string
	sess     *tunnel.Session
	accepted atomic.Int64
	mu       sync.Mutex
	streams  []io.Closer
}

// connectInstance opens a tunnel as instance id of agent-a and registers
// services, returning the register_ack.
func connectInstance(t *testing.T, g *Gateway, id string, services ...protocol.Service) (*fakeInstance, *protocol.RegisterAck) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ws, err := tunnel.Dial(ctx, "ws://"+g.TunnelAddr().String()+tunnel.Path, tunnel.DialOptions{Token: testToken})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := tunnel.Client(ctx, ws, tunnel.Config{Protocol: "yamux", Instance: id})
	if err != nil {
		t.Fatal(err)
	}
	fi := &fakeInstance{id: id, sess: sess}
	t.Cleanup(fi.close)
	go func() {
		for {
			in, err := sess.Accept(context.Background())
			if err != nil {
				return
			}
			st, err := in.Accept()
			if err != nil {
				continue
			}
			fi.accepted.Add(1)
			fi.mu.Lock()
			fi.streams = append(fi.streams, st)
			fi.mu.Unlock()
		}
	}()
	return fi, fi.register(t, 1, services...)
}

func (fi *fakeInstance) register(t *testing.T, seq uint64, services ...protocol.Service) *protocol.RegisterAck {
	t.Helper()
	return register(t, &fakeAgent{sess: fi.sess}, seq, services...)
}

// close ends the instance's session and the streams it holds.
func (fi *fakeInstance) close() {
	fi.sess.Close()
	fi.mu.Lock()
	defer fi.mu.Unlock()
	for _, st := range fi.streams {
		st.Close()
	}
	fi.streams = nil
}

func (fi *fakeInstance) alive() bool {
	select {
	case <-fi.sess.Done():
		return false
	default:
		return true
	}
}

// instancesGauge reads portway_gateway_agent_instances of agent-a.
func instancesGauge(t *testing.T, g *Gateway) float64 {
	t.Helper()
	return testmetrics.Value(t, g.gatherer, "portway_gateway_agent_instances", map[string]string{"agent": "agent-a"})
}

func tcpSpec(id string, port int) protocol.Service {
	return protocol.Service{ID: id, Protocol: protocol.KindTCP, Port: port}
}

// dialHeld opens n client connections to addr, writes a byte on each so
// that the stream is open at the agent, and closes them at cleanup.
func dialHeld(t *testing.T, addr string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.Write([]byte("x"))
	}
}

func endpointOK(t *testing.T, ack *protocol.RegisterAck) string {
	t.Helper()
	for _, e := range ack.Endpoints {
		if e.Error != "" {
			t.Fatalf("%s/%s not exposed: %s", e.Protocol, e.ID, e.Error)
		}
	}
	return ack.Endpoints[0].Address
}

// Two processes with one token are two instances: both stay connected,
// share the service's port, and new connections are spread over them by
// fewest open connections. One leaving stops its share at once while the
// service stays up; the last leaving withdraws it, keeping the port.
func TestInstancesShareAServiceAndLeaveCleanly(t *testing.T) {
	g := startTestGateway(t)
	defer g.Close()
	db := tcpSpec("db", 5432)
	i1, ack1 := connectInstance(t, g, "one", db)
	addr := endpointOK(t, ack1)
	i2, ack2 := connectInstance(t, g, "two", db)
	if got := endpointOK(t, ack2); got != addr {
		t.Fatalf("second instance got %s, want the shared %s", got, addr)
	}
	// A while for a replacement to show: the older instance stays.
	time.Sleep(300 * time.Millisecond)
	if !i1.alive() || !i2.alive() {
		t.Fatalf("an instance's session ended (one alive: %v, two alive: %v): instances replace each other", i1.alive(), i2.alive())
	}
	if n := instancesGauge(t, g); n != 2 {
		t.Fatalf("portway_gateway_agent_instances = %v, want 2", n)
	}
	agents := g.Agents()
	if len(agents) != 1 || len(agents[0].Instances) != 2 || agents[0].Instances[0].ID != "one" || agents[0].Instances[1].ID != "two" {
		t.Fatalf("admin API lists %+v, want instances one and two", agents)
	}

	const conns = 10
	for i := 0; i < conns; i++ {
		// One at a time, so each choice sees the connections before it.
		dialHeld(t, addr, 1)
		testwait.For(t, 10*time.Second, "the connection accepted", func() bool {
			return i1.accepted.Load()+i2.accepted.Load() == int64(i+1)
		})
	}
	if a, b := i1.accepted.Load(), i2.accepted.Load(); a != conns/2 || b != conns/2 {
		t.Fatalf("held connections spread %d/%d, want %d each (fewest open first)", a, b, conns/2)
	}

	// One leaves: its share ends, the service stays, new work goes to
	// the other.
	i1.close()
	testwait.For(t, 10*time.Second, "instance one gone", func() bool {
		return instancesGauge(t, g) == 1
	})
	dialHeld(t, addr, 4)
	testwait.For(t, 10*time.Second, "new connections at instance two", func() bool { return i2.accepted.Load() == conns/2+4 })
	if i1.accepted.Load() != conns/2 {
		t.Fatalf("instance one accepted %d connections after leaving", i1.accepted.Load()-conns/2)
	}
	if live, retained := held(g.ports, "agent-a"); live != 1 || retained != 0 {
		t.Fatalf("with one instance left: %d live and %d retained allocations, want the service live", live, retained)
	}

	// The last leaves: withdrawn, port retained; a new instance gets it.
	i2.close()
	testwait.For(t, 10*time.Second, "service withdrawn", func() bool {
		live, retained := held(g.ports, "agent-a")
		return live == 0 && retained == 1
	})
	_, ack3 := connectInstance(t, g, "three", db)
	if got := endpointOK(t, ack3); got != addr {
		t.Fatalf("after every instance left, a new one got %s, want the retained %s", got, addr)
	}
}

// A reconnect of the same instance still replaces its older session, and
// the services it carried move to the new session without a withdrawal.
func TestSameInstanceReconnectReplaces(t *testing.T) {
	g := startTestGateway(t)
	defer g.Close()
	db := tcpSpec("db", 5432)
	old, ack := connectInstance(t, g, "pod-a", db)
	addr := endpointOK(t, ack)
	next, ack2 := connectInstance(t, g, "pod-a", db)
	if got := endpointOK(t, ack2); got != addr {
		t.Fatalf("reconnect got %s, want %s", got, addr)
	}
	select {
	case <-old.sess.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the older session of the same instance was not closed")
	}
	if n := instancesGauge(t, g); n != 1 {
		t.Fatalf("portway_gateway_agent_instances = %v, want 1", n)
	}
	dialHeld(t, addr, 1)
	testwait.For(t, 10*time.Second, "connection at the new session", func() bool { return next.accepted.Load() == 1 })
}

// Instances registering different sets: each service goes only to the
// instances that registered it. A conflicting definition is refused for
// the newer instance, logged once with both remote addresses, and does
// not disturb the older one.
func TestInstancesDifferentSetsAndConflicts(t *testing.T) {
	cfg := config.DefaultGateway()
	cfg.Listen, cfg.PublicHost, cfg.BindAddress = "127.0.0.1:0", "127.0.0.1", "127.0.0.1"
	cfg.StateFile, cfg.Insecure = "", true
	cfg.HeartbeatInterval = config.D(time.Second)
	cfg.Agents = []config.AgentIdentity{{Name: "agent-a", Token: testToken}}
	log, logs := testlog.New(t, "gateway")
	g, err := New(Options{Config: cfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer g.Close()

	web, cache := tcpSpec("web", 80), tcpSpec("cache", 6379)
	i1, ack1 := connectInstance(t, g, "one", web)
	webAddr := endpointOK(t, ack1)
	i2, ack2 := connectInstance(t, g, "two", cache)
	cacheAddr := endpointOK(t, ack2)
	dialHeld(t, webAddr, 3)
	dialHeld(t, cacheAddr, 2)
	testwait.For(t, 10*time.Second, "connections accepted", func() bool { return i1.accepted.Load()+i2.accepted.Load() == 5 })
	if i1.accepted.Load() != 3 || i2.accepted.Load() != 2 {
		t.Fatalf("web went to one %d times and cache to two %d times, want 3 and 2: a service reached an instance that did not register it",
			i1.accepted.Load(), i2.accepted.Load())
	}

	// Instance two now also registers web, on another port: refused.
	bad := tcpSpec("web", 8080)
	for seq := uint64(2); seq <= 3; seq++ {
		ack := i2.register(t, seq, cache, bad)
		if e := ack.Endpoints[1]; !strings.Contains(e.Error, "conflicting definition") || !strings.Contains(e.Error, "port 8080") {
			t.Fatalf("conflicting web answered %+v, want a conflict error naming the port", e)
		}
		if e := ack.Endpoints[0]; e.Error != "" || e.Address != cacheAddr {
			t.Fatalf("cache answered %+v alongside the conflict", e)
		}
	}
	if n := logs.CountLines("level=ERROR", "conflicting service definitions", "refused_remote=127.0.0.1:", "serving_remote=127.0.0.1:"); n != 1 {
		t.Fatalf("conflict logged %d times with both remote addresses, want once:\n%s", n, logs.String())
	}
	dialHeld(t, webAddr, 2)
	testwait.For(t, 10*time.Second, "web connections", func() bool { return i1.accepted.Load() == 5 })
	if i2.accepted.Load() != 2 {
		t.Fatalf("instance two got web connections after its conflicting definition was refused")
	}
	if !i1.alive() || !i2.alive() {
		t.Fatal("a conflict ended a session")
	}
	// A different PROXY protocol mode or source policy is a conflict too:
	// one public port has one of each.
	pp := tcpSpec("web", 80)
	pp.ProxyProtocol = "v2"
	narrow := tcpSpec("web", 80)
	narrow.AllowCIDRs = []string{"127.0.0.7/32"}
	for _, c := range []struct {
		svc  protocol.Service
		want string
	}{{pp, "proxy_protocol"}, {narrow, "allow_cidrs"}} {
		ack := i2.register(t, 4, cache, c.svc)
		if e := ack.Endpoints[1]; !strings.Contains(e.Error, "conflicting definition") || !strings.Contains(e.Error, c.want) {
			t.Fatalf("web with a different %s answered %+v, want a conflict error naming it", c.want, e)
		}
	}
	// The same definition is shared.
	ack := i2.register(t, 5, cache, web)
	if e := ack.Endpoints[1]; e.Error != "" || e.Address != webAddr {
		t.Fatalf("agreeing web answered %+v, want %s", e, webAddr)
	}
}

// Instances of one identity connect, register, and are killed in a loop
// while clients keep connecting: the gateway stays consistent (every
// registration answered, the service's port open and an instance found
// for every client while any instance is up, no instance counted after it
// left). A client may still be reset when it was sent to an instance in
// the moment it was leaving: a connection inside a leaving instance ends
// with it.
func TestInstanceChurnWhileClientsConnect(t *testing.T) {
	g := startTestGateway(t)
	defer g.Close()
	db := tcpSpec("db", 5432)
	anchor, ack := connectInstance(t, g, "anchor", db)
	addr := endpointOK(t, ack)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var dialed, failed, reset atomic.Int64
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err != nil {
					if errors.Is(err, syscall.ECONNRESET) {
						reset.Add(1) // sent to a leaving instance
					} else if failed.Add(1) == 1 {
						t.Logf("dial: %v", err)
					}
					continue
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				c.Write([]byte("x"))
				c.Close()
				dialed.Add(1)
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	for i := 0; i < 12; i++ {
		id := fmt.Sprintf("churn-%d", i%3)
		fi, ack := connectInstance(t, g, id, db)
		if got := endpointOK(t, ack); got != addr {
			t.Fatalf("churning instance %s got %s, want %s", id, got, addr)
		}
		time.Sleep(20 * time.Millisecond)
		if i%2 == 0 {
			fi.close()
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("%d clients connected, %d reset by a leaving instance", dialed.Load(), reset.Load())
	if failed.Load() != 0 {
		t.Fatalf("%d client dials failed while an instance held the service throughout", failed.Load())
	}
	if n := testmetrics.Value(t, g.gatherer, "portway_gateway_refusals_total", map[string]string{"reason": "agent_offline"}); n != 0 {
		t.Fatalf("%v clients refused as if no instance were up", n)
	}
	if dialed.Load() == 0 {
		t.Fatal("no client connected during the churn")
	}
	// Left: anchor and whichever churn ids were not closed last.
	testwait.For(t, 10*time.Second, "instances settle", func() bool {
		return len(g.Agents()[0].Instances) == int(instancesGauge(t, g))
	})
	if !anchor.alive() {
		t.Fatal("the anchor instance was replaced by other instances")
	}
}

// max_services counts the identity's services across its instances: an
// instance cannot add services beyond it because another holds some, a
// service shared with another instance costs nothing more, and one
// instance swapping a service for another at the quota is not refused.
func TestInstancesShareTheServiceQuota(t *testing.T) {
	g := startTestGateway(t, func(c *config.GatewayFile) { c.MaxServices = 2 })
	defer g.Close()
	a, b, c := tcpSpec("a", 1001), tcpSpec("b", 1002), tcpSpec("c", 1003)
	i1, ack := connectInstance(t, g, "one", a, b)
	endpointOK(t, ack)
	_, ack2 := connectInstance(t, g, "two", c, a)
	if e := ack2.Endpoints[0]; !strings.Contains(e.Error, "quota of 2") {
		t.Fatalf("a third service through another instance answered %+v, want the quota error", e)
	}
	if e := ack2.Endpoints[1]; e.Error != "" {
		t.Fatalf("a shared service answered %+v, want its endpoint", e)
	}
	// One instance alone at the quota swaps b for c.
	ack3 := i1.register(t, 2, a, c)
	if e := ack3.Endpoints[1]; e.Error != "" {
		t.Fatalf("swapping b for c at the quota answered %+v", e)
	}
}

// New UDP sessions are spread like TCP connections, by fewest open
// connections and UDP sessions on the instance: an instance busy with TCP
// connections of another service gets fewer new UDP sessions.
func TestInstancesShareUDPSessions(t *testing.T) {
	g := startTestGateway(t)
	defer g.Close()
	dns, web := udpSpec("dns"), tcpSpec("web", 80)
	i1, ack := connectInstance(t, g, "one", dns, web)
	addr := endpointOK(t, ack)
	i2, ack2 := connectInstance(t, g, "two", dns)
	if got := endpointOK(t, ack2); got != addr {
		t.Fatalf("second instance got %s, want the shared %s", got, addr)
	}
	// Four open connections of web, which only instance one carries.
	dialHeld(t, ack.Endpoints[1].Address, 4)
	testwait.For(t, 10*time.Second, "web connections", func() bool { return i1.accepted.Load() == 4 })
	const clients = 8
	for i := 0; i < clients; i++ {
		c, err := net.Dial("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("q"))
		// One at a time, so each choice sees the sessions before it.
		testwait.For(t, 10*time.Second, "the session to open", func() bool {
			return i1.accepted.Load()+i2.accepted.Load() == int64(4+i+1)
		})
	}
	// Instance two takes the first four, then they alternate.
	if a, b := i1.accepted.Load()-4, i2.accepted.Load(); a != 2 || b != 6 {
		t.Fatalf("UDP sessions went %d to the busy instance and %d to the idle one, want 2 and 6", a, b)
	}
}

// An instance refused a service for a conflicting definition gets it when
// the instances serving the older definition have all left: the gateway
// runs its last registration again and sends the answer, with the same
// seq, without waiting for the agent to register anew.
func TestRefusedServiceTakenOverWhenOthersLeave(t *testing.T) {
	g := startTestGateway(t)
	defer g.Close()
	web, cache := tcpSpec("web", 80), tcpSpec("cache", 6379)
	i1, ack1 := connectInstance(t, g, "old", web)
	webAddr := endpointOK(t, ack1)
	i2, ack2 := connectInstance(t, g, "new", cache, tcpSpec("web", 8080))
	if !strings.Contains(ack2.Endpoints[1].Error, "conflicting definition") {
		t.Fatalf("web from the newer instance answered %+v, want a conflict", ack2.Endpoints[1])
	}
	i1.close()
	var ack *protocol.RegisterAck
	select {
	case m := <-i2.sess.Control():
		ack, _ = m.(*protocol.RegisterAck)
	case <-time.After(10 * time.Second):
		t.Fatal("no new register_ack after the older instance left")
	}
	if ack == nil || ack.Seq != 1 || len(ack.Endpoints) != 2 || ack.Endpoints[1].Error != "" || ack.Endpoints[1].Address != webAddr {
		t.Fatalf("new register_ack %+v, want seq 1 with web on its retained %s", ack, webAddr)
	}
	for _, si := range g.Services() {
		if si.ID == "web" && si.Port != 8080 {
			t.Fatalf("web is served with port %d, want the newer definition's 8080", si.Port)
		}
	}
	dialHeld(t, webAddr, 1)
	testwait.For(t, 10*time.Second, "web at the newer instance", func() bool { return i2.accepted.Load() == 1 })
}
