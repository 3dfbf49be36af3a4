package tunnel

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/gorilla/websocket"
)

// Buffer sizes for the WebSocket, in this one place.
//
//   - wsReadBuffer holds frame headers and small messages. A read of a
//     frame's payload at least this large, which is what yamux and the JSON
//     read loop ask for in bulk, goes straight from the connection (TLS
//     or the socket) into the caller's buffer, skipping a copy.
//   - wsWriteBuffer holds one whole 64 KiB yamux frame (or JSON data
//     message), so that each message leaves in one write. The agent must
//     mask what it sends, and masking is this copy. The gateway does not
//     mask, and with a smaller buffer gorilla would send the rest of a
//     large message from the caller's slice instead of copying it, but it
//     allocates a net.Buffers for every such message to do so.
const (
	wsReadBuffer  = 4 << 10
	wsWriteBuffer = 64<<10 + 16
)

// Path is where the gateway accepts agents.
const Path = "/v1/tunnel"

// NewUpgrader returns the gateway's WebSocket upgrader. Agents are not
// browsers and authenticate with a bearer token, so any Origin is allowed.
func NewUpgrader(handshakeTimeout time.Duration) *websocket.Upgrader {
	return &websocket.Upgrader{
		HandshakeTimeout: handshakeTimeout,
		ReadBufferSize:   wsReadBuffer,
		WriteBufferSize:  wsWriteBuffer,
		CheckOrigin:      func(*http.Request) bool { return true },
	}
}

// DialError is returned by Dial when the gateway answered the upgrade with
// an HTTP error, such as 401 for an unknown token.
type DialError struct {
	StatusCode int
	Body       string
}

func (e *DialError) Error() string {
	msg := fmt.Sprintf("gateway answered HTTP %d %s", e.StatusCode, http.StatusText(e.StatusCode))
	if e.Body != "" {
		msg += ": " + e.Body
	}
	return msg
}

// DialOptions configure Dial.
type DialOptions struct {
	Token     string
	TLS       *tls.Config // nil: system roots
	Timeout   time.Duration
	UserAgent string
	// NetDial, when set, replaces the TCP dialer (tests, proxies).
	NetDial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Dial connects to a gateway's tunnel endpoint (ws:// or wss://) and
// authenticates with the bearer token.
func Dial(ctx context.Context, url string, o DialOptions) (*websocket.Conn, error) {
	d := websocket.Dialer{
		HandshakeTimeout: o.Timeout,
		ReadBufferSize:   wsReadBuffer,
		WriteBufferSize:  wsWriteBuffer,
		TLSClientConfig:  o.TLS,
		Proxy:            http.ProxyFromEnvironment,
		NetDialContext:   o.NetDial,
	}
	if d.HandshakeTimeout == 0 {
		d.HandshakeTimeout = 10 * time.Second
	}
	if strings.HasPrefix(strings.ToLower(url), "wss:") {
		// Put a corkConn under gorilla's TLS (and under a proxy's CONNECT,
		// which carries the TLS), so each message leaves in one write.
		netDial := o.NetDial
		if netDial == nil {
			var nd net.Dialer
			netDial = nd.DialContext
		}
		d.NetDialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := netDial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return newCorkConn(c), nil
		}
	}
	h := http.Header{}
	h.Set("Authorization", "Bearer "+o.Token)
	if o.UserAgent != "" {
		h.Set("User-Agent", o.UserAgent)
	}
	ws, resp, err := d.DialContext(ctx, url, h)
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			resp.Body.Close()
			return nil, &DialError{StatusCode: resp.StatusCode, Body: strings.TrimSpace(string(body))}
		}
		return nil, fmt.Errorf("dial %s: %w", url, err)
	}
	return ws, nil
}
