package tunnel

import (
	"context"

	"github.com/portway/portway/internal/protocol"
)

// muxer is one protocol mode: it carries the streams of a session over the
// session's WebSocket. A muxer owns the reading of the socket after the
// handshake and hands the session-level messages it meets (heartbeats,
// register, errors) to the session's control handler; it writes through
// the session's wsConn, whose single writer it shares with the session.
type muxer interface {
	// open starts a stream to the agent (gateway side).
	open(ctx context.Context, h protocol.StreamHeader) (Stream, error)
	// accept returns the next stream the gateway opened (agent side).
	accept(ctx context.Context) (*Incoming, error)
	// close ends every stream with err. The session calls it once, after
	// the WebSocket has closed.
	close(err error)
}

// role is the end of the tunnel a session serves: the gateway opens
// streams, the agent accepts them.
type role uint8

const (
	agentRole role = iota
	gatewayRole
)

// controlHandler handles a session-level message met by a muxer's reader;
// an error ends the session. It must not block for long: it runs on the
// session's only reader.
type controlHandler func(protocol.Message) error
