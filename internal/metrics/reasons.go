package metrics

import (
	"fmt"

	"github.com/portway/portway/internal/protocol"
)

// Reason is the value of a reason label: why a connection failed or was
// refused, a datagram dropped, a tunnel refused, a session ended or a
// retained port given up. Every
// reason label of both processes takes its values from this one fixed set,
// so label values cannot drift from docs/metrics.md, and a value from the
// network (a peer's error code) cannot become a label unmapped. Each
// constant says which counters it labels.
type Reason uint8

// Reasons. ReasonNone is the zero value: nothing to count.
const (
	ReasonNone Reason = iota

	// Agent status answers (gateway refusals, see StatusReason) and agent
	// TCP errors (refused, timeout, over_limit); over_limit is also a
	// gateway UDP drop (its cap of sessions per port).
	ReasonRefused
	ReasonTimeout
	ReasonUnknownService
	ReasonOverLimit
	ReasonError

	// Agent TCP errors; dial_error is also an agent UDP drop.
	ReasonDialError
	ReasonReset
	ReasonIdleTimeout
	ReasonTunnel

	// Gateway refusals.
	ReasonAgentOffline
	ReasonTunnelError

	// UDP drops: too_large and queue_full on both sides, over_budget on
	// the gateway, session_over_limit on the agent. A gateway drop of a
	// client the agent recently refused is ReasonRefused.
	ReasonTooLarge
	ReasonQueueFull
	ReasonOverBudget
	ReasonSessionOverLimit

	// Gateway tunnel authentication failures.
	ReasonNoToken
	ReasonBadToken
	ReasonRateLimited

	// Gateway session ends: closed locally or by a vanished peer, the
	// heartbeat timed out, the peer broke the protocol, or the peer sent
	// an error message with a code (see PeerReason).
	ReasonClosed
	ReasonHeartbeatTimeout
	ReasonProtocolViolation
	ReasonPeerShutdown
	ReasonPeerReplaced
	ReasonPeerNoProtocol
	ReasonPeerBadProtocol
	ReasonPeerOther

	// Gateway port evictions: an agent over its max_retained_ports, or
	// port_range full when a new service needed a port.
	ReasonAgentCap
	ReasonRangeFull

	// Gateway source checks on a public port: a source outside the
	// service's allow list (or in its deny list, or outside the agent's
	// ceiling); a source over max_connections_per_source or its new
	// connection rate; a connection from a proxy_protocol_from source
	// without a valid PROXY protocol header.
	ReasonDenied
	ReasonSourceLimit
	ReasonProxyHeader

	// Forwarding between gateway replicas: a connection or UDP session
	// that reached a replica without a session of its agent, when no
	// other replica holds one either.
	ReasonNoReplica

	numReasons
)

var reasonLabels = [numReasons]string{
	ReasonNone:              "",
	ReasonRefused:           "refused",
	ReasonTimeout:           "timeout",
	ReasonUnknownService:    "unknown_service",
	ReasonOverLimit:         "over_limit",
	ReasonError:             "error",
	ReasonDialError:         "dial_error",
	ReasonReset:             "reset",
	ReasonIdleTimeout:       "idle_timeout",
	ReasonTunnel:            "tunnel",
	ReasonAgentOffline:      "agent_offline",
	ReasonTunnelError:       "tunnel_error",
	ReasonTooLarge:          "too_large",
	ReasonQueueFull:         "queue_full",
	ReasonOverBudget:        "over_budget",
	ReasonSessionOverLimit:  "session_over_limit",
	ReasonNoToken:           "no_token",
	ReasonBadToken:          "bad_token",
	ReasonRateLimited:       "rate_limited",
	ReasonClosed:            "closed",
	ReasonHeartbeatTimeout:  "heartbeat_timeout",
	ReasonProtocolViolation: "protocol_violation",
	ReasonPeerShutdown:      "peer_shutdown",
	ReasonPeerReplaced:      "peer_replaced",
	ReasonPeerNoProtocol:    "peer_no_protocol",
	ReasonPeerBadProtocol:   "peer_bad_protocol",
	ReasonPeerOther:         "peer_other",
	ReasonAgentCap:          "agent_cap",
	ReasonRangeFull:         "range_full",
	ReasonDenied:            "denied",
	ReasonSourceLimit:       "source_limit",
	ReasonProxyHeader:       "proxy_header",
	ReasonNoReplica:         "no_replica",
}

// String returns the label value.
func (r Reason) String() string {
	if r < numReasons {
		return reasonLabels[r]
	}
	return fmt.Sprintf("reason(%d)", uint8(r))
}

// StatusReason is the gateway's refusal reason for an agent's answer to a
// stream open: the label is the status's own name.
func StatusReason(s protocol.Status) Reason {
	switch s {
	case protocol.StatusRefused:
		return ReasonRefused
	case protocol.StatusTimeout:
		return ReasonTimeout
	case protocol.StatusUnknownService:
		return ReasonUnknownService
	case protocol.StatusOverLimit:
		return ReasonOverLimit
	}
	return ReasonError
}

// PeerReason is the session end reason for an error message from the
// peer. A code this build does not send is ReasonPeerOther: the peer
// chooses the code, so it never becomes a label as it came.
func PeerReason(c protocol.ErrorCode) Reason {
	switch c {
	case protocol.CodeShutdown:
		return ReasonPeerShutdown
	case protocol.CodeReplaced:
		return ReasonPeerReplaced
	case protocol.CodeNoProtocol:
		return ReasonPeerNoProtocol
	case protocol.CodeBadProtocol:
		return ReasonPeerBadProtocol
	}
	return ReasonPeerOther
}
