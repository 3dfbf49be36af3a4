package config

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/portway/portway/internal/protocol"
)

// GatewayFile is gateway.yaml.
type GatewayFile struct {
	// Listen is where agents connect (path /v1/tunnel).
	Listen string `json:"listen"`
	// PublicHost is the host name printed in endpoints.
	PublicHost string `json:"public_host"`
	// PortRange is the public ports the gateway may allocate, "low-high".
	PortRange string `json:"port_range"`
	// BindAddress is where public listeners bind.
	BindAddress string `json:"bind_address"`
	// StateFile persists port allocations; empty keeps them in memory only.
	StateFile string `json:"state_file"`
	TLS       *TLS   `json:"tls,omitempty"`
	// Insecure allows plain ws:// when no TLS is configured.
	Insecure bool `json:"insecure"`
	// Protocols are offered in gateway_hello, in order of preference.
	Protocols []string        `json:"protocols"`
	Agents    []AgentIdentity `json:"agents"`
	// AgentsFile names a file of more agent identities, one a line
	// (agentsfile.go has the format). It is read at start and on every
	// reload; its agents are in FileAgents.
	AgentsFile string `json:"agents_file,omitempty"`
	// FileAgents are the identities read from AgentsFile.
	FileAgents []AgentIdentity `json:"-"`
	Admin      Admin           `json:"admin"`

	// HeartbeatInterval is announced to agents; a peer silent for 2.5
	// intervals is considered dead.
	HeartbeatInterval Duration `json:"heartbeat_interval"`
	// MaxMessageSize bounds every WebSocket message, both directions.
	MaxMessageSize int `json:"max_message_size"`
	// StreamWindow is the per-stream credit in JSON mode.
	StreamWindow int `json:"stream_window"`
	// MaxStreamWindow caps a yamux stream's auto-tuned receive window.
	MaxStreamWindow int `json:"max_stream_window"`
	// MaxServices is the default quota of services per agent.
	MaxServices int `json:"max_services"`
	// PortRetention is how long a withdrawn service's port stays reserved
	// for its agent.
	PortRetention Duration `json:"port_retention"`
	// MaxRetainedPorts caps the withdrawn services' ports one agent keeps
	// reserved; beyond it the oldest are freed. 0: twice the agent's
	// max_services.
	MaxRetainedPorts int `json:"max_retained_ports"`
	// BufferSize is the copy buffer per direction of a public connection.
	BufferSize int `json:"buffer_size"`
	// AuthFailuresPerMinute limits failed token attempts per source
	// address; further attempts get HTTP 429 until the minute passes.
	AuthFailuresPerMinute int `json:"auth_failures_per_minute"`
	// HandshakeTimeout bounds the HTTP upgrade and the hello exchange.
	HandshakeTimeout Duration `json:"handshake_timeout"`
	// MaxConcurrentHandshakes bounds the agent handshakes in progress at
	// once; beyond it agents get HTTP 503 with Retry-After and come back
	// later, so a reconnect storm queues instead of piling up.
	MaxConcurrentHandshakes int `json:"max_concurrent_handshakes"`
	// UDPQueueBytes bounds the bytes of UDP datagrams queued toward
	// agents, all services together; datagrams beyond it are dropped.
	UDPQueueBytes int `json:"udp_queue_bytes"`
	// UDPQueueBytesPerService bounds them for each UDP service.
	UDPQueueBytesPerService int `json:"udp_queue_bytes_per_service"`
	// LogLevel is debug, info, warn or error; empty keeps --log-level.
	// Unlike the flag it is reloaded live.
	LogLevel string `json:"log_level,omitempty"`
	// ProxyProtocolFrom are the sources (load balancers) whose
	// connections to public listeners and to the agent endpoint must start
	// with a PROXY protocol v1 or v2 header; empty: no header is read.
	ProxyProtocolFrom []string `json:"proxy_protocol_from,omitempty"`
	// Cluster, when set, shares port allocations with other replicas in
	// etcd instead of state_file (cluster.go).
	Cluster *Cluster `json:"cluster,omitempty"`

	// portLow and portHigh are PortRange, parsed by Validate.
	portLow, portHigh int
	// proxyFrom and ceilings are ProxyProtocolFrom and the agents'
	// allow/deny lists, parsed by Validate.
	proxyFrom []netip.Prefix
	ceilings  map[string]*Ceiling
}

// TLS names the certificate for the agent endpoint.
type TLS struct {
	CertFile string `json:"cert_file"`
	KeyFile  string `json:"key_file"`
}

// AgentIdentity is one identity allowed to connect.
type AgentIdentity struct {
	Name string `json:"name"`
	// Token is the bearer token; TokenSHA256 its hex SHA-256, so the
	// gateway's config need not hold the secret itself.
	Token       string `json:"token,omitempty"`
	TokenSHA256 string `json:"token_sha256,omitempty"`
	// TokenSHA256Next is a second accepted token's hex SHA-256, for a
	// rotation: the agent may switch to the new token while the old one
	// still works, and the old one is removed afterwards.
	TokenSHA256Next string `json:"token_sha256_next,omitempty"`
	// MaxServices overrides the gateway's max_services for this agent.
	MaxServices int `json:"max_services,omitempty"`
	// MaxRetainedPorts overrides the gateway's max_retained_ports for this
	// agent.
	MaxRetainedPorts int `json:"max_retained_ports,omitempty"`
	// AllowCIDRs and DenyCIDRs are the ceiling on every service of the
	// agent: a source must be allowed here (when the list is set) and not
	// denied here, whatever the agent asks; an agent's own allow list
	// must lie inside AllowCIDRs.
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`
	DenyCIDRs  []string `json:"deny_cidrs,omitempty"`
}

// Admin configures the admin HTTP server.
type Admin struct {
	// Listen is the admin address; empty disables the admin server.
	Listen string `json:"listen"`
	// Token protects /v1/*; /metrics, /healthz and /readyz are open.
	Token string `json:"token"`
}

// DefaultGateway returns the gateway defaults.
func DefaultGateway() *GatewayFile {
	return &GatewayFile{
		Listen:                  ":8443",
		PortRange:               "10000-19999",
		BindAddress:             "0.0.0.0",
		StateFile:               "/var/lib/portway/gateway.db",
		Protocols:               []string{protocol.ProtocolYamux, protocol.ProtocolJSON},
		HeartbeatInterval:       D(5 * time.Second),
		MaxMessageSize:          1 << 20,
		StreamWindow:            256 << 10,
		MaxStreamWindow:         16 << 20,
		MaxServices:             100,
		PortRetention:           D(7 * 24 * time.Hour),
		BufferSize:              32 << 10,
		AuthFailuresPerMinute:   10,
		HandshakeTimeout:        D(10 * time.Second),
		MaxConcurrentHandshakes: DefaultMaxConcurrentHandshakes,
		UDPQueueBytes:           64 << 20,
		UDPQueueBytesPerService: 8 << 20,
	}
}

// ParseGateway parses gateway.yaml over the defaults, applies environment
// overrides and validates the result.
func ParseGateway(data []byte, getenv func(string) string) (*GatewayFile, error) {
	return parseGateway("", data, getenv, nil)
}

// parseGateway is ParseGateway for the file called name ("" for none),
// which prefixes every problem with name:line.
func parseGateway(name string, data []byte, getenv func(string) string, override func(*GatewayFile)) (*GatewayFile, error) {
	g := DefaultGateway()
	lines, err := parseStrict(name, data, g)
	if err != nil {
		return nil, err
	}
	g.applyEnv(getenv)
	if override != nil {
		override(g)
	}
	// The agents file's problems name its own lines; they are reported
	// with whatever else is wrong.
	fileErr := g.loadAgentsFile()
	if err := errors.Join(withLines(name, lines, g.Validate()), fileErr); err != nil {
		return nil, err
	}
	return g, nil
}

// DefaultMaxConcurrentHandshakes is max_concurrent_handshakes' default:
// enough that agents arriving one by one never wait, few enough that a
// storm of thousands costs the gateway a bounded amount at a time.
const DefaultMaxConcurrentHandshakes = 64

// LoadGateway reads and parses a gateway config file.
func LoadGateway(path string, getenv func(string) string) (*GatewayFile, error) {
	return LoadGatewayWith(path, getenv, nil)
}

// LoadGatewayWith is LoadGateway with override (the command line's flags)
// applied after the file and the environment and before validation, so
// that a flag can supply what the file lacks.
func LoadGatewayWith(path string, getenv func(string) string, override func(*GatewayFile)) (*GatewayFile, error) {
	b, err := readFile(path)
	if err != nil {
		return nil, err
	}
	return parseGateway(path, b, getenv, override)
}

// applyEnv lets secrets come from the environment: PORTWAY_ADMIN_TOKEN for
// admin.token, PORTWAY_AGENT_TOKEN_<NAME> for an agent's token, and the
// cluster's (applyClusterEnv).
func (g *GatewayFile) applyEnv(getenv func(string) string) {
	if getenv == nil {
		return
	}
	if v := getenv("PORTWAY_ADMIN_TOKEN"); v != "" {
		g.Admin.Token = v
	}
	for i := range g.Agents {
		if v := getenv("PORTWAY_AGENT_TOKEN_" + envName(g.Agents[i].Name)); v != "" {
			g.Agents[i].Token = v
			g.Agents[i].TokenSHA256 = ""
		}
	}
	g.applyClusterEnv(getenv)
}

// MinTokenLength is the shortest token accepted: tokens are the only thing
// between the internet and the agents' backends.
const MinTokenLength = 16

// Validate checks every key and returns all problems found.
func (g *GatewayFile) Validate() error {
	var p problems
	p.hostPort("listen", g.Listen, true)
	if g.PublicHost == "" {
		g.PublicHost = defaultPublicHost(g.BindAddress)
	}
	if strings.ContainsAny(g.PublicHost, " /:") && !isIPv6(g.PublicHost) {
		p.add("public_host", "%q is not a host name or address", g.PublicHost)
	}
	lo, hi, err := ParsePortRange(g.PortRange)
	if err != nil {
		p.add("port_range", "%v", err)
	}
	g.portLow, g.portHigh = lo, hi
	if _, err := netip.ParseAddr(g.BindAddress); err != nil {
		p.add("bind_address", "%q is not an IP address", g.BindAddress)
	}
	if g.TLS != nil {
		if g.TLS.CertFile == "" || g.TLS.KeyFile == "" {
			p.add("tls", "cert_file and key_file are both required")
		}
		for key, f := range map[string]string{"tls.cert_file": g.TLS.CertFile, "tls.key_file": g.TLS.KeyFile} {
			if f != "" {
				if _, err := os.Stat(f); err != nil {
					p.add(key, "%v", err)
				}
			}
		}
	} else if !g.Insecure {
		p.add("tls", "tls.cert_file and tls.key_file are required unless insecure: true")
	}
	if len(g.Protocols) == 0 {
		p.add("protocols", "must offer at least one of yamux, json")
	}
	seenProto := map[string]bool{}
	for i, pr := range g.Protocols {
		if pr != protocol.ProtocolYamux && pr != protocol.ProtocolJSON {
			p.add(fmt.Sprintf("protocols[%d]", i), "%q is neither yamux nor json", pr)
		}
		if seenProto[pr] {
			p.add(fmt.Sprintf("protocols[%d]", i), "%q listed twice", pr)
		}
		seenProto[pr] = true
	}
	g.validateAgents(&p)
	g.validateAccess(&p)
	if g.Admin.Listen != "" {
		p.hostPort("admin.listen", g.Admin.Listen, false)
		if g.Admin.Token == "" {
			p.add("admin.token", "is required when admin.listen is set (or set PORTWAY_ADMIN_TOKEN)")
		}
	}
	p.duration("heartbeat_interval", g.HeartbeatInterval, protocol.MinHeartbeat, protocol.MaxHeartbeat, false)
	p.intRange("max_message_size", g.MaxMessageSize, protocol.MinMessageSize, protocol.MaxMessageSize)
	p.intRange("stream_window", g.StreamWindow, protocol.MinStreamWindow, protocol.MaxStreamWindow)
	p.intRange("max_stream_window", g.MaxStreamWindow, 256<<10, 1<<30)
	p.intRange("max_services", g.MaxServices, 1, protocol.MaxRegisterServices)
	p.duration("port_retention", g.PortRetention, 0, 0, true)
	p.intRange("max_retained_ports", g.MaxRetainedPorts, 0, maxRetainedPorts)
	if g.MaxRetainedPorts > 0 && g.MaxRetainedPorts < g.MaxServices {
		p.add("max_retained_ports", "%d is below max_services (%d): a reconnecting agent would lose ports", g.MaxRetainedPorts, g.MaxServices)
	}
	p.intRange("buffer_size", g.BufferSize, 512, 16<<20)
	p.intRange("auth_failures_per_minute", g.AuthFailuresPerMinute, 1, 1<<20)
	p.duration("handshake_timeout", g.HandshakeTimeout, 100*time.Millisecond, 10*time.Minute, false)
	p.intRange("max_concurrent_handshakes", g.MaxConcurrentHandshakes, 1, 1<<16)
	// At least one largest datagram must fit.
	p.intRange("udp_queue_bytes", g.UDPQueueBytes, 64<<10, 1<<30)
	p.intRange("udp_queue_bytes_per_service", g.UDPQueueBytesPerService, 64<<10, 1<<30)
	p.logLevel("log_level", g.LogLevel)
	g.validateCluster(&p)
	return p.err()
}

func (g *GatewayFile) validateAgents(p *problems) {
	names := map[string]bool{}
	for i := range g.Agents {
		a := &g.Agents[i]
		key := fmt.Sprintf("agents[%d]", i)
		if a.Name == "" {
			p.add(key+".name", "is required")
		} else if err := protocol.ValidateServiceID(a.Name); err != nil || strings.Contains(a.Name, "/") {
			p.add(key+".name", "%q may hold only letters, digits and . _ -", a.Name)
		}
		if names[a.Name] {
			p.add(key+".name", "%q is listed twice", a.Name)
		}
		names[a.Name] = true
		switch {
		case a.Token != "" && a.TokenSHA256 != "":
			p.add(key, "set token or token_sha256, not both")
		case a.Token != "":
			if len(a.Token) < MinTokenLength {
				p.add(key+".token", "is shorter than %d characters", MinTokenLength)
			}
		case a.TokenSHA256 != "":
			if b, err := hex.DecodeString(a.TokenSHA256); err != nil || len(b) != 32 {
				p.add(key+".token_sha256", "must be 64 hex digits")
			}
		default:
			p.add(key, "token or token_sha256 is required (or set PORTWAY_AGENT_TOKEN_%s)", envName(a.Name))
		}
		if a.TokenSHA256Next != "" {
			if b, err := hex.DecodeString(a.TokenSHA256Next); err != nil || len(b) != 32 {
				p.add(key+".token_sha256_next", "must be 64 hex digits")
			} else if strings.EqualFold(a.TokenSHA256Next, a.TokenSHA256) {
				p.add(key+".token_sha256_next", "is the same as token_sha256")
			}
		}
		if a.MaxServices < 0 || a.MaxServices > protocol.MaxRegisterServices {
			p.add(key+".max_services", "%d is outside 0-%d", a.MaxServices, protocol.MaxRegisterServices)
		}
		g.validateRetained(p, key, a)
	}
	for i := range g.FileAgents {
		a := &g.FileAgents[i]
		g.validateRetained(p, fmt.Sprintf("agents_file %s: agent %q", g.AgentsFile, a.Name), a)
	}
}

// maxRetainedPorts bounds max_retained_ports: every TCP and UDP port.
const maxRetainedPorts = 2 * 65535

// validateRetained checks the retained-port cap that applies to agent a
// (agents[i] is key): it may not be below the agent's max_services, or an
// agent that reconnects with all its services would lose some of their
// ports.
func (g *GatewayFile) validateRetained(p *problems, key string, a *AgentIdentity) {
	if a.MaxRetainedPorts < 0 || a.MaxRetainedPorts > maxRetainedPorts {
		p.add(key+".max_retained_ports", "%d is outside 0-%d", a.MaxRetainedPorts, maxRetainedPorts)
		return
	}
	services := a.MaxServices
	if services == 0 {
		services = g.MaxServices
	}
	switch limit := g.RetainedPortsCap(a); {
	case limit >= services:
	case a.MaxRetainedPorts != 0:
		p.add(key+".max_retained_ports", "%d is below this agent's max_services (%d): a reconnecting agent would lose ports", limit, services)
	case a.MaxServices != 0: // else reported for the gateway-wide keys
		p.add("max_retained_ports", "%d is below the max_services (%d) of %s (%q): a reconnecting agent would lose ports; raise it or set %s.max_retained_ports", limit, services, key, a.Name, key)
	}
}

// RetainedPortsCap returns how many retained port allocations (ports of
// withdrawn or disconnected services, kept for port_retention) the agent
// entry a may hold: its max_retained_ports, else the gateway's, else twice
// its max_services. a nil (an agent no longer configured) gets the
// gateway-wide default.
func (g *GatewayFile) RetainedPortsCap(a *AgentIdentity) int {
	services := g.MaxServices
	if a != nil {
		if a.MaxRetainedPorts > 0 {
			return a.MaxRetainedPorts
		}
		if a.MaxServices > 0 {
			services = a.MaxServices
		}
	}
	if g.MaxRetainedPorts > 0 {
		return g.MaxRetainedPorts
	}
	return 2 * services
}

// PortBounds returns the parsed port_range (after Validate).
func (g *GatewayFile) PortBounds() (low, high int) { return g.portLow, g.portHigh }

// ParsePortRange parses "low-high" (or a single port).
func ParsePortRange(s string) (int, int, error) {
	lo, hi, found := strings.Cut(s, "-")
	if !found {
		hi = lo
	}
	l, err1 := strconv.Atoi(strings.TrimSpace(lo))
	h, err2 := strconv.Atoi(strings.TrimSpace(hi))
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("%q is not a range like 10000-19999", s)
	}
	if l < 1 || h > 65535 || l > h {
		return 0, 0, fmt.Errorf("%q must satisfy 1 <= low <= high <= 65535", s)
	}
	return l, h, nil
}

func defaultPublicHost(bind string) string {
	if a, err := netip.ParseAddr(bind); err == nil && !a.IsUnspecified() {
		return a.String()
	}
	if h, err := os.Hostname(); err == nil && h != "" {
		return h
	}
	return "localhost"
}

func isIPv6(s string) bool {
	ip := net.ParseIP(s)
	return ip != nil && ip.To4() == nil
}
