//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/store"
	"github.com/portway/portway/internal/testetcd"
	"github.com/portway/portway/internal/testservers"
	"github.com/portway/portway/internal/testwait"
)

// The HA failure tests run three gateway processes (127.0.0.11, .12, .13)
// sharing a 3-member etcd, with real Redis and PostgreSQL behind real
// agent processes that hold a session to every replica. Every figure is
// logged with t.Logf; the waits are hang guards, not performance bounds.

const (
	haPrefix   = "/ha/"
	haLeaseTTL = "2s"
	// haGuard is the hang guard of every wait for a failure's effect.
	haGuard = 30 * time.Second
)

// haAgents is the number of agent identities the replicas accept: a few
// for the failure scenarios, 20 for the registration storm.
const haAgents = 24

func haToken(i int) string { return fmt.Sprintf("ha-agent-%02d-token-0123456789", i) }
func haAgent(i int) string { return fmt.Sprintf("ha-agent-%02d", i) }

// haReplica is one gateway process of the cluster.
type haReplica struct {
	pg        *procGateway
	id, host  string
	endpoints []string
	p         *proc
}

func (r *haReplica) start(t *testing.T) {
	var agents strings.Builder
	for i := range haAgents {
		fmt.Fprintf(&agents, "  - {name: %s, token: %q}\n", haAgent(i), haToken(i))
	}
	eps, _ := json.Marshal(r.endpoints)
	cfg := writeConfig(t, r.id+".yaml", fmt.Sprintf(`
listen: %q
public_host: %s
bind_address: %s
insecure: true
# Below the ephemeral ports, and away from the 10000-19999 other tests
# use: each replica binds on its own, and a port another process holds on
# one host moves that replica's allocation.
port_range: "24000-24999"
heartbeat_interval: 1s
handshake_timeout: 2s
agents:
%s
admin: {listen: %q, token: %q}
cluster:
  replica_id: %s
  advertise: %q
  token: cluster-token-0123456789
  etcd:
    endpoints: %s
    prefix: %q
    request_timeout: 1s
    lease_ttl: %s
`, r.pg.listen, r.host, r.host, agents.String(), r.pg.admin, adminToken, r.id, r.pg.listen, eps, haPrefix, haLeaseTTL))
	r.p = startProc(t, r.id, nil, "gateway", "--config", cfg, "--log-level", "debug")
	testwait.For(t, haGuard, r.id+" to serve", func() bool {
		code, _ := httpGetQuiet("http://" + r.pg.admin + "/readyz")
		return code == 200
	})
}

// readyz returns the replica's /readyz status and body.
func (r *haReplica) readyz() (int, string) { return httpGetQuiet("http://" + r.pg.admin + "/readyz") }

// services returns the replica's /v1/services (nil on error).
func (r *haReplica) services() []adminapi.ServiceInfo {
	var out []adminapi.ServiceInfo
	if adminGet(r.pg.admin, adminapi.ServicesPath, &out) != nil {
		return nil
	}
	return out
}

// port returns the public port the replica serves agent's service on (0
// when it serves none).
func (r *haReplica) port(agent, service string) int {
	for _, s := range r.services() {
		if s.Agent == agent && s.ID == service && s.PublicPort != 0 {
			return s.PublicPort
		}
	}
	return 0
}

// startHAAgent starts agent process i with a session to every replica.
func startHAAgent(t *testing.T, i int, reps []*haReplica, services string) *proc {
	var urls []string
	for _, r := range reps {
		urls = append(urls, r.pg.url())
	}
	u, _ := json.Marshal(urls)
	cfg := writeConfig(t, haAgent(i)+".yaml", fmt.Sprintf(`
gateway:
  urls: %s
  connections: %d
metrics: {listen: "127.0.0.1:0"}
services:
%s`, u, len(reps), services))
	return startProc(t, haAgent(i), []string{"PORTWAY_GATEWAY_TOKEN=" + haToken(i)}, "agent", "--config", cfg, "--log-level", "debug")
}

// clientLoop pings every address in turn until stopped, counting
// successes and failures.
type clientLoop struct {
	ok, failed atomic.Int64
	stop       chan struct{}
	done       chan struct{}
}

func startClients(t *testing.T, addrs []string) *clientLoop {
	l := &clientLoop{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for j := 0; j < 1_000_000; j++ {
			select {
			case <-l.stop:
				return
			default:
			}
			addr := addrs[j%len(addrs)]
			if err := testservers.RedisPing(addr); err != nil {
				if l.failed.Add(1) <= 3 {
					t.Logf("client of %s: %v", addr, err)
				}
			} else {
				l.ok.Add(1)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return l
}

func (l *clientLoop) end() (ok, failed int64) {
	close(l.stop)
	<-l.done
	return l.ok.Load(), l.failed.Load()
}

// timeUntil waits (hang guard haGuard) until cond holds and returns how
// long it took.
func timeUntil(t *testing.T, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	testwait.For(t, haGuard, what, cond)
	return time.Since(start).Round(10 * time.Millisecond)
}

// TestHAFailures takes one cluster of three replicas and one etcd through
// each failure in turn: one etcd member killed, a replica killed, etcd's
// quorum lost, a replica partitioned from etcd, and 20 agents registering
// at once. Agents hold a session to every replica, so a client reaching
// any replica finds a local session.
func TestHAFailures(t *testing.T) {
	// Processes started in a subtest are started on top, so that they
	// outlive it.
	top := t
	cl := testetcd.Start(t)
	rd := testservers.Redis(t)
	pgs := testservers.Postgres(t)
	obs, err := clientv3.New(clientv3.Config{Endpoints: cl.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer obs.Close()

	// Replica 3 reaches etcd only through proxies the test can cut: a
	// partition without root.
	var cut []*gateProxy
	var viaProxy []string
	for i := range cl.Endpoints() {
		p := newGateProxy(t, strings.TrimPrefix(cl.Endpoint(i), "http://"))
		cut = append(cut, p)
		viaProxy = append(viaProxy, "http://"+p.ln.Addr().String())
	}
	var reps []*haReplica
	for i, host := range []string{"127.0.0.11", "127.0.0.12", "127.0.0.13"} {
		r := &haReplica{id: fmt.Sprintf("r%d", i+1), host: host, endpoints: cl.Endpoints(), pg: &procGateway{
			listen: fmt.Sprintf("%s:%d", host, freePort(t)),
			admin:  fmt.Sprintf("%s:%d", host, freePort(t)),
			state:  filepath.Join(t.TempDir(), "unused.db"),
		}}
		if i == 2 {
			r.endpoints = viaProxy
		}
		r.start(t)
		reps = append(reps, r)
	}

	services := fmt.Sprintf("  - {name: redis, port: 6379, backend: %q}\n  - {name: pg, port: 5432, backend: %q}\n", rd.Addr(), pgs.Addr())
	agentA := startHAAgent(t, 0, reps, services)
	a0 := haAgent(0)
	var redisPort, pgPort int
	for _, r := range reps {
		testwait.For(t, haGuard, "agent 0 at "+r.id, func() bool { return r.port(a0, "redis") != 0 && r.port(a0, "pg") != 0 })
		rp, pp := r.port(a0, "redis"), r.port(a0, "pg")
		if redisPort == 0 {
			redisPort, pgPort = rp, pp
		}
		if rp != redisPort || pp != pgPort {
			t.Fatalf("%s serves redis on %d and pg on %d, others on %d and %d", r.id, rp, pp, redisPort, pgPort)
		}
	}
	redisAt := func(r *haReplica) string { return net.JoinHostPort(r.host, strconv.Itoa(redisPort)) }
	checkAll := func(when string) {
		t.Helper()
		for _, r := range reps {
			if err := testservers.RedisPing(redisAt(r)); err != nil {
				t.Fatalf("%s: redis through %s: %v", when, r.id, err)
			}
			if out, err := pgs.PSQL(t, r.host, pgPort, "-tAc", "select 40 + 2"); err != nil || strings.TrimSpace(string(out)) != "42" {
				t.Fatalf("%s: postgres through %s: %q %v", when, r.id, out, err)
			}
		}
	}
	checkAll("at start")
	// newAgent starts agent i with one service and waits until every
	// replica serves it on one port.
	newAgent := func(t *testing.T, i int) int {
		t.Helper()
		startHAAgent(top, i, reps, fmt.Sprintf("  - {name: redis, port: 6379, backend: %q}\n", rd.Addr()))
		port := 0
		for _, r := range reps {
			testwait.For(t, haGuard, haAgent(i)+" at "+r.id, func() bool { return r.port(haAgent(i), "redis") != 0 })
			if p := r.port(haAgent(i), "redis"); port == 0 {
				port = p
			} else if p != port {
				t.Fatalf("%s serves %s on %d, another replica on %d", r.id, haAgent(i), p, port)
			}
		}
		if err := testservers.RedisPing(net.JoinHostPort(reps[0].host, strconv.Itoa(port))); err != nil {
			t.Fatal(err)
		}
		return port
	}

	t.Run("EtcdMemberKilled", func(t *testing.T) {
		// The leader: the worst member to lose, an election follows.
		leader := -1
		for i, ep := range cl.Endpoints() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			st, err := obs.Status(ctx, ep)
			cancel()
			if err == nil && st.Header.MemberId == st.Leader {
				leader = i
			}
		}
		if leader < 0 {
			t.Fatal("no etcd leader")
		}
		cl.Kill(leader)
		// Registered during the election.
		newAgent(t, 1)
		checkAll("one etcd member down")
		// Its session is in every replica's presence records.
		for _, r := range reps {
			key := haPrefix + "sessions/" + r.id + "/" + haAgent(1) + "/"
			testwait.For(t, haGuard, "the session record "+key, func() bool {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				resp, err := obs.Get(ctx, key, clientv3.WithPrefix(), clientv3.WithCountOnly())
				return err == nil && resp.Count == 1
			})
		}
		for _, r := range reps {
			if code, body := r.readyz(); code != 200 {
				t.Fatalf("%s not ready with one etcd member down: %d %s", r.id, code, body)
			}
		}
		cl.Restart(leader)
		cl.WaitHealthy(leader)
	})

	t.Run("ReplicaKilled", func(t *testing.T) {
		clients := startClients(t, []string{redisAt(reps[1]), redisAt(reps[2])})
		time.Sleep(300 * time.Millisecond)
		before := strings.Count(agentA.logText(), "tunnel down")
		killed := time.Now()
		reps[0].p.kill()
		noticed := timeUntil(t, "the agent to notice the killed replica", func() bool {
			return strings.Count(agentA.logText(), "tunnel down") > before
		})
		time.Sleep(time.Second)
		reps[0].start(top)
		back := timeUntil(t, "the agent back at the restarted replica", func() bool { return reps[0].port(a0, "redis") != 0 })
		ok, failed := clients.end()
		t.Logf("replica killed: agent noticed after %v; back at the restarted replica %v after its start (%v after the kill); clients of the survivors: %d ok, %d failed",
			noticed, back, time.Since(killed).Round(10*time.Millisecond), ok, failed)
		if failed != 0 || ok == 0 {
			t.Fatalf("clients of the surviving replicas: %d ok, %d failed; want no failure", ok, failed)
		}
		if p := reps[0].port(a0, "redis"); p != redisPort {
			t.Fatalf("the restarted replica serves redis on %d, was %d", p, redisPort)
		}
		checkAll("after the replica's return")
	})

	t.Run("QuorumLost", func(t *testing.T) {
		clients := startClients(t, []string{redisAt(reps[0]), redisAt(reps[1]), redisAt(reps[2])})
		lost := time.Now()
		cl.Kill(1)
		cl.Kill(2)
		notReady := timeUntil(t, "every replica not ready", func() bool {
			for _, r := range reps {
				if code, body := r.readyz(); code != http.StatusServiceUnavailable || !strings.Contains(body, "etcd") {
					return false
				}
			}
			return true
		})
		// A new agent is turned away by every replica (503, Retry-After).
		agentC := startHAAgent(top, 2, reps, fmt.Sprintf("  - {name: redis, port: 6379, backend: %q}\n", rd.Addr()))
		testwait.For(t, haGuard, "the new agent refused", func() bool {
			return strings.Contains(agentC.logText(), "503")
		})
		for _, r := range reps {
			if p := r.port(haAgent(2), "redis"); p != 0 {
				t.Fatalf("%s allocated port %d without quorum", r.id, p)
			}
		}
		checkAll("without quorum")
		ok, failed := clients.end()
		// An agent the replicas already hold comes back without quorum:
		// it is let in and gets its ports back from what they hold.
		agentA.kill()
		for _, r := range reps {
			testwait.For(t, haGuard, r.id+" to drop agent 0", func() bool { return r.port(a0, "redis") == 0 })
		}
		agentA = startHAAgent(top, 0, reps, services)
		rejoined := timeUntil(t, "agent 0 back at every replica, same ports, without quorum", func() bool {
			for _, r := range reps {
				if r.port(a0, "redis") != redisPort || r.port(a0, "pg") != pgPort {
					return false
				}
			}
			return true
		})
		checkAll("agent 0 reconnected without quorum")
		restored := time.Now()
		cl.Restart(1)
		cl.Restart(2)
		ready := timeUntil(t, "every replica ready again", func() bool {
			for _, r := range reps {
				if code, _ := r.readyz(); code != 200 {
					return false
				}
			}
			return true
		})
		newAlloc := time.Duration(0)
		testwait.For(t, haGuard*2, "the new agent registered", func() bool {
			for _, r := range reps {
				if r.port(haAgent(2), "redis") == 0 {
					return false
				}
			}
			newAlloc = time.Since(restored).Round(10 * time.Millisecond)
			return true
		})
		t.Logf("quorum lost: a known agent restarted got its ports back from every replica in %v", rejoined)
		t.Logf("quorum lost: replicas not ready %v after the kill (lease_ttl %s); ready again %v after the members restarted; the new agent served everywhere %v after (agent backoff); clients: %d ok, %d failed (%v in all)",
			notReady, haLeaseTTL, ready, newAlloc, ok, failed, time.Since(lost).Round(10*time.Millisecond))
		if failed != 0 || ok == 0 {
			t.Fatalf("clients during the quorum loss: %d ok, %d failed; want no failure", ok, failed)
		}
	})

	t.Run("ReplicaPartitioned", func(t *testing.T) {
		clients := startClients(t, []string{redisAt(reps[2])})
		cutAt := time.Now()
		for _, p := range cut {
			p.setBlocked(true)
		}
		replicaKey := haPrefix + "replicas/" + reps[2].id
		present := func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			resp, err := obs.Get(ctx, replicaKey)
			return err != nil || len(resp.Kvs) > 0
		}
		if !present() {
			t.Fatalf("no record %s before the partition", replicaKey)
		}
		notReady := timeUntil(t, "the partitioned replica not ready", func() bool {
			code, body := reps[2].readyz()
			return code == http.StatusServiceUnavailable && strings.Contains(body, "etcd")
		})
		testwait.For(t, haGuard, "its presence record gone", func() bool { return !present() })
		vanished := time.Since(cutAt).Round(10 * time.Millisecond)
		// A new agent is refused by the partitioned replica and served
		// by the others.
		agentD := startHAAgent(top, 3, reps, fmt.Sprintf("  - {name: redis, port: 6379, backend: %q}\n", rd.Addr()))
		var portD int
		for _, r := range reps[:2] {
			testwait.For(t, haGuard, haAgent(3)+" at "+r.id, func() bool { return r.port(haAgent(3), "redis") != 0 })
			portD = r.port(haAgent(3), "redis")
		}
		testwait.For(t, haGuard, "the partitioned replica to refuse the new agent", func() bool {
			return strings.Contains(agentD.logText(), "503")
		})
		if p := reps[2].port(haAgent(3), "redis"); p != 0 {
			t.Fatalf("the partitioned replica allocated %d", p)
		}
		if err := testservers.RedisPing(redisAt(reps[2])); err != nil {
			t.Fatalf("the partitioned replica stopped serving its port: %v", err)
		}
		healed := time.Now()
		for _, p := range cut {
			p.setBlocked(false)
		}
		ready := timeUntil(t, "the partitioned replica ready again", func() bool {
			code, _ := reps[2].readyz()
			return code == 200 && present()
		})
		testwait.For(t, haGuard*2, "the new agent at the healed replica", func() bool { return reps[2].port(haAgent(3), "redis") == portD })
		joined := time.Since(healed).Round(10 * time.Millisecond)
		ok, failed := clients.end()
		t.Logf("partition: not ready %v after the cut, its record gone %v after the cut; ready and present %v after healing, the refused agent served there %v after; its clients: %d ok, %d failed",
			notReady, vanished, ready, joined, ok, failed)
		if failed != 0 || ok == 0 {
			t.Fatalf("clients of the partitioned replica: %d ok, %d failed; want no failure", ok, failed)
		}
	})

	t.Run("TwentyAgentsAtOnce", func(t *testing.T) {
		const first, n = 4, 20
		// Started back to back: their registrations race at the replicas.
		for i := first; i < first+n; i++ {
			startHAAgent(top, i, reps, fmt.Sprintf("  - {name: redis, port: 6379, backend: %q}\n", rd.Addr()))
		}
		// Every replica serves every agent's service, on one port.
		ports := map[string]int{}
		for _, r := range reps {
			testwait.For(t, haGuard*2, "20 agents at "+r.id, func() bool {
				got := 0
				for _, s := range r.services() {
					if s.ID == "redis" && s.PublicPort != 0 && agentIndex(s.Agent) >= first {
						got++
					}
				}
				return got == n
			})
			for _, s := range r.services() {
				if agentIndex(s.Agent) < first || s.ID != "redis" {
					continue
				}
				if p, ok := ports[s.Agent]; ok && p != s.PublicPort {
					t.Fatalf("%s serves %s on %d, another replica on %d", r.id, s.Agent, s.PublicPort, p)
				}
				ports[s.Agent] = s.PublicPort
			}
		}
		owner := map[int]string{}
		for a, p := range ports {
			if o, dup := owner[p]; dup {
				t.Fatalf("port %d acknowledged to %s and %s", p, o, a)
			}
			owner[p] = a
		}
		// And in etcd: one key per port, each holding the agent the
		// replicas acknowledged.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		all, _, err := store.NewEtcd(obs, haPrefix, store.Options{}).List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		inEtcd := map[string]int{}
		for _, a := range all {
			k := a.Agent + "/" + a.Service
			if _, dup := inEtcd[k]; dup {
				t.Fatalf("%s holds two ports in etcd", k)
			}
			inEtcd[k] = a.Port
		}
		for a, p := range ports {
			if inEtcd[a+"/redis"] != p {
				t.Fatalf("%s acknowledged port %d, etcd holds %d", a, p, inEtcd[a+"/redis"])
			}
		}
		t.Logf("20 agents through 3 replicas: %d distinct ports, %d allocations in etcd", len(owner), len(all))
	})
}

// agentIndex is i of ha-agent-i (-1 for another name).
func agentIndex(name string) int {
	n, err := strconv.Atoi(strings.TrimPrefix(name, "ha-agent-"))
	if err != nil || !strings.HasPrefix(name, "ha-agent-") {
		return -1
	}
	return n
}
