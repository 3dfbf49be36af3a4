package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testservers"
	"github.com/portway/portway/internal/testwait"
)

// After real traffic, the agent's and the gateway's /metrics, parsed with
// the Prometheus text parser, show exact counts and byte totals.
func TestMetricsAreExact(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			closedPort := testservers.FreePort(t, "tcp") // nothing listens here
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{
				{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)},
				{Name: "down", Protocol: "tcp", Port: 9, Backend: fmt.Sprintf("127.0.0.1:%d", closedPort)},
				{Name: "uecho", Protocol: "udp", Port: 7, Backend: udpEcho(t)},
			})
			eps := a.waitReady(t)
			const conns = 5
			var sent int64
			for i := 0; i < conns; i++ {
				p := make([]byte, 100000+i*1000)
				sent += int64(len(p))
				if err := testnet.EchoRoundTrip(eps["echo"], p); err != nil {
					t.Fatal(err)
				}
			}
			// A connection to a service whose backend refuses. On a loaded
			// machine the gateway's reset can arrive before Dial looks at
			// the socket: refused all the same.
			c, err := net.Dial("tcp", eps["down"])
			switch {
			case errors.Is(err, syscall.ECONNRESET):
			case err != nil:
				t.Fatal(err)
			default:
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Read(make([]byte, 1)); err == nil {
					t.Fatal("read from a refused service succeeded")
				}
				c.Close()
			}
			// UDP: 7 datagrams of 100 bytes, each echoed.
			uc := udpClient(t, eps["udp/uecho"])
			for i := 0; i < 7; i++ {
				if _, err := exchange(uc, make([]byte, 100), 5*time.Second); err != nil {
					t.Fatal(err)
				}
			}
			agentURL := "http://" + a.MetricsAddr().String() + "/metrics"
			gwURL := "http://" + g.AdminAddr().String() + "/metrics"
			testwait.For(t, 5*time.Second, "connections to close", func() bool {
				return testmetrics.Sum(testmetrics.Scrape(t, agentURL), "pipeops_agent_tcp_tunnel_active_connections", nil) == 0 &&
					testmetrics.Sum(testmetrics.Scrape(t, gwURL), "portway_gateway_connections_active", nil) == 0
			})
			am, gm := testmetrics.Scrape(t, agentURL), testmetrics.Scrape(t, gwURL)
			echo := map[string]string{"service": "echo"}
			with := func(m map[string]string, k, v string) map[string]string {
				out := map[string]string{k: v}
				for a, b := range m {
					out[a] = b
				}
				return out
			}
			checks := []struct {
				name   string
				mfs    string
				metric string
				labels map[string]string
				want   float64
			}{
				{"agent connections", "a", "pipeops_agent_tcp_tunnel_connections_total", echo, conns},
				{"agent bytes received", "a", "pipeops_agent_tcp_tunnel_bytes_total", with(echo, "direction", "received"), float64(sent)},
				{"agent bytes sent", "a", "pipeops_agent_tcp_tunnel_bytes_total", with(echo, "direction", "sent"), float64(sent)},
				{"agent durations observed", "a", "pipeops_agent_tcp_tunnel_connection_duration_seconds", echo, conns},
				{"agent errors on echo", "a", "pipeops_agent_tcp_tunnel_errors_total", echo, 0},
				{"agent refused", "a", "pipeops_agent_tcp_tunnel_errors_total", map[string]string{"service": "down", "reason": "refused"}, 1},
				{"agent udp received", "a", "pipeops_agent_udp_tunnel_packets_total", map[string]string{"service": "uecho", "direction": "received"}, 7},
				{"agent udp sent", "a", "pipeops_agent_udp_tunnel_packets_total", map[string]string{"service": "uecho", "direction": "sent"}, 7},
				{"agent udp sessions", "a", "pipeops_agent_udp_tunnel_active_sessions", map[string]string{"service": "uecho"}, 1},
				{"agent connected", "a", "portway_agent_tunnel_connected", nil, 1},
				{"agent protocol", "a", "portway_agent_tunnel_protocol", map[string]string{"protocol": mode}, 1},
				{"agent registered", "a", "portway_agent_tunnel_registered_services", nil, 3},
				{"gateway connections", "g", "portway_gateway_connections_total", echo, conns},
				{"gateway bytes in", "g", "portway_gateway_bytes_total", with(echo, "direction", "in"), float64(sent)},
				{"gateway bytes out", "g", "portway_gateway_bytes_total", with(echo, "direction", "out"), float64(sent)},
				{"gateway refusal", "g", "portway_gateway_refusals_total", map[string]string{"service": "down", "reason": "refused"}, 1},
				{"gateway udp in", "g", "portway_gateway_udp_packets_total", map[string]string{"service": "uecho", "direction": "in"}, 7},
				{"gateway udp out", "g", "portway_gateway_udp_packets_total", map[string]string{"service": "uecho", "direction": "out"}, 7},
				{"gateway udp sessions", "g", "portway_gateway_udp_sessions_total", map[string]string{"service": "uecho"}, 1},
				{"gateway agents", "g", "portway_gateway_agents_connected", nil, 1},
				{"gateway tcp services", "g", "portway_gateway_services", map[string]string{"protocol": "tcp"}, 2},
				{"gateway udp services", "g", "portway_gateway_services", map[string]string{"protocol": "udp"}, 1},
				{"gateway allocations", "g", "portway_gateway_port_allocations", nil, 3},
			}
			for _, c := range checks {
				m := am
				if c.mfs == "g" {
					m = gm
				}
				if got := testmetrics.Sum(m, c.metric, c.labels); got != c.want {
					t.Errorf("%s: %s%v = %v, want %v", c.name, c.metric, c.labels, got, c.want)
				}
			}
			// The PipeOps discovery metrics are exposed, at zero without Kubernetes.
			for _, n := range []string{"pipeops_agent_gateway_watcher_discovered_services", "pipeops_agent_gateway_watcher_sync_total"} {
				if _, ok := am[n]; !ok {
					t.Errorf("%s is not exposed", n)
				}
			}
			testwait.For(t, 5*time.Second, "a heartbeat round trip", func() bool {
				return testmetrics.Sum(testmetrics.Scrape(t, agentURL), "portway_agent_tunnel_heartbeat_rtt_seconds", nil) > 0
			})
		})
	}
}

// /readyz follows the tunnel: not ready while the gateway is away, ready
// again once it is back.
func TestReadyzFollowsTheTunnel(t *testing.T) {
	listen := fmt.Sprintf("127.0.0.1:%d", testservers.FreePort(t, "tcp"))
	state := t.TempDir() + "/gateway.db"
	same := func(c *config.GatewayFile) { c.Listen = listen; c.StateFile = state }
	g := startGateway(t, same)
	a := startAgent(t, g.url(), tokenA, "yamux", []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}})
	a.waitReady(t)
	readyz := "http://" + a.MetricsAddr().String() + "/readyz"
	status := func(url string) int { code, _ := httpGet(t, url, ""); return code }
	if s := status(readyz); s != http.StatusOK {
		t.Fatalf("agent /readyz = %d with the tunnel up", s)
	}
	if s := status("http://" + a.MetricsAddr().String() + "/healthz"); s != http.StatusOK {
		t.Fatalf("agent /healthz = %d", s)
	}
	if s := status("http://" + g.AdminAddr().String() + "/readyz"); s != http.StatusOK {
		t.Fatalf("gateway /readyz = %d", s)
	}
	g.Close()
	testwait.For(t, 5*time.Second, "agent /readyz to report not ready", func() bool { return status(readyz) == http.StatusServiceUnavailable })
	_, body := httpGet(t, readyz, "")
	t.Logf("agent /readyz while the gateway is down: %s", body)
	startGateway(t, same)
	testwait.For(t, 10*time.Second, "agent /readyz to be ready again", func() bool { return status(readyz) == http.StatusOK })
}

func TestAdminAPI(t *testing.T) {
	g := startGateway(t)
	a := startAgent(t, g.url(), tokenA, "json", []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}})
	ep := a.waitReady(t)["echo"]
	if err := testnet.EchoRoundTrip(ep, make([]byte, 1234)); err != nil {
		t.Fatal(err)
	}
	base := "http://" + g.AdminAddr().String()
	for _, path := range []string{"/v1/agents", "/v1/services"} {
		if code, _ := httpGet(t, base+path, ""); code != http.StatusUnauthorized {
			t.Errorf("%s without a token: HTTP %d, want 401", path, code)
		}
		if code, _ := httpGet(t, base+path, "wrong-token"); code != http.StatusUnauthorized {
			t.Errorf("%s with a wrong token: HTTP %d, want 401", path, code)
		}
	}
	var agents []adminapi.AgentInfo
	getJSON(t, base+"/v1/agents", &agents)
	if len(agents) != 2 || agents[0].Name != "agent-a" || !agents[0].Connected || agents[0].Protocol != "json" || agents[0].Services != 1 || agents[1].Connected {
		t.Errorf("agents = %+v", agents)
	}
	var services []adminapi.ServiceInfo
	testwait.For(t, 5*time.Second, "bytes to show", func() bool {
		getJSON(t, base+"/v1/services", &services)
		return len(services) == 1 && services[0].BytesIn == 1234 && services[0].BytesOut == 1234
	})
	s := services[0]
	if s.Agent != "agent-a" || s.ID != "echo" || s.Protocol != "tcp" || s.Port != 7 || s.PublicPort != 10007 || s.Endpoint != ep || s.Mode != "tunnel" {
		t.Errorf("service = %+v", s)
	}
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v: %s", url, err, b)
	}
}
