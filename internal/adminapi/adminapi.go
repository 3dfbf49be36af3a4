// Package adminapi holds the gateway admin API's paths and response
// types, so that its clients (`portway status`, the bench, tests) need
// not import the gateway itself. The gateway serves these types as JSON.
package adminapi

import "time"

// Paths of the admin API's token-protected endpoints.
const (
	// AgentsPath lists the configured agents: a JSON array of AgentInfo.
	AgentsPath = "/v1/agents"
	// ServicesPath lists the exposed services: a JSON array of
	// ServiceInfo.
	ServicesPath = "/v1/services"
	// ClusterPath describes the replicas of a cluster and where each
	// allocated port is served: a ClusterInfo. A gateway without a
	// cluster: block answers 404.
	ClusterPath = "/v1/cluster"
)

// ClusterInfo is GET /v1/cluster, as one replica sees the cluster.
type ClusterInfo struct {
	// Replica is the replica that answered.
	Replica string `json:"replica"`
	// Forwarding is whether it forwards (cluster.token is set).
	Forwarding bool          `json:"forwarding"`
	Replicas   []ReplicaInfo `json:"replicas"`
	Ports      []PortInfo    `json:"ports"`
}

// ReplicaInfo is one replica from the presence records.
type ReplicaInfo struct {
	ID        string    `json:"id"`
	Advertise string    `json:"advertise"`
	Since     time.Time `json:"since,omitzero"`
	// Link is "up" when the answering replica has a link to it open.
	Link string `json:"link,omitempty"`
	// Sessions are the agent sessions it holds.
	Sessions []ClusterSession `json:"sessions,omitempty"`
}

// ClusterSession is one agent session a replica holds.
type ClusterSession struct {
	Agent    string `json:"agent"`
	Instance string `json:"instance,omitempty"`
	Protocol string `json:"protocol"`
}

// PortInfo is one allocated public port and how the answering replica
// serves it.
type PortInfo struct {
	Protocol string `json:"protocol"`
	Port     int    `json:"port"`
	Agent    string `json:"agent"`
	Service  string `json:"service"`
	Live     bool   `json:"live"`
	// Served is "local" (a session of the agent here carries it),
	// "forwarded" (sent on to a replica in Via) or "" (not served here).
	Served string `json:"served,omitempty"`
	// Via are the other replicas holding a session of the agent.
	Via []string `json:"via,omitempty"`
}

// AgentInfo is one entry of GET /v1/agents.
type AgentInfo struct {
	Name           string    `json:"name"`
	Connected      bool      `json:"connected"`
	Protocol       string    `json:"protocol,omitempty"`
	Remote         string    `json:"remote,omitempty"`
	ConnectedSince time.Time `json:"connected_since,omitzero"`
	HeartbeatRTTMS float64   `json:"heartbeat_rtt_ms,omitempty"`
	Services       int       `json:"services"`
	// Instances are the agent's live processes, oldest first; the fields
	// above describe the newest.
	Instances []InstanceInfo `json:"instances,omitempty"`
}

// InstanceInfo is one live instance (agent process) of an agent identity.
type InstanceInfo struct {
	// ID is the instance id the agent sent ("" from an agent that sends
	// none).
	ID             string    `json:"id"`
	Protocol       string    `json:"protocol"`
	Remote         string    `json:"remote"`
	ConnectedSince time.Time `json:"connected_since"`
	HeartbeatRTTMS float64   `json:"heartbeat_rtt_ms"`
	// Services is how many of the agent's services this instance carries.
	Services int `json:"services"`
	// Active is its open connections and UDP sessions.
	Active int64 `json:"active"`
}

// ServiceInfo is one entry of GET /v1/services.
type ServiceInfo struct {
	Agent      string `json:"agent"`
	ID         string `json:"id"`
	Protocol   string `json:"protocol"`
	Port       int    `json:"port"`
	PublicPort int    `json:"public_port"`
	Endpoint   string `json:"endpoint"`
	Mode       string `json:"mode"`
	// Active is open connections (tcp) or sessions (udp).
	Active   int64   `json:"active"`
	BytesIn  float64 `json:"bytes_in,omitempty"`
	BytesOut float64 `json:"bytes_out,omitempty"`
	// PacketsIn and PacketsOut count datagrams (udp).
	PacketsIn  float64 `json:"packets_in,omitempty"`
	PacketsOut float64 `json:"packets_out,omitempty"`
	// ProxyProtocol is the PROXY protocol header the agent writes to the
	// backend: "v1", "v2", or empty for none.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`
	// AllowCIDRs and DenyCIDRs are the service's own source lists, as
	// registered; the agent's ceiling (gateway.yaml) applies on top.
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`
	DenyCIDRs  []string `json:"deny_cidrs,omitempty"`
	// MaxConnectionsPerSource and MaxConnectionRatePerSource are the
	// per-source limits (0: none).
	MaxConnectionsPerSource    int     `json:"max_connections_per_source,omitempty"`
	MaxConnectionRatePerSource float64 `json:"max_connection_rate_per_source,omitempty"`
	// Denied counts connections (tcp) or datagrams (udp) refused because
	// of their source since the service opened; SourceLimited those over
	// a per-source limit.
	Denied        int64 `json:"denied,omitempty"`
	SourceLimited int64 `json:"source_limited,omitempty"`
}

// HasAccessSettings reports whether the service has any PROXY protocol,
// source list or per-source setting, or has refused a source.
func (s *ServiceInfo) HasAccessSettings() bool {
	return s.ProxyProtocol != "" || len(s.AllowCIDRs) > 0 || len(s.DenyCIDRs) > 0 ||
		s.MaxConnectionsPerSource > 0 || s.MaxConnectionRatePerSource > 0 || s.Denied > 0 || s.SourceLimited > 0
}
