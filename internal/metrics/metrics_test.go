package metrics

import (
	"encoding/json"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// registeredNames returns the metric names both sets register.
func registeredNames(t *testing.T) map[string]bool {
	t.Helper()
	descs := make(chan *prometheus.Desc, 1000)
	names := map[string]bool{}
	// Describe, not Gather: a gather shows only series that exist yet.
	a, g := NewAgent(prometheus.NewRegistry()), NewGateway(prometheus.NewRegistry())
	for _, c := range []prometheus.Collector{a.TCPActive, a.TCPTotal, a.TCPBytes, a.TCPDuration, a.TCPErrors,
		a.UDPActive, a.UDPSessions, a.UDPPackets, a.UDPDropped, a.Discovered, a.Syncs, a.Connected,
		a.Reconnects, a.Protocol, a.HeartbeatRTT, a.Registered,
		g.AgentsConnected, g.AgentSessions, g.AgentInstances, g.Services, g.PortAllocations, g.PortEvictions, g.ConnActive, g.ConnTotal,
		g.Bytes, g.Refusals, g.UDPActive, g.UDPSessions, g.UDPPackets, g.UDPDropped, g.AuthFailures, g.SessionEnds,
		g.HandshakesInFlight, g.HandshakesDeferred,
		g.Forwarded, g.ForwardedBytes,
		NewCertificateExpiry(prometheus.NewRegistry())} {
		c.Describe(descs)
	}
	close(descs)
	re := regexp.MustCompile(`fqName: "([^"]+)"`)
	for d := range descs {
		if m := re.FindStringSubmatch(d.String()); m != nil {
			names[m[1]] = true
		}
	}
	return names
}

// The PipeOps agent's documented metric names must exist exactly.
func TestPipeOpsMetricNames(t *testing.T) {
	names := registeredNames(t)
	for _, n := range []string{
		"pipeops_agent_tcp_tunnel_active_connections", "pipeops_agent_tcp_tunnel_connections_total",
		"pipeops_agent_tcp_tunnel_bytes_total", "pipeops_agent_tcp_tunnel_connection_duration_seconds",
		"pipeops_agent_tcp_tunnel_errors_total", "pipeops_agent_udp_tunnel_active_sessions",
		"pipeops_agent_udp_tunnel_packets_total", "pipeops_agent_gateway_watcher_discovered_services",
		"pipeops_agent_gateway_watcher_sync_total",
	} {
		if !names[n] {
			t.Errorf("PipeOps metric %s is not registered", n)
		}
	}
}

// Every registered metric is documented, and docs/metrics.md names no
// metric that does not exist.
func TestMetricsDocumented(t *testing.T) {
	names := registeredNames(t)
	doc, err := os.ReadFile("../../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("`((?:pipeops|portway)_[a-z0-9_]+)`").FindAllStringSubmatch(string(doc), -1) {
		documented[m[1]] = true
	}
	for n := range names {
		if !documented[n] {
			t.Errorf("%s is registered but not in docs/metrics.md", n)
		}
	}
	for n := range documented {
		if !names[n] {
			t.Errorf("docs/metrics.md names %s, which is not registered", n)
		}
	}
}

// The Grafana dashboard parses, and every metric its queries use exists.
func TestDashboardQueriesUseRealMetrics(t *testing.T) {
	names := registeredNames(t)
	b, err := os.ReadFile("../../deploy/grafana/portway.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	metricRe := regexp.MustCompile(`\b((?:pipeops|portway)_[a-z0-9_]+)`)
	used := map[string]bool{}
	queries := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			queries++
			for _, m := range metricRe.FindAllString(tg.Expr, -1) {
				base := m
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					if strings.HasSuffix(m, suffix) && names[strings.TrimSuffix(m, suffix)] {
						base = strings.TrimSuffix(m, suffix)
					}
				}
				if !names[base] {
					t.Errorf("panel %q queries %s, which does not exist", p.Title, m)
				}
				used[base] = true
			}
		}
	}
	if queries < 20 {
		t.Errorf("dashboard has only %d queries", queries)
	}
	// The panels: traffic per service, active connections and
	// sessions, errors by reason, tunnel up and reconnects, heartbeat RTT.
	for _, n := range []string{"pipeops_agent_tcp_tunnel_bytes_total", "pipeops_agent_tcp_tunnel_active_connections",
		"pipeops_agent_udp_tunnel_active_sessions", "pipeops_agent_tcp_tunnel_errors_total",
		"portway_agent_tunnel_connected", "portway_agent_tunnel_reconnects_total", "portway_agent_tunnel_heartbeat_rtt_seconds"} {
		if !used[n] {
			t.Errorf("dashboard does not show %s", n)
		}
	}
	var unused []string
	for n := range names {
		if !used[n] {
			unused = append(unused, n)
		}
	}
	sort.Strings(unused)
	t.Logf("metrics not on the dashboard: %v", unused)
}

func TestPairCounterLiveAndDone(t *testing.T) {
	c := NewPairCounter("x_bytes_total", "help", []string{"service"}, [2]string{"in", "out"})
	var a, b int64 = 10, 20
	f := c.Track(func() (int64, int64) { return a, b }, "svc")
	if n := count(c); n != 2 {
		t.Fatalf("%d series, want 2", n)
	}
	if x, y := c.Values("svc"); x != 10 || y != 20 {
		t.Fatalf("live values %v %v", x, y)
	}
	a, b = 15, 25
	f.Done()
	f.Done() // idempotent
	c.Add(1, 2, "svc")
	if x, y := c.Values("svc"); x != 16 || y != 27 {
		t.Fatalf("after done %v %v, want 16 27", x, y)
	}
	c.Delete("svc")
	if n := count(c); n != 0 {
		t.Fatalf("%d series after delete", n)
	}
}

func count(c prometheus.Collector) int {
	ch := make(chan prometheus.Metric, 100)
	c.Collect(ch)
	close(ch)
	return len(ch)
}

// ForgetService removes every series of the service, whatever its reason
// label, and no other agent's.
func TestGatewayForgetServiceRemovesEverySeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewGateway(reg)
	for _, agent := range []string{"a", "b"} {
		m.ConnActive.WithLabelValues(agent, "svc").Inc()
		m.ConnTotal.WithLabelValues(agent, "svc").Inc()
		m.UDPActive.WithLabelValues(agent, "svc").Inc()
		m.UDPSessions.WithLabelValues(agent, "svc").Inc()
		for r := ReasonNone + 1; r < numReasons; r++ {
			m.Refusals.WithLabelValues(agent, "svc", r.String()).Inc()
			m.UDPDropped.WithLabelValues(agent, "svc", r.String()).Inc()
		}
	}
	m.ForgetService("a", "svc")
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	left := map[string]int{}
	for _, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			for _, l := range mt.GetLabel() {
				if l.GetName() == "agent" {
					left[l.GetValue()]++
				}
			}
		}
	}
	if left["a"] != 0 {
		t.Fatalf("%d series of the forgotten service remain", left["a"])
	}
	if want := 4 + 2*int(numReasons-1); left["b"] != want {
		t.Fatalf("the other agent has %d series, want %d", left["b"], want)
	}
}
