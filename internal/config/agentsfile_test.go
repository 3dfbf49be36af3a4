package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const (
	hashA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
	hashB = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
)

func TestParseAgentsFile(t *testing.T) {
	in := "# generated\n\n" +
		"prod-eu sha256:" + hashA + "\n" +
		"  prod-us\tsha256:" + strings.ToUpper(hashA) + " sha256:" + hashB + "  max_services=20 max_retained_ports=40\n" +
		"   # indented comment\n"
	got, err := ParseAgentsFile("agents", []byte(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []AgentIdentity{
		{Name: "prod-eu", TokenSHA256: hashA},
		{Name: "prod-us", TokenSHA256: hashA, TokenSHA256Next: hashB, MaxServices: 20, MaxRetainedPorts: 40},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
}

// Every bad line is reported, each with the file and its line number.
func TestParseAgentsFileErrorsNameTheLine(t *testing.T) {
	lines := []string{
		"ok sha256:" + hashA,                        // 1
		"no-hash",                                   // 2
		"bad/name sha256:" + hashA,                  // 3
		"short sha256:abcd",                         // 4
		"tok token-in-clear-0123456789",             // 5
		"opt sha256:" + hashA + " max_services=0",   // 6
		"unk sha256:" + hashA + " color=red",        // 7
		"ok sha256:" + hashB,                        // 8: listed twice
		"same sha256:" + hashA + " sha256:" + hashA, // 9
		"three sha256:" + hashA + " sha256:" + hashB + " sha256:" + hashA, // 10
	}
	_, err := ParseAgentsFile("/etc/portway/agents", []byte(strings.Join(lines, "\n")))
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{
		"/etc/portway/agents:2: agent \"no-hash\": no token hash",
		"/etc/portway/agents:3: agent name \"bad/name\"",
		"/etc/portway/agents:4: agent \"short\": a token hash must be sha256: and 64 hex digits",
		"/etc/portway/agents:5: agent \"tok\": \"token-in-clear-0123456789\" is neither sha256:<hex> nor key=value",
		"/etc/portway/agents:6: agent \"opt\": max_services \"0\"",
		"/etc/portway/agents:7: agent \"unk\": unknown setting \"color\"",
		"/etc/portway/agents:8: agent \"ok\" is already on line 1",
		"/etc/portway/agents:9: agent \"same\": the second token hash is the same as the first",
		"/etc/portway/agents:10: agent \"three\": more than two token hashes",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), ":1:") {
		t.Errorf("line 1 is fine but reported:\n%v", err)
	}
}

// gateway.yaml's agents_file is read with the config; its agents join those
// of gateway.yaml, and one in both is refused.
func TestGatewayAgentsFile(t *testing.T) {
	dir := t.TempDir()
	af := filepath.Join(dir, "agents")
	if err := os.WriteFile(af, []byte("b sha256:"+hashB+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := "insecure: true\nagents: [{name: a, token_sha256: " + hashA + "}]\nagents_file: " + af + "\n"
	g, err := ParseGateway([]byte(base), nil)
	if err != nil {
		t.Fatal(err)
	}
	all := g.AllAgents()
	if len(all) != 2 || all[0].Name != "a" || all[1].Name != "b" || all[1].TokenSHA256 != hashB {
		t.Fatalf("agents %+v", all)
	}
	if err := os.WriteFile(af, []byte("a sha256:"+hashB+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseGateway([]byte(base), nil); err == nil || !strings.Contains(err.Error(), `agent "a" is also in agents of the gateway config`) {
		t.Fatalf("agent in both: %v", err)
	}
	_, err = ParseGateway([]byte("insecure: true\nagents_file: "+filepath.Join(dir, "missing")+"\n"), nil)
	if err == nil || !strings.HasPrefix(err.Error(), "agents_file: ") {
		t.Fatalf("missing file: %v", err)
	}
}

// FuzzParseAgentsFile: no input panics the parser, and what it accepts,
// written back line by line, parses to the same identities.
func FuzzParseAgentsFile(f *testing.F) {
	f.Add([]byte("a sha256:" + hashA + "\n# c\nb sha256:" + hashA + " sha256:" + hashB + " max_services=3\n"))
	f.Add([]byte("x\tsha256:" + hashB + " max_retained_ports=9\r\n\n"))
	f.Add([]byte("a sha256:zz\nb"))
	f.Fuzz(func(t *testing.T, b []byte) {
		agents, err := ParseAgentsFile("f", b)
		if err != nil {
			return
		}
		var out strings.Builder
		for i := range agents {
			out.WriteString(FormatAgentLine(&agents[i]) + "\n")
		}
		again, err := ParseAgentsFile("f", []byte(out.String()))
		if err != nil {
			t.Fatalf("written back as\n%s\nis refused: %v", out.String(), err)
		}
		if len(again) != len(agents) || (len(agents) > 0 && !reflect.DeepEqual(again, agents)) {
			t.Fatalf("round trip changed %+v to %+v", agents, again)
		}
	})
}
