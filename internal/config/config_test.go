package config

import (
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestGatewayDefaultsAndKeys(t *testing.T) {
	g, err := ParseGateway([]byte(`
listen: "127.0.0.1:8443"
public_host: gw.example.com
port_range: "20000-20100"
bind_address: 127.0.0.1
state_file: ""
insecure: true
protocols: [json]
agents:
  - {name: prod-eu, token: "0123456789abcdef0123"}
  - {name: dev, token_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
admin: {listen: "127.0.0.1:9000", token: admin-secret}
heartbeat_interval: 2s
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	if lo, hi := g.PortBounds(); lo != 20000 || hi != 20100 {
		t.Errorf("port bounds %d-%d", lo, hi)
	}
	if g.HeartbeatInterval.Duration != 2*time.Second || g.MaxMessageSize != 1<<20 || g.Protocols[0] != "json" || len(g.Protocols) != 1 {
		t.Errorf("parsed %+v", g)
	}
	if g.StateFile != "" {
		t.Errorf("state_file \"\" not kept: %q", g.StateFile)
	}
}

func TestGatewayEnvOverrides(t *testing.T) {
	g, err := ParseGateway([]byte(`
insecure: true
agents: [{name: prod-eu}]
admin: {listen: "127.0.0.1:9000"}
`), env(map[string]string{"PORTWAY_AGENT_TOKEN_PROD_EU": "from-the-environment", "PORTWAY_ADMIN_TOKEN": "adm"}))
	if err != nil {
		t.Fatal(err)
	}
	if g.Agents[0].Token != "from-the-environment" || g.Admin.Token != "adm" {
		t.Fatalf("env not applied: %+v %+v", g.Agents[0], g.Admin)
	}
}

func TestGatewayErrorsNameTheKey(t *testing.T) {
	cases := map[string]string{
		`insecure: true
listen: nowhere`: "listen:",
		`insecure: true
port_range: "20000-10000"`: "port_range:",
		`insecure: true
bind_address: localhost`: "bind_address:",
		`listen: ":8443"`: "tls:",
		`insecure: true
tls: {cert_file: /nonexistent/cert.pem, key_file: /nonexistent/key.pem}`: "tls.cert_file:",
		`insecure: true
protocols: [smux]`: "protocols[0]:",
		`insecure: true
agents: [{name: a, token: short}]`: "agents[0].token: is shorter",
		`insecure: true
agents: [{name: a, token_sha256: xyz}]`: "agents[0].token_sha256:",
		`insecure: true
agents: [{name: a, token: 0123456789abcdef0, token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}]`: "not both",
		`insecure: true
agents: [{name: "a b", token: 0123456789abcdef0}]`: "agents[0].name:",
		`insecure: true
agents: [{name: a, token: 0123456789abcdef0}, {name: a, token: 0123456789abcdef1}]`: "listed twice",
		`insecure: true
admin: {listen: "127.0.0.1:9000"}`: "admin.token:",
		`insecure: true
heartbeat_interval: 5`: "heartbeat_interval: \"5\" is not a duration",
		`insecure: true
heartbeat_interval: 1ms`: "heartbeat_interval: 1ms is below",
		`insecure: true
max_message_size: 10`: "max_message_size:",
		`insecure: true
listne: ":1"`: `unknown key "listne"`,
		`insecure: true
port_range: [1, 2]`: "port_range",
		`{{{`: "config:",
	}
	for in, want := range cases {
		_, err := ParseGateway([]byte(in), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: err = %v, want it to contain %q", in, err, want)
		}
	}
}

func TestAgentDefaultsAreTheSeeds(t *testing.T) {
	a, err := ParseAgent([]byte(`gateway: {url: "wss://gw.example.com:8443/v1/tunnel", token: t}`), nil)
	if err != nil {
		t.Fatal(err)
	}
	tt := a.Tunnels
	if !tt.Enabled || !tt.Discovery.TCP.Enabled || tt.Discovery.UDP.GatewayLabel != "pipeops.io/managed" ||
		tt.TCP.BufferSize != 32768 || !tt.TCP.Keepalive || tt.TCP.KeepalivePeriod.Duration != 30*time.Second ||
		tt.TCP.ConnectionTimeout.Duration != 30*time.Second || tt.TCP.IdleTimeout.Duration != 5*time.Minute ||
		tt.TCP.MaxConnections != 1000 || tt.UDP.BufferSize != 65535 || tt.UDP.SessionTimeout.Duration != 5*time.Minute ||
		tt.UDP.MaxSessions != 10000 || a.Gateway.Protocol != "auto" || a.Metrics.Listen != "127.0.0.1:9090" {
		t.Fatalf("defaults differ from the seed: %+v", tt)
	}
}

func TestAgentSeedBlockParses(t *testing.T) {
	// The seed's full configuration reference, verbatim.
	a, err := ParseAgent([]byte(`
gateway: {url: "ws://127.0.0.1:8443/v1/tunnel", protocol: json}
tunnels:
  enabled: true
  routing:
    force_tunnel_mode: true
    dual_mode_enabled: true
  discovery:
    tcp:
      enabled: true
      gateway_label: "pipeops.io/managed"
    udp:
      enabled: true
      gateway_label: "pipeops.io/managed"
  tcp:
    buffer_size: 32768
    keepalive: true
    keepalive_period: "30s"
    connection_timeout: "30s"
    idle_timeout: "5m"
    max_connections: 1000
  udp:
    buffer_size: 65535
    session_timeout: "5m"
    max_sessions: 10000
services:
  - {name: redis, protocol: tcp, port: 6379, backend: "127.0.0.1:6379"}
  - {name: dns, protocol: udp, port: 53, backend: "127.0.0.1:53"}
  - {name: pg, port: 5432, backend: "db:5432", public_port: 15000}
`), env(map[string]string{"PORTWAY_GATEWAY_TOKEN": "tok"}))
	if err != nil {
		t.Fatal(err)
	}
	if a.Gateway.Token != "tok" || len(a.Services) != 3 || a.Services[2].Protocol != "tcp" || !a.Tunnels.Routing.ForceTunnelMode {
		t.Fatalf("parsed %+v", a)
	}
}

func TestAgentErrorsNameTheKey(t *testing.T) {
	base := "gateway: {url: \"ws://h:1/v1/tunnel\", token: t}\n"
	cases := map[string]string{
		`gateway: {token: t}`:                                                                           "gateway.url: is required",
		`gateway: {url: "http://h/v1/tunnel", token: t}`:                                                "gateway.url:",
		`gateway: {url: "ws://h:1/"}`:                                                                   "gateway.token: is required",
		`gateway: {url: "ws://h:1/", token: t, protocol: smux}`:                                         "gateway.protocol:",
		base + "tunnels: {tcp: {idle_timeout: 5x}}":                                                     "tunnels.tcp.idle_timeout: \"5x\"",
		base + "tunnels: {tcp: {keepalive_period: 0s}}":                                                 "tunnels.tcp.keepalive_period:",
		base + "tunnels: {tcp: {connection_timeout: 0s}}":                                               "tunnels.tcp.connection_timeout:",
		base + "tunnels: {tcp: {max_connections: 0}}":                                                   "tunnels.tcp.max_connections:",
		base + "tunnels: {udp: {buffer_size: 70000}}":                                                   "tunnels.udp.buffer_size:",
		base + "tunnels: {udp: {session_timeout: 0s}}":                                                  "tunnels.udp.session_timeout:",
		base + "tunnels: {discovery: {tcp: {gateway_label: \"\"}}}":                                     "tunnels.discovery.tcp.gateway_label:",
		base + "services: [{name: r, port: 70000, backend: \"h:1\"}]":                                   "services[0].port:",
		base + "services: [{name: r, port: 1, backend: nohost}]":                                        "services[0].backend:",
		base + "services: [{name: r, protocol: sctp, port: 1, backend: \"h:1\"}]":                       "services[0].protocol:",
		base + "services: [{name: \"r x\", port: 1, backend: \"h:1\"}]":                                 "services[0].name:",
		base + "services: [{name: r, port: 1, backend: \"h:1\"}, {name: r, port: 2, backend: \"h:2\"}]": "listed twice",
		base + "tunels: {}": `unknown key "tunels"`,
	}
	for in, want := range cases {
		_, err := ParseAgent([]byte(in), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: err = %v, want it to contain %q", in, err, want)
		}
	}
}

// FuzzParseAgent and FuzzParseGateway check that no input panics the
// config parsers, and that accepted configs validate again.
func FuzzParseAgent(f *testing.F) {
	f.Add([]byte("gateway: {url: \"ws://h:1/v1/tunnel\", token: t}\nservices: [{name: r, port: 1, backend: \"h:1\"}]"))
	f.Add([]byte("tunnels: {tcp: {idle_timeout: 5m}}"))
	f.Add([]byte("- a\n- b"))
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := ParseAgent(b, nil)
		if err == nil {
			if err := a.Validate(); err != nil {
				t.Fatalf("accepted config fails validation: %v", err)
			}
		}
	})
}

func FuzzParseGateway(f *testing.F) {
	f.Add([]byte("insecure: true\nagents: [{name: a, token: 0123456789abcdef0}]"))
	f.Add([]byte("port_range: \"1-2\"\ninsecure: true"))
	f.Add([]byte("&a [*a]"))
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := ParseGateway(b, nil)
		if err == nil {
			if err := g.Validate(); err != nil {
				t.Fatalf("accepted config fails validation: %v", err)
			}
		}
	})
}
