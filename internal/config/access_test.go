package config

import (
	"net/netip"
	"strings"
	"testing"
)

// Access mistakes name the key and the problem, on both sides.
func TestAccessConfigErrors(t *testing.T) {
	env := func(string) string { return "" }
	agent := `gateway: {url: "ws://127.0.0.1:1/v1/tunnel", token: "x"}
services:
  - {name: pg, port: 5432, backend: "127.0.0.1:5432", proxy_protocol: v2, allow_cidrs: ["127.0.0.7", "10.0.0.1/8"], max_connections_per_source: -1}
  - {name: dns, protocol: udp, port: 53, backend: "127.0.0.1:53", proxy_protocol: v1, deny_cidrs: [nonsense]}
  - {name: web, port: 80, backend: "127.0.0.1:80", proxy_protocol: V2, connection_burst_per_source: 3}
`
	_, err := ParseAgent([]byte(agent), env)
	for _, want := range []string{
		`services[0].allow_cidrs: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)`,
		`services[0].max_connections_per_source: -1 is outside`,
		`services[1].proxy_protocol: v1 has no datagram form`,
		`services[1].deny_cidrs: "nonsense" is neither a CIDR`,
		`services[2].proxy_protocol: "V2" is not v1 or v2`,
		`services[2].connection_burst_per_source: is set without max_connection_rate_per_source`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("agent config: error %v\nwant it to contain %q", err, want)
		}
	}
	ok := `gateway: {url: "ws://127.0.0.1:1/v1/tunnel", token: "x"}
services:
  - {name: pg, port: 5432, backend: "127.0.0.1:5432", proxy_protocol: v1, allow_cidrs: ["127.0.0.7", "::ffff:10.0.0.0/104"], max_connection_rate_per_source: 5}
  - {name: dns, protocol: udp, port: 53, backend: "127.0.0.1:53", proxy_protocol: v2}
`
	a, err := ParseAgent([]byte(ok), env)
	if err != nil {
		t.Fatal(err)
	}
	if s := a.Services[0]; s.ProxyProtocol != "v1" || len(s.AllowCIDRs) != 2 || s.Burst() != 5 {
		t.Errorf("parsed %+v", s)
	}

	gw := `agents:
  - {name: a, token: "0123456789abcdef0123456789", allow_cidrs: ["10.0.0.0/8"], deny_cidrs: ["10.0.0.300"]}
proxy_protocol_from: ["192.0.2.0/33"]
`
	_, err = ParseGateway([]byte(gw), env)
	for _, want := range []string{`agents[0].deny_cidrs: "10.0.0.300"`, `proxy_protocol_from: "192.0.2.0/33" is not a CIDR`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("gateway config: error %v\nwant it to contain %q", err, want)
		}
	}
	gw = `agents:
  - {name: a, token: "0123456789abcdef0123456789", allow_cidrs: ["10.0.0.0/8"]}
  - {name: b, token: "0123456789abcdef0123456789x"}
proxy_protocol_from: ["192.0.2.10"]
insecure: true
`
	g, err := ParseGateway([]byte(gw), env)
	if err != nil {
		t.Fatal(err)
	}
	if c := g.Ceiling("a"); c == nil || len(c.Allow) != 1 || g.Ceiling("b") != nil {
		t.Errorf("ceilings: a %+v, b %+v", g.Ceiling("a"), g.Ceiling("b"))
	}
	if !g.ProxyProtocolFromAddr(mustAddr("192.0.2.10")) || g.ProxyProtocolFromAddr(mustAddr("192.0.2.11")) {
		t.Error("proxy_protocol_from does not match exactly 192.0.2.10")
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
