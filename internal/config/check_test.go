package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeConfig writes body to dir/name and returns its path.
func writeConfig(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestTypeErrorsNameFileLineAndKey checks that a value of the wrong kind is
// reported as file:line: key: want X, got Y, not as Go's unmarshal error.
func TestTypeErrorsNameFileLineAndKey(t *testing.T) {
	p := writeConfig(t, "gateway.yaml", `insecure: true
listen: "127.0.0.1:8443"
state_file: ""
agents:
  - name: a
    token: 0123456789abcdef0
    max_services: 1.5
admin:
  listen: "127.0.0.1:9000"
  token: secret
heartbeat_interval: 5s
max_services: lots
`)
	_, err := LoadGateway(p, nil)
	if err == nil {
		t.Fatal("accepted max_services: lots")
	}
	for _, want := range []string{
		p + `:12: max_services: want a number, got "lots"`,
		p + `:7: agents[0].max_services: want a whole number, got "1.5"`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q\ndoes not contain %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "json") || strings.Contains(err.Error(), "Go struct") {
		t.Errorf("error still speaks of Go or JSON: %v", err)
	}
}

// TestAllUnknownKeysAtOnce checks that every unknown key is reported in
// one error, each with its line, and a near miss with the key it is near.
func TestAllUnknownKeysAtOnce(t *testing.T) {
	p := writeConfig(t, "agent.yaml", `gateway:
  url: "ws://127.0.0.1:1/v1/tunnel"
  token: t
  cafile: /etc/ca.pem
metrcs: {listen: "127.0.0.1:9090"}
colour: blue
services:
  - {name: r, port: 1, backend: "h:1", protcol: udp}
`)
	_, err := LoadAgent(p, nil)
	if err == nil {
		t.Fatal("accepted unknown keys")
	}
	for _, want := range []string{
		p + `:4: gateway: unknown key "cafile" (did you mean "ca_file"?)`,
		p + `:5: unknown key "metrcs" (did you mean "metrics"?)`,
		p + `:6: unknown key "colour"`,
		p + `:8: services[0]: unknown key "protcol" (did you mean "protocol"?)`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q\ndoes not contain %q", err, want)
		}
	}
	if strings.Contains(err.Error(), `"colour" (did you mean`) {
		t.Errorf("suggested a key for a word near none: %v", err)
	}
}

// TestShapeErrors covers each kind mismatch, without a file name.
func TestShapeErrors(t *testing.T) {
	cases := map[string]string{
		"insecure: maybe":                                       `line 1: insecure: want true or false, got "maybe"`,
		"insecure: true\nagents: {name: a}":                     `line 2: agents: want a list, got a map`,
		"insecure: true\nadmin: [a]":                            `line 2: admin: want a map of keys, got a list`,
		"insecure: true\nlisten: [a]":                           `line 2: listen: want a string, got a list`,
		"insecure: true\nprotocols: json":                       `line 2: protocols: want a list, got "json"`,
		"insecure: true\ntls: {cert_file: {a: b}}":              `line 2: tls.cert_file: want a string, got a map`,
		"insecure: true\n\n\nagents: [{name: a, token: short}]": "line 4: agents[0].token: is shorter",
	}
	for in, want := range cases {
		_, err := ParseGateway([]byte(in), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: err = %v, want it to contain %q", in, err, want)
		}
	}
}

// TestShapeAcceptsWhatTheDecoderAccepts checks that the checks refuse
// nothing the decoder reads fine: YAML 1.1 booleans, numbers as strings,
// anchors and merge keys, nulls.
func TestShapeAcceptsWhatTheDecoderAccepts(t *testing.T) {
	g, err := ParseGateway([]byte(`
insecure: yes
listen: "127.0.0.1:8443"
port_range: 20000-20100
public_host: 1234
max_services: 1e2
state_file: ""
admin: {listen: &l "127.0.0.1:9000", token: *l}
tls: ~
agents:
  - {name: a, token: 0123456789abcdef0}
  - {<<: {name: b, token: 0123456789abcdef1}}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !g.Insecure || g.PublicHost != "1234" || g.MaxServices != 100 || len(g.Agents) != 2 || g.Agents[1].Token != "0123456789abcdef1" || g.Admin.Token != "127.0.0.1:9000" {
		t.Fatalf("parsed %+v", g)
	}
}

func TestEditDistance(t *testing.T) {
	for _, c := range []struct {
		a, b string
		d    int
	}{{"listen", "listen", 0}, {"lisen", "listen", 1}, {"lsiten", "listen", 1}, {"", "abc", 3}, {"colour", "listen", 6}} {
		if d := editDistance(c.a, c.b); d != c.d {
			t.Errorf("editDistance(%q, %q) = %d, want %d", c.a, c.b, d, c.d)
		}
	}
}
