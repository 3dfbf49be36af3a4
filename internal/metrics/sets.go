package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/protocol"
)

// Agent holds the agent's metrics. The pipeops_agent_* names are the PipeOps
// agent's documented names, kept exactly; portway_agent_* add the tunnel's
// health.
// docs/metrics.md describes every metric and label.
type Agent struct {
	TCPActive   *prometheus.GaugeVec     // service
	TCPTotal    *prometheus.CounterVec   // service
	TCPBytes    *PairCounter             // service, direction=sent|received
	TCPDuration *prometheus.HistogramVec // service
	TCPErrors   *prometheus.CounterVec   // service, reason

	UDPActive   *prometheus.GaugeVec   // service
	UDPSessions *prometheus.CounterVec // service
	UDPPackets  *PairCounter           // service, direction=sent|received
	UDPDropped  *prometheus.CounterVec // service, reason

	Discovered *prometheus.GaugeVec   // protocol
	Syncs      *prometheus.CounterVec // result

	Connected    prometheus.Gauge
	Reconnects   prometheus.Counter
	Protocol     *prometheus.GaugeVec // protocol
	HeartbeatRTT prometheus.Gauge
	Registered   prometheus.Gauge
}

// NewAgent creates the agent's metrics and registers them with reg.
func NewAgent(reg prometheus.Registerer) *Agent {
	m := &Agent{
		TCPActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "pipeops_agent_tcp_tunnel_active_connections",
			Help: "Tunneled TCP connections open now.",
		}, []string{"service"}),
		TCPTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pipeops_agent_tcp_tunnel_connections_total",
			Help: "Tunneled TCP connections accepted (backend dialed successfully).",
		}, []string{"service"}),
		TCPBytes: NewPairCounter("pipeops_agent_tcp_tunnel_bytes_total",
			"Bytes relayed: sent = backend to client, received = client to backend.",
			[]string{"service"}, [2]string{"sent", "received"}),
		TCPDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "pipeops_agent_tcp_tunnel_connection_duration_seconds",
			Help:    "Lifetime of tunneled TCP connections.",
			Buckets: []float64{0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 6 * 3600, 24 * 3600},
		}, []string{"service"}),
		TCPErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pipeops_agent_tcp_tunnel_errors_total",
			Help: "Tunneled TCP connections that failed, by reason.",
		}, []string{"service", "reason"}),
		UDPActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "pipeops_agent_udp_tunnel_active_sessions",
			Help: "Tunneled UDP sessions open now.",
		}, []string{"service"}),
		UDPSessions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_agent_udp_tunnel_sessions_total",
			Help: "Tunneled UDP sessions started.",
		}, []string{"service"}),
		UDPPackets: NewPairCounter("pipeops_agent_udp_tunnel_packets_total",
			"Datagrams relayed: sent = backend to client, received = client to backend.",
			[]string{"service"}, [2]string{"sent", "received"}),
		UDPDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_agent_udp_tunnel_dropped_total",
			Help: "Datagrams or sessions dropped, by reason.",
		}, []string{"service", "reason"}),
		Discovered: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "pipeops_agent_gateway_watcher_discovered_services",
			Help: "Services discovered from Kubernetes Gateways and routes.",
		}, []string{"protocol"}),
		Syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pipeops_agent_gateway_watcher_sync_total",
			Help: "Discovery syncs (desired set recomputed), by result.",
		}, []string{"result"}),
		Connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "portway_agent_tunnel_connected",
			Help: "1 while the tunnel to the gateway is up.",
		}),
		Reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "portway_agent_tunnel_reconnects_total",
			Help: "Tunnel connections established after the first.",
		}),
		Protocol: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "portway_agent_tunnel_protocol",
			Help: "1 for the protocol mode of the current tunnel.",
		}, []string{"protocol"}),
		HeartbeatRTT: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "portway_agent_tunnel_heartbeat_rtt_seconds",
			Help: "Last heartbeat round-trip time to the gateway.",
		}),
		Registered: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "portway_agent_tunnel_registered_services",
			Help: "Services the gateway accepted in the last register_ack.",
		}),
	}
	reg.MustRegister(m.TCPActive, m.TCPTotal, m.TCPBytes, m.TCPDuration, m.TCPErrors,
		m.UDPActive, m.UDPSessions, m.UDPPackets, m.UDPDropped, m.Discovered, m.Syncs,
		m.Connected, m.Reconnects, m.Protocol, m.HeartbeatRTT, m.Registered)
	// Expose the discovery series from the start (at zero without
	// Kubernetes), so dashboards and alerts see them.
	for _, k := range []protocol.Kind{protocol.KindTCP, protocol.KindUDP} {
		m.Discovered.WithLabelValues(k.String())
	}
	for _, r := range []string{"success", "error"} {
		m.Syncs.WithLabelValues(r)
	}
	return m
}

// ForgetService removes a withdrawn service's label sets.
func (m *Agent) ForgetService(service string) {
	m.TCPActive.DeleteLabelValues(service)
	m.TCPTotal.DeleteLabelValues(service)
	m.TCPBytes.Delete(service)
	m.TCPDuration.DeleteLabelValues(service)
	m.TCPErrors.DeletePartialMatch(prometheus.Labels{"service": service})
	m.UDPActive.DeleteLabelValues(service)
	m.UDPSessions.DeleteLabelValues(service)
	m.UDPPackets.Delete(service)
	m.UDPDropped.DeletePartialMatch(prometheus.Labels{"service": service})
}

// Gateway holds the gateway's metrics (portway_gateway_*).
type Gateway struct {
	AgentsConnected prometheus.Gauge
	AgentSessions   *prometheus.CounterVec // agent
	AgentInstances  *prometheus.GaugeVec   // agent
	Services        *prometheus.GaugeVec   // protocol
	PortAllocations prometheus.Gauge
	PortEvictions   *prometheus.CounterVec // reason

	ConnActive *prometheus.GaugeVec   // agent, service
	ConnTotal  *prometheus.CounterVec // agent, service
	Bytes      *PairCounter           // agent, service, direction=in|out
	Refusals   *prometheus.CounterVec // agent, service, reason

	UDPActive   *prometheus.GaugeVec   // agent, service
	UDPSessions *prometheus.CounterVec // agent, service
	UDPPackets  *PairCounter           // agent, service, direction=in|out
	UDPDropped  *prometheus.CounterVec // agent, service, reason

	AuthFailures *prometheus.CounterVec // reason
	SessionEnds  *prometheus.CounterVec // reason

	// HandshakesInFlight counts agent handshakes admitted and not yet
	// done; HandshakesDeferred counts those turned away with 503 because
	// max_concurrent_handshakes were in flight.
	HandshakesInFlight prometheus.Gauge
	HandshakesDeferred prometheus.Counter
	// Forwarded counts the connections and UDP sessions this replica
	// sent to another replica that holds the agent's session;
	// ForwardedBytes their TCP bytes (in = from clients).
	Forwarded      *prometheus.CounterVec // agent, service
	ForwardedBytes *PairCounter           // agent, service, direction=in|out
}

// NewGateway creates the gateway's metrics and registers them with reg.
func NewGateway(reg prometheus.Registerer) *Gateway {
	svc := []string{"agent", "service"}
	m := &Gateway{
		AgentsConnected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "portway_gateway_agents_connected", Help: "Agents with a live tunnel.",
		}),
		AgentSessions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_gateway_agent_sessions_total", Help: "Tunnel sessions accepted, per agent.",
		}, []string{"agent"}),
		AgentInstances: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "portway_gateway_agent_instances", Help: "Live instances (agent processes) per agent identity.",
		}, []string{"agent"}),
		Services: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "portway_gateway_services", Help: "Services with an open public listener.",
		}, []string{"protocol"}),
		PortAllocations: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "portway_gateway_port_allocations", Help: "Public ports allocated (live or retained).",
		}),
		PortEvictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_gateway_port_evictions_total",
			Help: "Retained port allocations freed before port_retention ended, by reason.",
		}, []string{"reason"}),
		ConnActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "portway_gateway_connections_active", Help: "Public TCP connections open now.",
		}, svc),
		ConnTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_gateway_connections_total", Help: "Public TCP connections accepted.",
		}, svc),
		Bytes: NewPairCounter("portway_gateway_bytes_total",
			"Bytes relayed on public TCP connections: in = from clients, out = to clients.",
			svc, [2]string{"in", "out"}),
		Refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_gateway_refusals_total", Help: "Public connections or sessions refused, by reason.",
		}, []string{"agent", "service", "reason"}),
		UDPActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "portway_gateway_udp_sessions_active", Help: "Public UDP sessions open now.",
		}, svc),
		UDPSessions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_gateway_udp_sessions_total", Help: "Public UDP sessions started.",
		}, svc),
		UDPPackets: NewPairCounter("portway_gateway_udp_packets_total",
			"Datagrams relayed: in = from clients, out = to clients.",
			svc, [2]string{"in", "out"}),
		UDPDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_gateway_udp_dropped_total", Help: "Datagrams dropped, by reason.",
		}, []string{"agent", "service", "reason"}),
		AuthFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_gateway_auth_failures_total", Help: "Rejected tunnel connection attempts, by reason.",
		}, []string{"reason"}),
		SessionEnds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_gateway_session_ends_total", Help: "Tunnel sessions ended, by reason.",
		}, []string{"reason"}),
		Forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "portway_gateway_forwarded_total",
			Help: "Public connections and UDP sessions forwarded to another replica holding the agent's session.",
		}, svc),
		ForwardedBytes: NewPairCounter("portway_gateway_forwarded_bytes_total",
			"Bytes of forwarded TCP connections: in = from clients, out = to clients.",
			svc, [2]string{"in", "out"}),
	}
	m.HandshakesInFlight = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "portway_gateway_handshakes_in_flight",
		Help: "Agent handshakes in progress (admitted, hello exchange not yet done).",
	})
	m.HandshakesDeferred = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "portway_gateway_handshakes_deferred_total",
		Help: "Agent connection attempts answered 503 with Retry-After because max_concurrent_handshakes were in progress.",
	})
	reg.MustRegister(m.HandshakesInFlight, m.HandshakesDeferred)
	reg.MustRegister(m.AgentsConnected, m.AgentSessions, m.AgentInstances, m.Services, m.PortAllocations, m.PortEvictions,
		m.ConnActive, m.ConnTotal, m.Bytes, m.Refusals, m.UDPActive, m.UDPSessions, m.UDPPackets,
		m.UDPDropped, m.AuthFailures, m.SessionEnds, m.Forwarded, m.ForwardedBytes)
	// Both reasons from the start, so an alert on their rate sees zero.
	for _, r := range []Reason{ReasonAgentCap, ReasonRangeFull} {
		m.PortEvictions.WithLabelValues(r.String())
	}
	return m
}

// NewCertificateExpiry creates and registers the gauge of the gateway's TLS
// certificate expiry. Only a gateway serving TLS registers it: a zero
// expiry would look like a long-expired certificate to an alert.
func NewCertificateExpiry(reg prometheus.Registerer) prometheus.Gauge {
	m := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "portway_gateway_tls_certificate_not_after_timestamp_seconds",
		Help: "Expiry (Unix time) of the TLS certificate the agent endpoint presents to new handshakes.",
	})
	reg.MustRegister(m)
	return m
}

// ForgetService removes a withdrawn service's label sets.
//
// Every label set is deleted by its full value, reasons included (they
// come from the fixed set of Reason): a partial match walks every series
// of the vector, and a gateway with thousands of agents withdraws
// thousands of services at once when they all reconnect.
func (m *Gateway) ForgetService(agent, service string) {
	m.ConnActive.DeleteLabelValues(agent, service)
	m.ConnTotal.DeleteLabelValues(agent, service)
	m.Bytes.Delete(agent, service)
	m.UDPActive.DeleteLabelValues(agent, service)
	m.UDPSessions.DeleteLabelValues(agent, service)
	m.UDPPackets.Delete(agent, service)
	for r := ReasonNone + 1; r < numReasons; r++ {
		m.Refusals.DeleteLabelValues(agent, service, r.String())
		m.UDPDropped.DeleteLabelValues(agent, service, r.String())
	}
	m.Forwarded.DeleteLabelValues(agent, service)
	m.ForwardedBytes.Delete(agent, service)
}
