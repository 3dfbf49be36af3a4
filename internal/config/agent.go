package config

import (
	"fmt"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/portway/portway/internal/protocol"
)

// AgentFile is agent.yaml.
type AgentFile struct {
	Gateway    GatewayConn `json:"gateway"`
	Metrics    Metrics     `json:"metrics"`
	Kubernetes Kubernetes  `json:"kubernetes"`
	// Tunnels is exactly the PipeOps agent's tunnels: block.
	Tunnels Tunnels `json:"tunnels"`
	// Services are static services, for use outside Kubernetes.
	Services []StaticService `json:"services"`
	// LogLevel is debug, info, warn or error; empty keeps --log-level.
	// Unlike the flag it is reloaded live.
	LogLevel string `json:"log_level,omitempty"`
}

// GatewayConn says where and how the agent connects.
type GatewayConn struct {
	// URL is ws(s)://host:port/v1/tunnel.
	URL string `json:"url"`
	// URLs lists several gateway replicas' URLs, instead of URL.
	URLs []string `json:"urls,omitempty"`
	// Connections is how many sessions the agent keeps, each to a
	// distinct gateway replica. 0: min(2, the number of gateway
	// addresses the URLs resolve to).
	Connections int    `json:"connections,omitempty"`
	Token       string `json:"token"`
	// Protocol is auto (yamux when offered), yamux or json.
	Protocol string `json:"protocol"`
	// CAFile is a PEM bundle to trust instead of the system roots.
	CAFile string `json:"ca_file,omitempty"`
	// ServerName overrides the TLS server name.
	ServerName string `json:"server_name,omitempty"`
	// Insecure allows a plain ws:// URL to a host other than loopback,
	// which sends the token and all traffic in clear.
	Insecure bool `json:"insecure,omitempty"`
}

// Metrics configures the agent's HTTP server for /metrics, /healthz and
// /readyz. An empty listen disables it.
type Metrics struct {
	Listen string `json:"listen"`
}

// Kubernetes configures discovery through the Kubernetes API.
type Kubernetes struct {
	Enabled bool `json:"enabled"`
	// Kubeconfig is a kubeconfig path; empty means in-cluster config (or
	// the KUBECONFIG variable when set).
	Kubeconfig string `json:"kubeconfig"`
}

// Tunnels is the PipeOps agent's tunnels: block (docs/compatibility.md).
type Tunnels struct {
	// Enabled turns Kubernetes discovery of tunnel services on or off.
	Enabled   bool      `json:"enabled"`
	Routing   Routing   `json:"routing"`
	Discovery Discovery `json:"discovery"`
	TCP       TCP       `json:"tcp"`
	UDP       UDP       `json:"udp"`
}

// Routing picks how discovered Gateways are exposed.
type Routing struct {
	ForceTunnelMode bool `json:"force_tunnel_mode"`
	DualModeEnabled bool `json:"dual_mode_enabled"`
}

// Discovery selects which Gateways are managed.
type Discovery struct {
	TCP DiscoverySource `json:"tcp"`
	UDP DiscoverySource `json:"udp"`
	// GatewayNamespaces are the namespaces where a labelled Gateway is
	// managed. Routes beside such a Gateway may use Services of any
	// namespace, so the list names only namespaces the operator controls.
	// Empty means the agent's own namespace.
	GatewayNamespaces []string `json:"gateway_namespaces,omitempty"`
	// GatewayClasses, when not empty, also limits managed Gateways to
	// these spec.gatewayClassName values.
	GatewayClasses []string `json:"gateway_classes,omitempty"`
}

// DiscoverySource is one protocol's discovery switch and Gateway label.
type DiscoverySource struct {
	Enabled      bool   `json:"enabled"`
	GatewayLabel string `json:"gateway_label"`
}

// TCP holds the TCP tunnel settings.
type TCP struct {
	BufferSize        int      `json:"buffer_size"`
	Keepalive         bool     `json:"keepalive"`
	KeepalivePeriod   Duration `json:"keepalive_period"`
	ConnectionTimeout Duration `json:"connection_timeout"`
	IdleTimeout       Duration `json:"idle_timeout"`
	MaxConnections    int      `json:"max_connections"`
}

// UDP holds the UDP tunnel settings.
type UDP struct {
	BufferSize     int      `json:"buffer_size"`
	SessionTimeout Duration `json:"session_timeout"`
	MaxSessions    int      `json:"max_sessions"`
}

// StaticService is one entry of services:.
type StaticService struct {
	Name     string `json:"name"`
	Protocol string `json:"protocol"`
	// Port is the port the service is known by; the gateway prefers
	// 10000+port as the public port.
	Port int `json:"port"`
	// Backend is host:port the agent dials.
	Backend string `json:"backend"`
	// PublicPort asks the gateway for this exact public port.
	PublicPort int `json:"public_port,omitempty"`
	// ProxyProtocol is the PROXY protocol header the agent writes to the
	// backend before the client's data: "" (none), "v1" or "v2" (UDP:
	// "v2" only, at the start of every datagram).
	ProxyProtocol string `json:"proxy_protocol,omitempty"`
	// SourcePolicy is the service's allow/deny lists and per-source
	// limits, enforced by the gateway within its ceiling for the agent.
	SourcePolicy
}

// DefaultLabel is the PipeOps agent's Gateway label for discovery.
const DefaultLabel = "pipeops.io/managed"

// DefaultAgent returns the agent defaults: the PipeOps agent's documented values.
func DefaultAgent() *AgentFile {
	return &AgentFile{
		Gateway: GatewayConn{Protocol: "auto"},
		Metrics: Metrics{Listen: "127.0.0.1:9090"},
		Tunnels: Tunnels{
			Enabled: true,
			Discovery: Discovery{
				TCP: DiscoverySource{Enabled: true, GatewayLabel: DefaultLabel},
				UDP: DiscoverySource{Enabled: true, GatewayLabel: DefaultLabel},
			},
			TCP: TCP{
				BufferSize:        32768,
				Keepalive:         true,
				KeepalivePeriod:   D(30 * time.Second),
				ConnectionTimeout: D(30 * time.Second),
				IdleTimeout:       D(5 * time.Minute),
				MaxConnections:    1000,
			},
			UDP: UDP{
				BufferSize:     65535,
				SessionTimeout: D(5 * time.Minute),
				MaxSessions:    10000,
			},
		},
	}
}

// ParseAgent parses agent.yaml over the defaults, applies environment
// overrides and validates the result.
func ParseAgent(data []byte, getenv func(string) string) (*AgentFile, error) {
	return parseAgent("", data, getenv, nil)
}

// parseAgent is ParseAgent for the file called name ("" for none), which
// prefixes every problem with name:line.
func parseAgent(name string, data []byte, getenv func(string) string, override func(*AgentFile)) (*AgentFile, error) {
	a := DefaultAgent()
	lines, err := parseStrict(name, data, a)
	if err != nil {
		return nil, err
	}
	a.ApplyEnv(getenv)
	if override != nil {
		override(a)
	}
	if err := a.Validate(); err != nil {
		return nil, withLines(name, lines, err)
	}
	return a, nil
}

// LoadAgent reads and parses an agent config file.
func LoadAgent(path string, getenv func(string) string) (*AgentFile, error) {
	return LoadAgentWith(path, getenv, nil)
}

// LoadAgentWith is LoadAgent with override (the command line's flags)
// applied after the file and the environment and before validation, so
// that a flag can supply what the file lacks.
func LoadAgentWith(path string, getenv func(string) string, override func(*AgentFile)) (*AgentFile, error) {
	b, err := readFile(path)
	if err != nil {
		return nil, err
	}
	return parseAgent(path, b, getenv, override)
}

// ApplyEnv applies PORTWAY_GATEWAY_TOKEN and PORTWAY_GATEWAY_URL.
func (a *AgentFile) ApplyEnv(getenv func(string) string) {
	if getenv == nil {
		return
	}
	if v := getenv("PORTWAY_GATEWAY_TOKEN"); v != "" {
		a.Gateway.Token = v
	}
	if v := getenv("PORTWAY_GATEWAY_URL"); v != "" {
		a.Gateway.URL = v
	}
}

// Validate checks every key and returns all problems found.
func (a *AgentFile) Validate() error {
	var p problems
	switch {
	case a.Gateway.URL != "" && len(a.Gateway.URLs) > 0:
		p.add("gateway.url", "and gateway.urls are both set: give one URL in gateway.url or several in gateway.urls")
	case len(a.Gateway.URLs) > 0:
		seen := map[string]bool{}
		for i, u := range a.Gateway.URLs {
			key := fmt.Sprintf("gateway.urls[%d]", i)
			if seen[u] {
				p.add(key, "%q is listed twice", u)
				continue
			}
			seen[u] = true
			a.checkGatewayURL(&p, key, u)
		}
	case a.Gateway.URL == "":
		p.add("gateway.url", "is required (or set PORTWAY_GATEWAY_URL, or list several in gateway.urls)")
	default:
		a.checkGatewayURL(&p, "gateway.url", a.Gateway.URL)
	}
	p.intRange("gateway.connections", a.Gateway.Connections, 0, maxGatewayConnections)
	if a.Gateway.Token == "" {
		p.add("gateway.token", "is required (or set PORTWAY_GATEWAY_TOKEN)")
	}
	switch a.Gateway.Protocol {
	case "auto", protocol.ProtocolYamux, protocol.ProtocolJSON:
	default:
		p.add("gateway.protocol", "%q is not auto, yamux or json", a.Gateway.Protocol)
	}
	p.hostPort("metrics.listen", a.Metrics.Listen, false)

	t := &a.Tunnels
	for key, d := range map[string]*DiscoverySource{"tunnels.discovery.tcp": &t.Discovery.TCP, "tunnels.discovery.udp": &t.Discovery.UDP} {
		if d.Enabled && d.GatewayLabel == "" {
			p.add(key+".gateway_label", "is required when discovery is enabled")
		}
	}
	p.names("tunnels.discovery.gateway_namespaces", t.Discovery.GatewayNamespaces, 63, false, "a namespace name")
	p.names("tunnels.discovery.gateway_classes", t.Discovery.GatewayClasses, 253, true, "a GatewayClass name")
	p.intRange("tunnels.tcp.buffer_size", t.TCP.BufferSize, 512, 16<<20)
	if t.TCP.Keepalive {
		p.duration("tunnels.tcp.keepalive_period", t.TCP.KeepalivePeriod, time.Second, 0, false)
	}
	p.duration("tunnels.tcp.connection_timeout", t.TCP.ConnectionTimeout, 10*time.Millisecond, 0, false)
	p.duration("tunnels.tcp.idle_timeout", t.TCP.IdleTimeout, 100*time.Millisecond, 0, true)
	p.intRange("tunnels.tcp.max_connections", t.TCP.MaxConnections, 1, 1<<20)
	p.intRange("tunnels.udp.buffer_size", t.UDP.BufferSize, 1, protocol.MaxDatagram)
	p.duration("tunnels.udp.session_timeout", t.UDP.SessionTimeout, 100*time.Millisecond, 0, false)
	p.intRange("tunnels.udp.max_sessions", t.UDP.MaxSessions, 1, 1<<20)

	seen := map[string]bool{}
	for i, s := range a.Services {
		key := fmt.Sprintf("services[%d]", i)
		if err := protocol.ValidateServiceID(s.Name); err != nil {
			p.add(key+".name", "%v", err)
		}
		if s.Protocol == "" {
			a.Services[i].Protocol = "tcp"
			s.Protocol = "tcp"
		}
		if _, err := protocol.ParseKind(s.Protocol); err != nil {
			p.add(key+".protocol", "%q is neither tcp nor udp", s.Protocol)
		}
		if seen[s.Protocol+"/"+s.Name] {
			p.add(key+".name", "%s service %q is listed twice", s.Protocol, s.Name)
		}
		seen[s.Protocol+"/"+s.Name] = true
		p.intRange(key+".port", s.Port, 1, 65535)
		p.hostPort(key+".backend", s.Backend, true)
		if s.PublicPort != 0 {
			p.intRange(key+".public_port", s.PublicPort, 1, 65535)
		}
		validateProxyProtocol(&p, key+".proxy_protocol", s.ProxyProtocol, s.Protocol)
		s.SourcePolicy.validate(&p, key)
	}
	p.logLevel("log_level", a.LogLevel)
	return p.err()
}

// maxGatewayConnections bounds gateway.connections: each is a session with
// its own heartbeats and registration.
const maxGatewayConnections = 16

// checkGatewayURL checks one gateway URL under key.
func (a *AgentFile) checkGatewayURL(p *problems, key, raw string) {
	if raw == "" {
		p.add(key, "is empty")
	} else if u, err := url.Parse(raw); err != nil {
		p.add(key, "%v", err)
	} else if u.Scheme != "ws" && u.Scheme != "wss" {
		p.add(key, "%q must start with wss:// (or ws:// for a gateway with insecure: true)", raw)
	} else if u.Host == "" {
		p.add(key, "%q has no host", raw)
	} else if u.Scheme == "ws" && !a.Gateway.Insecure && !isLoopbackHost(u.Hostname()) {
		p.add(key, "%q is plain ws:// to a host other than loopback, which would send the token in clear: use wss://, or set gateway.insecure: true to accept that", raw)
	}
}

// GatewayURLs returns the gateway URLs: gateway.urls, or gateway.url alone.
func (g *GatewayConn) GatewayURLs() []string {
	if len(g.URLs) > 0 {
		return g.URLs
	}
	if g.URL == "" {
		return nil
	}
	return []string{g.URL}
}

// isLoopbackHost reports whether host (a URL's hostname) names this machine:
// localhost, or an address in 127.0.0.0/8 or ::1. Plain ws:// stays allowed
// there without opting in, since the traffic never leaves the host.
func isLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// names checks a list of Kubernetes object names: DNS-1123 labels (at
// most max characters), or subdomains (labels joined by dots) when dots is
// set; each listed once.
func (p *problems) names(key string, vs []string, max int, dots bool, what string) {
	seen := map[string]bool{}
	for i, v := range vs {
		k := fmt.Sprintf("%s[%d]", key, i)
		switch {
		case !isDNSName(v, max, dots):
			p.add(k, "%q is not %s (lower-case letters, digits and '-', at most %d characters)", v, what, max)
		case seen[v]:
			p.add(k, "%q is listed twice", v)
		}
		seen[v] = true
	}
}

// isDNSName reports whether v is a DNS-1123 label of at most max
// characters, or with dots a DNS-1123 subdomain, as Kubernetes names are.
func isDNSName(v string, max int, dots bool) bool {
	if v == "" || len(v) > max {
		return false
	}
	for _, l := range strings.Split(v, ".") {
		if l == "" || len(l) > 63 || (!dots && l != v) {
			return false
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
			if !alnum && (c != '-' || i == 0 || i == len(l)-1) {
				return false
			}
		}
	}
	return true
}
