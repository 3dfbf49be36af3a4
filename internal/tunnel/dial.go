package tunnel

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/websocket"
)

// Buffer sizes for the agent's WebSocket. The gateway's are chosen in
// NewUpgrader, for thousands of mostly idle sessions.
//
//   - wsReadBuffer holds frame headers and small messages. A read of a
//     frame's payload at least this large, which is what yamux and the JSON
//     read loop ask for in bulk, goes straight from the connection (TLS
//     or the socket) into the caller's buffer, skipping a copy.
//   - wsWriteBuffer holds one whole 64 KiB yamux frame (or JSON data
//     message), so that each message leaves in one write. The agent must
//     mask what it sends, and masking is this copy.
const (
	wsReadBuffer  = 4 << 10
	wsWriteBuffer = 64<<10 + 16
)

// Path is where the gateway accepts agents.
const Path = "/v1/tunnel"

// NewUpgrader returns the gateway's WebSocket upgrader. Agents are not
// browsers and authenticate with a bearer token, so any Origin is allowed.
//
// This is where the gateway's WebSocket buffers are chosen: gatewayReadBuffer
// and gatewayWriteBuffer, 4 KiB each, where the agent's side has 64 KiB
// each. A gateway holds one WebSocket per agent, mostly idle, and a 64 KiB
// pair was most of an idle agent's cost. Busy sessions lose little: a read
// larger than the buffer goes straight from the socket into the caller's
// slice (yamux's frame body), and a message larger than the write buffer
// is written as the buffered head plus the rest of the message in one
// writev, with no copy of the rest (gorilla allocates the net.Buffers for
// it, a few small allocations per 64 KiB frame; under TLS the corkConn
// still sends the message's records in one write). The read buffer is the WebSocket's own
// rather than the HTTP server's (ReadBufferSize 0 would reuse that one):
// reusing it would keep the server's whole connection state reachable for
// the life of the session.
func NewUpgrader(handshakeTimeout time.Duration) *websocket.Upgrader {
	return &websocket.Upgrader{
		HandshakeTimeout: handshakeTimeout,
		ReadBufferSize:   gatewayReadBuffer,
		WriteBufferSize:  gatewayWriteBuffer,
		CheckOrigin:      func(*http.Request) bool { return true },
	}
}

// The gateway's WebSocket buffer sizes (NewUpgrader says why they are small).
const (
	gatewayReadBuffer  = 4 << 10
	gatewayWriteBuffer = 4 << 10
)

// DialError is returned by Dial when the gateway answered the upgrade with
// an HTTP error, such as 401 for an unknown token.
type DialError struct {
	StatusCode int
	Body       string
	// RetryAfter is the wait the gateway asked for with Retry-After (a
	// 503 while it is busy with other handshakes), or 0.
	RetryAfter time.Duration
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
			return nil, &DialError{StatusCode: resp.StatusCode, Body: strings.TrimSpace(string(body)),
				RetryAfter: ParseRetryAfter(resp.Header.Get("Retry-After"), time.Now())}
		}
		return nil, fmt.Errorf("dial %s: %w", url, err)
	}
	return ws, nil
}

// maxRetryAfter caps what a Retry-After may ask for: a gateway's answer
// must not park an agent for hours.
const maxRetryAfter = 5 * time.Minute

// ParseRetryAfter reads a Retry-After header value, seconds or an HTTP
// date (relative to now), capped at five minutes. Anything else, and a
// date in the past, is 0: no wait asked for.
func ParseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	var d time.Duration
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		d = time.Duration(n) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	}
	return min(max(d, 0), maxRetryAfter)
}
