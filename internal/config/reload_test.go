package config

import (
	"strings"
	"testing"
)

// TestRotationAndLogLevelKeys: token_sha256_next and log_level are checked
// like the other keys, and each problem names its key.
func TestRotationAndLogLevelKeys(t *testing.T) {
	const sum = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
	const next = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
	base := "insecure: true\nstate_file: \"\"\n"
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"rotation", "agents: [{name: a, token_sha256: " + sum + ", token_sha256_next: " + next + "}]\nlog_level: debug\n", ""},
		{"next not hex", "agents: [{name: a, token_sha256: " + sum + ", token_sha256_next: xyz}]\n", "agents[0].token_sha256_next: must be 64 hex digits"},
		{"next is current", "agents: [{name: a, token_sha256: " + sum + ", token_sha256_next: " + strings.ToUpper(sum) + "}]\n", "agents[0].token_sha256_next: is the same as token_sha256"},
		{"bad log level", "log_level: loud\n", `log_level: "loud" is not debug, info, warn or error`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := ParseGateway([]byte(base+tc.yaml), nil)
			switch {
			case tc.want == "" && err != nil:
				t.Fatal(err)
			case tc.want == "" && (g.Agents[0].TokenSHA256Next != next || g.LogLevel != "debug"):
				t.Fatalf("parsed %+v", g)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := ParseAgent([]byte("gateway: {url: \"ws://127.0.0.1:1/v1/tunnel\", token: x}\nlog_level: loud\n"), nil); err == nil || !strings.Contains(err.Error(), "log_level") {
		t.Fatalf("agent log_level: %v", err)
	}
}
