package gateway

import (
	"errors"
	"fmt"
	"testing"

	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/tunnel"
)

// A session's end is counted under one of a fixed set of labels: the
// codes portway sends keep their peer_<code> label, and whatever else a
// peer writes in its error message is peer_other, never a new label.
func TestEndReason(t *testing.T) {
	cases := []struct {
		err  error
		want string
	}{
		{&tunnel.PeerError{Code: protocol.CodeShutdown, Message: "bye"}, "peer_shutdown"},
		{fmt.Errorf("session: %w", &tunnel.PeerError{Code: protocol.CodeReplaced}), "peer_replaced"},
		{&tunnel.PeerError{Code: protocol.CodeNoProtocol}, "peer_no_protocol"},
		{&tunnel.PeerError{Code: protocol.CodeBadProtocol}, "peer_bad_protocol"},
		{&tunnel.PeerError{Code: "x\" 1e9 {a=\"b"}, "peer_other"},
		{&tunnel.PeerError{Code: ""}, "peer_other"},
		{fmt.Errorf("read: %w", tunnel.ErrPeerTimeout), "heartbeat_timeout"},
		{fmt.Errorf("read: %w", tunnel.ErrProtocol), "protocol_violation"},
		{errors.New("connection reset"), "closed"},
		{nil, "closed"},
	}
	for _, c := range cases {
		if got := endReason(c.err).String(); got != c.want {
			t.Errorf("endReason(%v) = %q, want %q", c.err, got, c.want)
		}
	}
}
