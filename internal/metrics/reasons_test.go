package metrics

import (
	"os"
	"strings"
	"testing"

	"github.com/portway/portway/internal/protocol"
)

// Every reason has its own label, the one docs/metrics.md and dashboards
// know; none may be renamed, merged or left out.
func TestReasonLabels(t *testing.T) {
	want := []string{
		"", "refused", "timeout", "unknown_service", "over_limit", "error",
		"dial_error", "reset", "idle_timeout", "tunnel", "agent_offline", "tunnel_error",
		"too_large", "queue_full", "over_budget", "session_over_limit",
		"no_token", "bad_token", "rate_limited",
		"closed", "heartbeat_timeout", "protocol_violation", "peer_shutdown", "peer_replaced",
		"peer_no_protocol", "peer_bad_protocol", "peer_other",
		"agent_cap", "range_full",
		"denied", "source_limit", "proxy_header",
		"no_replica",
	}
	if int(numReasons) != len(want) {
		t.Fatalf("%d reasons, want %d", numReasons, len(want))
	}
	doc, err := os.ReadFile("../../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	for r := ReasonNone; r < numReasons; r++ {
		if got := r.String(); got != want[r] {
			t.Errorf("reason %d is %q, want %q", r, got, want[r])
		}
		if r != ReasonNone && !strings.Contains(string(doc), "`"+r.String()+"`") {
			t.Errorf("reason %q is not in docs/metrics.md", r)
		}
	}
	if s := numReasons.String(); !strings.HasPrefix(s, "reason(") {
		t.Errorf("an undefined reason prints as %q", s)
	}
}

// A refusal is labelled with the agent's status name, for every status an
// agent can answer other than ok.
func TestStatusReason(t *testing.T) {
	for s := protocol.Status(0); s.Valid(); s++ {
		if s == protocol.StatusOK {
			continue
		}
		if got := StatusReason(s).String(); got != s.String() {
			t.Errorf("status %s is counted as %q", s, got)
		}
	}
}

// The codes portway sends are labelled peer_<code>; any other code a peer
// sends is one label, peer_other, whatever it is.
func TestPeerReason(t *testing.T) {
	for _, c := range []protocol.ErrorCode{protocol.CodeShutdown, protocol.CodeReplaced, protocol.CodeNoProtocol, protocol.CodeBadProtocol} {
		if got := PeerReason(c).String(); got != "peer_"+string(c) {
			t.Errorf("code %s is counted as %q", c, got)
		}
	}
	for _, c := range []protocol.ErrorCode{"", "other", "peer_shutdown", "shutdown ", protocol.ErrorCode(strings.Repeat("x", 1000))} {
		if got := PeerReason(c); got != ReasonPeerOther {
			t.Errorf("code %.20q is counted as %q, want peer_other", c, got)
		}
	}
}
