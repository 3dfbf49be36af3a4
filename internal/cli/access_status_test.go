package cli

import (
	"bytes"
	"strings"
	"testing"

	"github.com/portway/portway/internal/adminapi"
)

// portway status lists each service's PROXY protocol mode, allow and deny
// lists, per-source limits and refusals, and only the services that have
// any.
func TestStatusShowsAccess(t *testing.T) {
	var out bytes.Buffer
	writeStatus(&out, nil, []adminapi.ServiceInfo{
		{Agent: "prod-eu", ID: "postgres", Protocol: "tcp", Port: 5432, PublicPort: 15432, Endpoint: "gw.example.com:15432", Mode: "tunnel",
			ProxyProtocol: "v2", AllowCIDRs: []string{"203.0.113.0/24", "198.51.100.7"}, DenyCIDRs: []string{"203.0.113.9"},
			MaxConnectionsPerSource: 10, MaxConnectionRatePerSource: 2.5, Denied: 42, SourceLimited: 3},
		{Agent: "prod-eu", ID: "redis", Protocol: "tcp", Port: 6379, PublicPort: 16379, Endpoint: "gw.example.com:16379", Mode: "tunnel"},
	})
	s := out.String()
	i := strings.Index(s, "PROXY PROTOCOL")
	if i < 0 {
		t.Fatalf("no access table:\n%s", s)
	}
	access := s[i:]
	for _, want := range []string{"postgres", "v2", "203.0.113.0/24,198.51.100.7", "203.0.113.9", "10 open, 2.5/s", "42", "3"} {
		if !strings.Contains(access, want) {
			t.Errorf("access table lacks %q:\n%s", want, access)
		}
	}
	if strings.Contains(access, "redis") {
		t.Errorf("a service without access settings is listed:\n%s", access)
	}

	out.Reset()
	writeStatus(&out, nil, []adminapi.ServiceInfo{{Agent: "a", ID: "redis", Protocol: "tcp", Mode: "tunnel"}})
	if strings.Contains(out.String(), "PROXY PROTOCOL") {
		t.Errorf("access table printed with no access settings:\n%s", out.String())
	}
}
