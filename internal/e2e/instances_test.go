package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testwait"
)

// procAgents asks a gateway process's admin API for its agents (nil on
// error).
func procAgents(pg *procGateway) []adminapi.AgentInfo {
	var agents []adminapi.AgentInfo
	if adminGet(pg.admin, adminapi.AgentsPath, &agents) != nil {
		return nil
	}
	return agents
}

// instancesOf returns how many live instances of agent-a a gateway lists
// (-1 when its admin API does not answer).
func instancesOf(pg *procGateway) int {
	agents := procAgents(pg)
	if agents == nil {
		return -1
	}
	for _, a := range agents {
		if a.Name == "agent-a" {
			return len(a.Instances)
		}
	}
	return 0
}

// startReplica starts a gateway process on host (a loopback address of its
// own, with the same public port numbers as its peers) with a state file
// of its own and agent-a's token.
func startReplica(t *testing.T, name, host string) (*procGateway, *proc) {
	pg := &procGateway{
		listen: fmt.Sprintf("%s:%d", host, freePort(t)),
		admin:  fmt.Sprintf("%s:%d", host, freePort(t)),
		state:  filepath.Join(t.TempDir(), name+".db"),
	}
	return pg, pg.startReplica(t, name, host)
}

// startReplica starts (or starts again) the gateway process pg describes,
// bound to host.
func (pg *procGateway) startReplica(t *testing.T, name, host string) *proc {
	cfg := writeConfig(t, name+".yaml", fmt.Sprintf(`
listen: %q
public_host: %s
bind_address: %s
state_file: %q
insecure: true
heartbeat_interval: 1s
handshake_timeout: 2s
agents:
  - {name: agent-a, token: %q}
admin: {listen: %q, token: %q}
`, pg.listen, host, host, pg.state, tokenA, pg.admin, adminToken))
	p := startProc(t, name, nil, "gateway", "--config", cfg, "--log-level", "debug")
	testwait.For(t, 15*time.Second, name+" to serve", func() bool {
		code, _ := httpGetQuiet("http://" + pg.admin + "/readyz")
		return code == 200
	})
	return p
}

// Two agent processes with one token stay connected side by side: neither
// replaces the other, neither withdraws the service, and clients reach the
// backend through either. Then they are killed and restarted in turn
// while clients keep connecting: the service stays published throughout,
// since one instance always holds it, and is withdrawn only when both are
// gone.
func TestTwoAgentProcessesOneToken(t *testing.T) {
	echo := echoBackend(t)
	pg := newProcGateway(t, "1s")
	gwp := pg.start(t)
	services := fmt.Sprintf("  - {name: echo, port: 7, backend: %q}\n", echo)
	agents := [2]*proc{
		startAgentProc(t, pg.url(), "yamux", "127.0.0.1:0", services, ""),
		startAgentProc(t, pg.url(), "json", "127.0.0.1:0", services, ""),
	}
	ep := waitProcEndpoint(t, pg, "echo")
	testwait.For(t, 15*time.Second, "two instances of agent-a", func() bool { return instancesOf(pg) == 2 })
	// Four heartbeats: two processes replacing each other did so about
	// every second.
	time.Sleep(4 * time.Second)
	if n := instancesOf(pg); n != 2 {
		t.Fatalf("%d instances after 4s, want 2", n)
	}
	glog := gwp.logText()
	if n := strings.Count(glog, "agent session replaced"); n != 0 {
		t.Fatalf("the gateway replaced sessions %d times", n)
	}
	if n := strings.Count(glog, "agent disconnected"); n != 0 {
		t.Fatalf("the gateway saw %d disconnects of instances that stay up", n)
	}
	for i, a := range agents {
		if strings.Contains(a.logText(), "tunnel down") {
			t.Fatalf("agent %d lost its tunnel", i)
		}
	}
	for i := 0; i < 10; i++ {
		if err := testnet.EchoRoundTrip(ep, []byte("both")); err != nil {
			t.Fatalf("round trip %d through two instances: %v", i, err)
		}
	}

	// Instance churn under clients: one of the two is always up.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ok, failed atomic.Int64
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 100000; j++ {
				select {
				case <-stop:
					return
				default:
				}
				if err := testnet.EchoRoundTrip(ep, []byte("churn")); err == nil {
					ok.Add(1)
				} else if failed.Add(1) <= 3 {
					t.Logf("round trip during the churn: %v", err)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	var published atomic.Bool
	published.Store(true)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for j := 0; j < 100000; j++ {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			if procEndpoint(pg, "echo") != ep {
				published.Store(false)
			}
		}
	}()
	for i := 0; i < 4; i++ {
		k := i % 2
		agents[k].kill()
		testwait.For(t, 15*time.Second, "the killed instance to be dropped", func() bool { return instancesOf(pg) == 1 })
		agents[k] = startAgentProc(t, pg.url(), "yamux", "127.0.0.1:0", services, "")
		testwait.For(t, 15*time.Second, "the restarted instance", func() bool { return instancesOf(pg) == 2 })
	}
	close(stop)
	wg.Wait()
	t.Logf("instance churn: %d round trips, %d failed (those inside a killed instance)", ok.Load(), failed.Load())
	if !published.Load() {
		t.Fatal("the service left the admin API while an instance held it")
	}
	if ok.Load() == 0 {
		t.Fatal("no round trip during the instance churn")
	}
	if err := testnet.EchoRoundTrip(ep, []byte("after")); err != nil {
		t.Fatalf("after the churn: %v", err)
	}

	// Both gone: withdrawn.
	agents[0].kill()
	agents[1].kill()
	testwait.For(t, 15*time.Second, "the service withdrawn", func() bool { return procEndpoint(pg, "echo") == "" })
}

// An agent with gateway.urls holds a session to each of two gateway
// processes (separate state, same token): clients through either reach
// the backend. One gateway is killed: clients of the other keep working
// throughout, and the agent redials the killed one when it is back.
func TestAgentSessionsToTwoReplicas(t *testing.T) {
	echo := echoBackend(t)
	pg1, gw1 := startReplica(t, "replica-1", "127.0.0.11")
	pg2, _ := startReplica(t, "replica-2", "127.0.0.12")
	services := fmt.Sprintf("  - {name: echo, port: 7, backend: %q}\n", echo)
	cfg := writeConfig(t, "agent.yaml", fmt.Sprintf(`
gateway:
  urls: [%q, %q]
metrics: {listen: "127.0.0.1:0"}
services:
%s`, pg1.url(), pg2.url(), services))
	ag := startProc(t, "agent", []string{"PORTWAY_GATEWAY_TOKEN=" + tokenA}, "agent", "--config", cfg, "--log-level", "debug")
	ep1, ep2 := waitProcEndpoint(t, pg1, "echo"), waitProcEndpoint(t, pg2, "echo")
	if !strings.HasPrefix(ep1, "127.0.0.11:") || !strings.HasPrefix(ep2, "127.0.0.12:") {
		t.Fatalf("endpoints %s and %s, want one on each replica", ep1, ep2)
	}
	for _, ep := range []string{ep1, ep2} {
		if err := testnet.EchoRoundTrip(ep, []byte("hello")); err != nil {
			t.Fatalf("through %s: %v", ep, err)
		}
	}

	// Clients of replica 2 while replica 1 is killed.
	stop := make(chan struct{})
	done := make(chan struct{})
	var ok, failed atomic.Int64
	go func() {
		defer close(done)
		for j := 0; j < 100000; j++ {
			select {
			case <-stop:
				return
			default:
			}
			if testnet.EchoRoundTrip(ep2, []byte("survivor")) == nil {
				ok.Add(1)
			} else {
				failed.Add(1)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	time.Sleep(300 * time.Millisecond)
	gw1.kill()
	testwait.For(t, 15*time.Second, "the agent to notice", func() bool {
		return strings.Contains(ag.logText(), "tunnel down")
	})
	time.Sleep(time.Second)
	close(stop)
	<-done
	t.Logf("through the surviving replica during the kill: %d round trips, %d failed", ok.Load(), failed.Load())
	if failed.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("clients of the surviving replica: %d ok, %d failed, want no failure", ok.Load(), failed.Load())
	}

	// Replica 1 back on the same address: the agent redials it.
	began := time.Now()
	pg1.startReplica(t, "replica-1", "127.0.0.11")
	testwait.For(t, 30*time.Second, "the agent back at replica 1", func() bool { return procEndpoint(pg1, "echo") != "" })
	t.Logf("agent registered at the restarted replica %v after its start", time.Since(began).Round(time.Millisecond))
	if err := testnet.EchoRoundTrip(procEndpoint(pg1, "echo"), []byte("back")); err != nil {
		t.Fatalf("through the restarted replica: %v", err)
	}
}

// Two URLs that reach one gateway (one of them through a proxy standing
// for a load balancer) end with one session: the agent notices from the
// gateway's hello that both reached the same replica and keeps one.
func TestTwoURLsToOneReplicaKeepOneSession(t *testing.T) {
	echo := echoBackend(t)
	pg := newProcGateway(t, "1s")
	pg.start(t)
	lb := newGateProxy(t, pg.listen)
	services := fmt.Sprintf("  - {name: echo, port: 7, backend: %q}\n", echo)
	cfg := writeConfig(t, "agent.yaml", fmt.Sprintf(`
gateway:
  urls: [%q, %q]
metrics: {listen: "127.0.0.1:0"}
services:
%s`, pg.url(), "ws://"+lb.ln.Addr().String()+"/v1/tunnel", services))
	ag := startProc(t, "agent", []string{"PORTWAY_GATEWAY_TOKEN=" + tokenA}, "agent", "--config", cfg, "--log-level", "debug")
	ep := waitProcEndpoint(t, pg, "echo")
	noticed := testwait.Until(15*time.Second, func() bool {
		return strings.Contains(ag.logText(), "already connected to")
	})
	// Over two heartbeats later, still one session.
	time.Sleep(2500 * time.Millisecond)
	if n := instancesOf(pg); n != 1 {
		t.Fatalf("the gateway holds %d sessions of the agent, want 1", n)
	}
	if !noticed {
		t.Fatal("the agent did not log the duplicate session")
	}
	if err := testnet.EchoRoundTrip(ep, []byte("one")); err != nil {
		t.Fatal(err)
	}
}

// A change of the agent's services (a reload, a discovery update) reaches
// every session: both replicas expose the new service. When one replica
// goes, the agent stays ready on the other.
func TestEveryReplicaGetsRegistrationChanges(t *testing.T) {
	echo := echoBackend(t)
	var gws [2]*gw
	for i, host := range []string{"127.0.0.11", "127.0.0.12"} {
		gws[i] = startGateway(t, func(c *config.GatewayFile) {
			c.Listen, c.BindAddress, c.PublicHost = host+":0", host, host
		})
	}
	services := []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echo}}
	a := startAgent(t, "", tokenA, "yamux", services, func(c *config.AgentFile) {
		c.Gateway.URLs = []string{gws[0].url(), gws[1].url()}
	})
	listed := func(g *gw, id string) bool {
		for _, s := range g.Services() {
			if s.ID == id {
				return true
			}
		}
		return false
	}
	for i, g := range gws {
		testwait.For(t, 15*time.Second, fmt.Sprintf("echo at replica %d", i+1), func() bool { return listed(g, "echo") })
	}
	a.SetStatic(append(services, config.StaticService{Name: "echo2", Protocol: "tcp", Port: 8, Backend: echo}))
	for i, g := range gws {
		testwait.For(t, 15*time.Second, fmt.Sprintf("echo2 at replica %d", i+1), func() bool { return listed(g, "echo2") })
	}
	if !a.Ready() {
		t.Fatal("agent not ready with two sessions up")
	}
	// One replica goes: the agent stays ready on the other, which keeps
	// serving.
	gws[0].Close()
	testwait.For(t, 10*time.Second, "the agent to see replica 1 go", func() bool {
		return a.log.Count("peer closed: shutdown") > 0
	})
	for i := 0; i < 50; i++ {
		if !a.Ready() {
			t.Fatal("the agent went unready with a session still up")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !listed(gws[1], "echo2") {
		t.Fatal("replica 2 stopped serving when replica 1 went")
	}
}
