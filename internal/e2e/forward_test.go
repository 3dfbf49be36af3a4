//go:build linux

package e2e

import (
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portway/portway/internal/testetcd"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testservers"
	"github.com/portway/portway/internal/testwait"
)

const clusterToken = "cluster-token-0123456789abcdef"

// startClusterReplica starts a gateway process on host, a replica of the
// cluster in etcd cl under prefix, with cluster.token set.
func startClusterReplica(t *testing.T, cl *testetcd.Cluster, prefix, name, host string) (*procGateway, *proc) {
	pg := &procGateway{
		listen: fmt.Sprintf("%s:%d", host, freePort(t)),
		admin:  fmt.Sprintf("%s:%d", host, freePort(t)),
		state:  filepath.Join(t.TempDir(), name+".db"),
	}
	endpoints := `"` + strings.Join(cl.Endpoints(), `", "`) + `"`
	cfg := writeConfig(t, name+".yaml", fmt.Sprintf(`
listen: %q
public_host: %s
bind_address: %s
insecure: true
heartbeat_interval: 1s
handshake_timeout: 2s
agents:
  - {name: agent-a, token: %q}
admin: {listen: %q, token: %q}
cluster:
  replica_id: %s
  advertise: %q
  token: %q
  etcd: {endpoints: [%s], prefix: %q, lease_ttl: 2s, request_timeout: 2s}
`, pg.listen, host, host, tokenA, pg.admin, adminToken, name, pg.listen, clusterToken, endpoints, prefix))
	p := startProc(t, name, nil, "gateway", "--config", cfg, "--log-level", "debug")
	testwait.For(t, 15*time.Second, name+" to serve", func() bool {
		code, _ := httpGetQuiet("http://" + pg.admin + "/readyz")
		return code == 200
	})
	return pg, p
}

// dnsAsk sends one A query for name to addr and checks the address.
func dnsAsk(t *testing.T, addr, name string, want net.IP) error {
	c := udpClient(t, addr)
	defer c.Close()
	resp, err := exchange(c, dnsQuery(7, name), 3*time.Second)
	if err != nil {
		return err
	}
	id, ip, err := dnsAnswerA(resp)
	if err != nil || id != 7 || !ip.Equal(want) {
		return fmt.Errorf("answer id %d ip %v (%v), want %v", id, ip, err, want)
	}
	return nil
}

// Three gateway processes, replicas of one cluster on 127.0.0.11, .12 and
// .13, with the same public port numbers; an agent process holds one
// session, to the first. A real Redis and a real dnsmasq behind it answer
// through all three replicas, the second and third forwarding to the
// first. A second agent process holds a session to the third; the first
// replica is killed: clients keep working through the other two.
func TestForwardedThroughReplicas(t *testing.T) {
	rd := testservers.Redis(t)
	dns := testservers.DNS(t, map[string]string{"db.portway.test": "10.0.0.9"})
	want := net.IPv4(10, 0, 0, 9).To4()
	cl := testetcd.Start(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			prefix := "/e2e-fwd-" + mode + "/"
			pg1, gw1 := startClusterReplica(t, cl, prefix, "r1", "127.0.0.11")
			pg2, _ := startClusterReplica(t, cl, prefix, "r2", "127.0.0.12")
			pg3, _ := startClusterReplica(t, cl, prefix, "r3", "127.0.0.13")
			services := fmt.Sprintf("  - {name: redis, port: 6379, backend: %q}\n  - {name: dns, protocol: udp, port: 53, backend: %q}\n",
				rd.Addr(), dns.Addr())
			startAgentProc(t, pg1.url(), mode, "127.0.0.1:0", services, "")
			ep := waitProcEndpoint(t, pg1, "redis")
			_, port := splitHostPort(t, ep)
			var udpPort int
			testwait.For(t, 15*time.Second, "the dns service on r1", func() bool {
				if e := procUDPEndpoint(pg1); e != "" {
					_, udpPort = splitHostPort(t, e)
				}
				return udpPort != 0
			})
			addrs := func(p int) []string {
				var out []string
				for _, h := range []string{"127.0.0.11", "127.0.0.12", "127.0.0.13"} {
					out = append(out, net.JoinHostPort(h, strconv.Itoa(p)))
				}
				return out
			}
			for i, a := range addrs(port) {
				testwait.For(t, 15*time.Second, "redis through "+a, func() bool { return testservers.RedisPing(a) == nil })
				host, _ := splitHostPort(t, a)
				key := "k" + strconv.Itoa(i)
				if out, err := rd.CLI(t, host, port, "SET", key, "through-"+host); err != nil || strings.TrimSpace(string(out)) != "OK" {
					t.Fatalf("SET through %s: %q %v", a, out, err)
				}
				if out, err := rd.CLI(t, "127.0.0.11", port, "GET", key); err != nil || strings.TrimSpace(string(out)) != "through-"+host {
					t.Fatalf("GET: %q %v", out, err)
				}
			}
			for _, a := range addrs(udpPort) {
				testwait.For(t, 15*time.Second, "dns through "+a, func() bool { return dnsAsk(t, a, "db.portway.test", want) == nil })
			}
			if n := testmetrics.Sum(testmetrics.Scrape(t, "http://"+pg2.admin+"/metrics"), "portway_gateway_forwarded_total",
				map[string]string{"agent": "agent-a", "service": "redis"}); n < 1 {
				t.Errorf("r2 forwarded %v redis connections, want some", n)
			}

			// A second agent process, connected to r3 only; then r1 dies.
			startAgentProc(t, pg3.url(), mode, "127.0.0.1:0", services, "")
			testwait.For(t, 15*time.Second, "the second agent at r3", func() bool { return procEndpoint(pg3, "redis") != "" })
			var ok, failed atomic.Int64
			stop, done := make(chan struct{}), make(chan struct{})
			go func() {
				defer close(done)
				for j := 0; j < 100000; j++ {
					select {
					case <-stop:
						return
					default:
					}
					if testservers.RedisPing(addrs(port)[1+j%2]) == nil {
						ok.Add(1)
					} else {
						failed.Add(1)
					}
					time.Sleep(5 * time.Millisecond)
				}
			}()
			time.Sleep(200 * time.Millisecond)
			gw1.kill()
			// Until r1's lease expires, r2 may still try r1 first: it
			// cannot reach it, and tries r3.
			time.Sleep(3 * time.Second)
			close(stop)
			<-done
			t.Logf("through r2 and r3 while r1 was killed: %d round trips, %d failed", ok.Load(), failed.Load())
			// Only a connection inside r1 may break: the client makes one
			// at a time, so at most the one that r2 or r3 had forwarded
			// to r1 in the instant it died.
			if failed.Load() > 1 || ok.Load() == 0 {
				t.Errorf("clients of r2 and r3: %d ok, %d failed, want at most the one inside r1", ok.Load(), failed.Load())
			}
			for _, a := range addrs(port)[1:] {
				if err := testservers.RedisPing(a); err != nil {
					t.Errorf("redis through %s after r1 died: %v", a, err)
				}
			}
			for _, a := range addrs(udpPort)[1:] {
				testwait.For(t, 10*time.Second, "dns through "+a+" after r1 died", func() bool {
					return dnsAsk(t, a, "db.portway.test", want) == nil
				})
			}
		})
	}
}
