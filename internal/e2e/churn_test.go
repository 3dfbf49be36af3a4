package e2e

import (
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testwait"
)

// Agents in both modes come and go (SIGKILL and clean stops, each start a
// new process that registers again) while hundreds of UDP sources and a
// stream of TCP clients keep arriving at their public ports. Every
// reconnect must be registered within a few seconds, and the admin API and
// the liveness check must answer throughout: the registration path never
// wedges behind the data path.
func TestChurnUnderTraffic(t *testing.T) {
	duration := pick(10*time.Second, 60*time.Second)
	udpSources := pick(200, 500)
	tcpClients := pick(20, 100)
	const registerWithin = 10 * time.Second // generous: a loaded 2-core machine

	tcpEcho, uEcho := echoBackend(t), udpEcho(t)
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := writeConfig(t, "gateway.yaml", fmt.Sprintf(`
listen: %q
public_host: 127.0.0.1
bind_address: 127.0.0.1
state_file: %q
insecure: true
heartbeat_interval: 2s
handshake_timeout: 5s
agents:
  - {name: agent-a, token: %q}
  - {name: agent-b, token: %q}
admin: {listen: %q, token: %q}
`, listen, filepath.Join(t.TempDir(), "gateway.db"), tokenA, tokenB, admin, adminToken))
	gwp := startProc(t, "gateway", nil, "gateway", "--config", cfg)
	testwait.For(t, 15*time.Second, "the gateway process to serve", func() bool {
		code, _ := httpGetQuiet("http://" + admin + "/readyz")
		return code == 200
	})
	url := "ws://" + listen + "/v1/tunnel"
	services := fmt.Sprintf("  - {name: echo, port: 7, backend: %q}\n  - {name: uecho, protocol: udp, port: 7, backend: %q}\n", tcpEcho, uEcho)

	// The admin API and the liveness check, polled throughout.
	stop := make(chan struct{})
	var pollers sync.WaitGroup
	var adminOK, adminFail, liveFail atomic.Int64
	var firstAdminErr atomic.Value
	pollers.Add(1)
	go func() {
		defer pollers.Done()
		for i := 0; i < 100000; i++ {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			var agents []adminapi.AgentInfo
			if err := adminGet(admin, adminapi.AgentsPath, &agents); err != nil {
				adminFail.Add(1)
				firstAdminErr.CompareAndSwap(nil, err.Error())
			} else {
				adminOK.Add(1)
			}
			if code, body := httpGetQuiet("http://" + admin + "/healthz"); code != 200 {
				liveFail.Add(1)
				firstAdminErr.CompareAndSwap(nil, fmt.Sprintf("/healthz: %d %s", code, body))
			}
		}
	}()

	// The first registration gives the public ports; they stay the same
	// across reconnects (retained), so the clients aim at them throughout.
	type agentSpec struct{ name, token, mode string }
	agents := []agentSpec{{"agent-a", tokenA, "yamux"}, {"agent-b", tokenB, "json"}}
	endpoints := map[string][2]string{}
	first := map[string]*proc{}
	for _, a := range agents {
		first[a.name] = startChurnAgent(t, url, a.token, a.mode, services)
	}
	for _, a := range agents {
		var tcp, udp string
		testwait.For(t, 20*time.Second, a.name+" to register", func() bool {
			tcp, udp = churnEndpoints(admin, a.name)
			return tcp != "" && udp != ""
		})
		endpoints[a.name] = [2]string{tcp, udp}
	}

	var udpRounds, tcpRounds atomic.Int64
	var traffic sync.WaitGroup
	for _, a := range agents {
		ep := endpoints[a.name]
		ua, err := net.ResolveUDPAddr("udp", ep[1])
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < udpSources/len(agents); i++ {
			traffic.Add(1)
			go func() {
				defer traffic.Done()
				buf := make([]byte, 2048)
				for j := 0; j < 100000; j++ {
					select {
					case <-stop:
						return
					default:
					}
					// A new source port each round: new clients keep arriving.
					c, err := net.DialUDP("udp", nil, ua)
					if err != nil {
						time.Sleep(10 * time.Millisecond)
						continue
					}
					c.Write([]byte("churn"))
					c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
					if n, err := c.Read(buf); err == nil && string(buf[:n]) == "churn" {
						udpRounds.Add(1)
					}
					c.Close()
					time.Sleep(10 * time.Millisecond)
				}
			}()
		}
		for i := 0; i < tcpClients/len(agents); i++ {
			traffic.Add(1)
			go func() {
				defer traffic.Done()
				buf := make([]byte, 5)
				for j := 0; j < 100000; j++ {
					select {
					case <-stop:
						return
					default:
					}
					c, err := net.DialTimeout("tcp", ep[0], time.Second)
					if err != nil {
						time.Sleep(20 * time.Millisecond)
						continue
					}
					c.SetDeadline(time.Now().Add(time.Second))
					if _, err := c.Write([]byte("churn")); err == nil {
						if _, err := io.ReadFull(c, buf); err == nil && string(buf) == "churn" {
							tcpRounds.Add(1)
						}
					}
					c.Close()
				}
			}()
		}
	}

	// Each agent: run a little, die (SIGKILL) or stop (SIGTERM), wait for
	// the gateway to notice, start again and time the registration.
	var churn sync.WaitGroup
	var mu sync.Mutex
	var slowest time.Duration
	cycles := map[string]int{}
	var failures []string
	churnStart := time.Now()
	end := churnStart.Add(duration)
	for _, a := range agents {
		churn.Add(1)
		go func() {
			defer churn.Done()
			p := first[a.name]
			fail := func(format string, args ...any) {
				mu.Lock()
				failures = append(failures, fmt.Sprintf(a.name+" ("+a.mode+"): "+format, args...))
				mu.Unlock()
			}
			for i := 0; time.Now().Before(end) && i < 1000; i++ {
				time.Sleep(300 * time.Millisecond)
				if i%2 == 0 {
					p.kill()
				} else if !p.terminate(10 * time.Second) {
					fail("agent did not stop on SIGTERM")
					return
				}
				if !testwait.Until(registerWithin, func() bool { tcp, _ := churnEndpoints(admin, a.name); return tcp == "" }) {
					fail("gateway still lists the services %v after the agent ended", registerWithin)
					return
				}
				began := time.Now()
				p = startChurnAgent(t, url, a.token, a.mode, services)
				if !testwait.Until(registerWithin, func() bool {
					tcp, udp := churnEndpoints(admin, a.name)
					return tcp != "" && udp != ""
				}) {
					fail("reconnect %d not registered within %v", i+1, registerWithin)
					return
				}
				took := time.Since(began)
				if tcp, udp := churnEndpoints(admin, a.name); tcp != endpoints[a.name][0] || udp != endpoints[a.name][1] {
					fail("reconnect %d moved the ports: %s %s, want %v", i+1, tcp, udp, endpoints[a.name])
				}
				mu.Lock()
				cycles[a.name]++
				slowest = max(slowest, took)
				mu.Unlock()
			}
		}()
	}
	// Reloads run through the same locks (Gateway.reloadMu, then each
	// agent's): SIGHUP the gateway throughout the churn.
	churn.Add(1)
	go func() {
		defer churn.Done()
		for i := 0; time.Now().Before(end) && i < 1000; i++ {
			time.Sleep(250 * time.Millisecond)
			gwp.Signal(syscall.SIGHUP)
		}
	}()
	churn.Wait()
	if n := strings.Count(gwp.Log(), "reload done"); n == 0 {
		t.Errorf("the gateway logged no reload for the SIGHUPs during the churn")
	} else {
		t.Logf("%d reloads during the churn", n)
	}
	// Traffic flows once the churn stops.
	for _, a := range agents {
		ep := endpoints[a.name]
		if err := testnet.EchoRoundTrip(ep[0], []byte("after the churn")); err != nil {
			t.Errorf("%s: tcp after the churn: %v", a.name, err)
		}
		c := udpClient(t, ep[1])
		ok := false
		for i := 0; i < 20 && !ok; i++ {
			got, err := exchange(c, []byte("after"), 500*time.Millisecond)
			ok = err == nil && string(got) == "after"
		}
		if !ok {
			t.Errorf("%s: udp after the churn: no echo", a.name)
		}
	}
	close(stop)
	traffic.Wait()
	pollers.Wait()

	t.Logf("churn for %v: reconnects registered: %v; slowest %v; %d UDP and %d TCP round trips; admin API answered %d times, failed %d; /healthz failed %d",
		time.Since(churnStart).Round(time.Millisecond), cycles, slowest.Round(time.Millisecond), udpRounds.Load(), tcpRounds.Load(), adminOK.Load(), adminFail.Load(), liveFail.Load())
	for _, f := range failures {
		t.Error(f)
	}
	for _, a := range agents {
		if cycles[a.name] < 3 {
			t.Errorf("%s: only %d reconnects in %v", a.name, cycles[a.name], duration)
		}
	}
	if adminFail.Load() != 0 || liveFail.Load() != 0 {
		t.Errorf("admin API failed %d times, /healthz %d times; first: %v", adminFail.Load(), liveFail.Load(), firstAdminErr.Load())
	}
	if adminOK.Load() == 0 {
		t.Error("the admin API was never polled")
	}
	select {
	case <-gwp.done:
		t.Error("the gateway process exited")
	default:
	}
}

// startChurnAgent starts an agent process with the given identity.
func startChurnAgent(t *testing.T, url, token, mode, services string) *proc {
	cfg := writeConfig(t, "agent.yaml", fmt.Sprintf(`
gateway: {url: %q, protocol: %s}
metrics: {listen: "127.0.0.1:0"}
services:
%s`, url, mode, services))
	return startProc(t, "agent", []string{"PORTWAY_GATEWAY_TOKEN=" + token}, "agent", "--config", cfg)
}

// churnEndpoints returns an agent's TCP and UDP endpoints as the gateway's
// admin API lists them ("" when absent or on error).
func churnEndpoints(admin, agent string) (tcp, udp string) {
	pg := &procGateway{admin: admin}
	tcp = procServiceEndpoint(pg, func(si adminapi.ServiceInfo) bool { return si.Agent == agent && si.Protocol == "tcp" })
	udp = procServiceEndpoint(pg, func(si adminapi.ServiceInfo) bool { return si.Agent == agent && si.Protocol == "udp" })
	return tcp, udp
}

// terminate sends SIGTERM and waits for the process to exit.
func (p *proc) terminate(wait time.Duration) bool {
	p.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return true
	case <-time.After(wait):
		return false
	}
}
