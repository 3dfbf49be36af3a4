package config

import (
	"bytes"
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
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

func TestAgentDefaultsArePipeOps(t *testing.T) {
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
		t.Fatalf("defaults differ from the PipeOps agent's: %+v", tt)
	}
}

func TestAgentPipeOpsBlockParses(t *testing.T) {
	// The PipeOps agent's full configuration reference, verbatim.
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
	base := "gateway: {url: \"ws://127.0.0.1:1/v1/tunnel\", token: t}\n"
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

// Plain ws:// sends the token in clear: allowed to loopback, elsewhere only
// with gateway.insecure: true, and the refusal names both keys.
func TestAgentPlainWSNeedsInsecure(t *testing.T) {
	allowed := []string{
		`url: "ws://127.0.0.1:8443/v1/tunnel"`,
		`url: "ws://127.9.8.7:8443/v1/tunnel"`,
		`url: "ws://[::1]:8443/v1/tunnel"`,
		`url: "ws://[::ffff:127.0.0.1]:8443/v1/tunnel"`,
		`url: "ws://localhost:8443/v1/tunnel"`,
		`url: "ws://LocalHost/v1/tunnel"`,
		`url: "wss://gw.example.com:8443/v1/tunnel"`,
		`url: "wss://10.0.0.1:8443/v1/tunnel"`,
		`url: "ws://gw.example.com:8443/v1/tunnel", insecure: true`,
		`url: "ws://10.0.0.1:8443/v1/tunnel", insecure: true`,
	}
	for _, gw := range allowed {
		if _, err := ParseAgent([]byte("gateway: {token: t, "+gw+"}"), nil); err != nil {
			t.Errorf("gateway: {%s}: %v", gw, err)
		}
	}
	refused := []string{
		`url: "ws://gw.example.com:8443/v1/tunnel"`,
		`url: "ws://10.0.0.1:8443/v1/tunnel"`,
		`url: "ws://128.0.0.1:8443/v1/tunnel"`,
		`url: "ws://[::2]:8443/v1/tunnel"`,
		`url: "ws://0.0.0.0:8443/v1/tunnel"`,
		`url: "ws://localhost.example.com/v1/tunnel"`,
		`url: "ws://gw.example.com:8443/v1/tunnel", insecure: false`,
	}
	for _, gw := range refused {
		_, err := ParseAgent([]byte("gateway: {token: t, "+gw+"}"), nil)
		if err == nil || !strings.Contains(err.Error(), "gateway.url:") || !strings.Contains(err.Error(), "gateway.insecure: true") {
			t.Errorf("gateway: {%s}: err = %v, want one naming gateway.url and gateway.insecure", gw, err)
		}
	}
	// The URL may come from the environment: the check applies to it too.
	_, err := ParseAgent([]byte(`gateway: {token: t}`), env(map[string]string{"PORTWAY_GATEWAY_URL": "ws://gw.example.com/v1/tunnel"}))
	if err == nil || !strings.Contains(err.Error(), "gateway.insecure") {
		t.Errorf("ws:// from PORTWAY_GATEWAY_URL: err = %v", err)
	}
}

// The namespaces and classes that confine managed Gateways are Kubernetes
// names, each listed once; a mistake names the key and the entry.
func TestAgentGatewayScopeKeys(t *testing.T) {
	base := "gateway: {url: \"wss://h:1/v1/tunnel\", token: t}\n"
	a, err := ParseAgent([]byte(base+"tunnels: {discovery: {gateway_namespaces: [pipeops-system, edge-1], gateway_classes: [istio, gw.example.com]}}"), nil)
	if err != nil {
		t.Fatal(err)
	}
	d := a.Tunnels.Discovery
	if !slices.Equal(d.GatewayNamespaces, []string{"pipeops-system", "edge-1"}) || !slices.Equal(d.GatewayClasses, []string{"istio", "gw.example.com"}) {
		t.Errorf("parsed %+v", d)
	}
	if a, err := ParseAgent([]byte(base), nil); err != nil || a.Tunnels.Discovery.GatewayNamespaces != nil || a.Tunnels.Discovery.GatewayClasses != nil {
		t.Errorf("defaults: %+v %v; want both lists empty (the agent's namespace, any class)", a, err)
	}
	cases := map[string]string{
		"tunnels: {discovery: {gateway_namespaces: [\"\"]}}":                            `tunnels.discovery.gateway_namespaces[0]: "" is not a namespace name`,
		"tunnels: {discovery: {gateway_namespaces: [ok, Pipeops]}}":                     `tunnels.discovery.gateway_namespaces[1]: "Pipeops" is not a namespace name`,
		"tunnels: {discovery: {gateway_namespaces: [a.b]}}":                             `tunnels.discovery.gateway_namespaces[0]: "a.b" is not a namespace name`,
		"tunnels: {discovery: {gateway_namespaces: [-a]}}":                              `tunnels.discovery.gateway_namespaces[0]: "-a" is not`,
		"tunnels: {discovery: {gateway_namespaces: [a, b, a]}}":                         `tunnels.discovery.gateway_namespaces[2]: "a" is listed twice`,
		"tunnels: {discovery: {gateway_namespaces: \"*\"}}":                             `gateway_namespaces`,
		"tunnels: {discovery: {gateway_classes: [istio, \"x..y\"]}}":                    `tunnels.discovery.gateway_classes[1]: "x..y" is not a GatewayClass name`,
		"tunnels: {discovery: {gateway_classes: [istio, istio]}}":                       `tunnels.discovery.gateway_classes[1]: "istio" is listed twice`,
		"tunnels: {discovery: {gateway_namespace: [pipeops-system]}}":                   `unknown key "gateway_namespace"`,
		"tunnels: {discovery: {gateway_namespaces: [" + strings.Repeat("a", 64) + "]}}": "at most 63 characters",
	}
	for in, want := range cases {
		_, err := ParseAgent([]byte(base+in), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: err = %v, want it to contain %q", in, err, want)
		}
	}
}

// FuzzParseAgent and FuzzParseGateway check the config parsers: no input
// panics them, an accepted config passes Validate again unchanged, and
// written back as YAML it parses to the same value.
func FuzzParseAgent(f *testing.F) {
	f.Add([]byte("gateway: {url: \"ws://h:1/v1/tunnel\", token: t}\nservices: [{name: r, port: 1, backend: \"h:1\"}]"))
	f.Add([]byte("gateway: {url: \"ws://127.0.0.1:1/v1/tunnel\", token: t}\nservices: [{name: r, port: 1, backend: \"h:1\"}]\ntunnels: {tcp: {idle_timeout: 90000ms}}"))
	f.Add([]byte("gateway: {url: \"ws://h:1/v1/tunnel\", token: t, insecure: true, protocol: json}\nmetrics: {listen: \"\"}"))
	f.Add([]byte("tunnels: {tcp: {idle_timeout: 5m}}"))
	f.Add([]byte("tunnels: {discovery: {gateway_namespaces: [pipeops-system], gateway_classes: [istio]}}"))
	f.Add([]byte("- a\n- b"))
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := ParseAgent(b, nil)
		if err != nil {
			return
		}
		checkReparse(t, a, ParseAgent, (*AgentFile).Validate)
	})
}

func FuzzParseGateway(f *testing.F) {
	f.Add([]byte("insecure: true\nagents: [{name: a, token: 0123456789abcdef0}]"))
	f.Add([]byte("port_range: \"1-2\"\ninsecure: true"))
	f.Add([]byte("insecure: true\nheartbeat_interval: 1500ms\nprotocols: [json]\nagents: [{name: a, token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, max_services: 3}]"))
	f.Add([]byte("insecure: true\nmax_retained_ports: 3\nmax_services: 2\nagents: [{name: a, token: 0123456789abcdef0, max_services: 4, max_retained_ports: 4}]"))
	f.Add([]byte("&a [*a]"))
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := ParseGateway(b, nil)
		if err != nil {
			return
		}
		checkReparse(t, g, ParseGateway, (*GatewayFile).Validate)
	})
}

// checkReparse checks an accepted config: Validate passes again and
// changes nothing, and the config marshalled to YAML parses back to the
// same value (compared through its JSON form, which is every key).
func checkReparse[T any](t *testing.T, v *T, parse func([]byte, func(string) string) (*T, error), validate func(*T) error) {
	t.Helper()
	before, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("accepted config does not marshal: %v", err)
	}
	if err := validate(v); err != nil {
		t.Fatalf("accepted config fails validation: %v", err)
	}
	after, err := json.Marshal(v)
	if err != nil || !bytes.Equal(before, after) {
		t.Fatalf("validating again changed the config: %s to %s (%v)", before, after, err)
	}
	y, err := yaml.Marshal(v)
	if err != nil {
		t.Fatalf("accepted config does not marshal to YAML: %v", err)
	}
	v2, err := parse(y, nil)
	if err != nil {
		t.Fatalf("accepted config, written back as\n%s\nis refused: %v", y, err)
	}
	// Compare values, not spellings: "90000ms" is written back as "1m30s".
	clearSpelling(reflect.ValueOf(v))
	clearSpelling(reflect.ValueOf(v2))
	if !reflect.DeepEqual(v, v2) {
		again, _ := json.Marshal(v2)
		t.Fatalf("config %s, written back as\n%s\nparses to %s", before, y, again)
	}
}

// clearSpelling forgets how every Duration in v was written, keeping its
// value.
func clearSpelling(v reflect.Value) {
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() {
			clearSpelling(v.Elem())
		}
	case reflect.Slice:
		for i := range v.Len() {
			clearSpelling(v.Index(i))
		}
	case reflect.Struct:
		if d, ok := v.Addr().Interface().(*Duration); ok {
			d.raw = ""
			return
		}
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				clearSpelling(v.Field(i))
			}
		}
	}
}

// max_retained_ports: twice max_services unless set, per agent or for all,
// and never below the agent's max_services.
func TestGatewayRetainedPortsCap(t *testing.T) {
	g, err := ParseGateway([]byte(`
insecure: true
max_services: 10
agents:
  - {name: plain, token: 0123456789abcdef0}
  - {name: big, token: 0123456789abcdef1, max_services: 40}
  - {name: own, token: 0123456789abcdef2, max_retained_ports: 15}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []int{20, 80, 15} {
		if got := g.RetainedPortsCap(&g.Agents[i]); got != want {
			t.Errorf("%s: cap %d, want %d", g.Agents[i].Name, got, want)
		}
	}
	if got := g.RetainedPortsCap(nil); got != 20 {
		t.Errorf("unconfigured agent: cap %d, want 20", got)
	}
	g.MaxRetainedPorts = 50
	if got := g.RetainedPortsCap(&g.Agents[0]); got != 50 {
		t.Errorf("gateway-wide max_retained_ports 50: cap %d", got)
	}

	cases := map[string]string{
		`insecure: true
max_retained_ports: 50`: "max_retained_ports: 50 is below max_services (100)",
		`insecure: true
max_retained_ports: -1`: "max_retained_ports: -1 is outside",
		`insecure: true
agents: [{name: a, token: 0123456789abcdef0, max_retained_ports: 5, max_services: 6}]`: "agents[0].max_retained_ports: 5 is below this agent's max_services (6)",
		`insecure: true
max_retained_ports: 120
agents: [{name: a, token: 0123456789abcdef0, max_services: 200}]`: `max_retained_ports: 120 is below the max_services (200) of agents[0] ("a")`,
		`insecure: true
agents: [{name: a, token: 0123456789abcdef0, max_retained_ports: 200000}]`: "agents[0].max_retained_ports: 200000 is outside",
	}
	for in, want := range cases {
		_, err := ParseGateway([]byte(in), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: err = %v, want it to contain %q", in, err, want)
		}
	}
}

// gateway.urls lists several gateways instead of gateway.url; mistakes name
// the key, and both keys at once is refused naming both.
func TestAgentGatewayURLs(t *testing.T) {
	ok := "gateway: {urls: [\"ws://127.0.0.11:1/v1/tunnel\", \"ws://127.0.0.12:1/v1/tunnel\"], connections: 2, token: t}\n"
	a, err := ParseAgent([]byte(ok), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := a.Gateway.GatewayURLs(); len(got) != 2 || got[1] != "ws://127.0.0.12:1/v1/tunnel" || a.Gateway.Connections != 2 {
		t.Fatalf("urls %v, connections %d", got, a.Gateway.Connections)
	}
	one, err := ParseAgent([]byte("gateway: {url: \"ws://127.0.0.1:1/v1/tunnel\", token: t}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := one.Gateway.GatewayURLs(); len(got) != 1 || got[0] != "ws://127.0.0.1:1/v1/tunnel" {
		t.Fatalf("gateway.url alone: urls %v", got)
	}
	cases := map[string]string{
		`gateway: {url: "ws://127.0.0.1:1/", urls: ["ws://127.0.0.2:1/"], token: t}`: "gateway.url: and gateway.urls are both set",
		`gateway: {urls: ["ws://127.0.0.1:1/", "http://h/"], token: t}`:              "gateway.urls[1]:",
		`gateway: {urls: ["ws://127.0.0.1:1/", "ws://127.0.0.1:1/"], token: t}`:      "gateway.urls[1]: \"ws://127.0.0.1:1/\" is listed twice",
		`gateway: {urls: ["ws://gw.example.com/"], token: t}`:                        "gateway.urls[0]: \"ws://gw.example.com/\" is plain ws://",
		`gateway: {urls: ["ws://127.0.0.1:1/"], connections: 17, token: t}`:          "gateway.connections: 17 is outside 0-16",
		`gateway: {url: "ws://127.0.0.1:1/", connections: -1, token: t}`:             "gateway.connections:",
	}
	for in, want := range cases {
		_, err := ParseAgent([]byte(in), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: err = %v, want it to contain %q", in, err, want)
		}
	}
}
