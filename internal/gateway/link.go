package gateway

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/gorilla/websocket"

	"github.com/portway/portway/internal/cluster"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/tunnel"
)

// clusterPath is where a replica accepts the links of the other replicas,
// on the agents' listener (the address it advertises).
const clusterPath = "/v1/cluster"

// linkAuth is one message of a link's mutual authentication. Each side
// proves it knows cluster.token with an HMAC over both nonces, both
// replica ids and (under TLS) the TLS session's exported keying material,
// so the token never crosses the wire and a proof cannot be replayed on
// another connection.
type linkAuth struct {
	Replica string `json:"replica,omitempty"`
	Nonce   string `json:"nonce,omitempty"`
	MAC     string `json:"mac,omitempty"`
}

// Labels that make the two proofs of one handshake differ.
const (
	macDialer   = "portway cluster link: dialer"
	macAccepter = "portway cluster link: accepter"
)

// linkMAC is the proof of knowing token for one side of one handshake.
func linkMAC(token []byte, label, dialer, accepter, dialerNonce, accepterNonce string, binding []byte) string {
	m := hmac.New(sha256.New, token)
	for _, s := range []string{label, dialer, accepter, dialerNonce, accepterNonce} {
		m.Write([]byte(s))
		m.Write([]byte{0})
	}
	m.Write(binding)
	return hex.EncodeToString(m.Sum(nil))
}

// macEqual compares two hex proofs in constant time.
func macEqual(got, want string) bool {
	return hmac.Equal([]byte(got), []byte(want))
}

func newNonce() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// channelBinding is the TLS connection's exported keying material (nil
// without TLS): a proof made on one TLS connection is worthless on
// another, so a man in the middle cannot relay it.
func channelBinding(ws *websocket.Conn) []byte {
	tc, ok := ws.NetConn().(*tls.Conn)
	if !ok {
		return nil
	}
	cs := tc.ConnectionState()
	b, err := cs.ExportKeyingMaterial("portway cluster link", nil, 32)
	if err != nil {
		return nil
	}
	return b
}

var errLinkAuth = errors.New("cluster link: authentication failed")

// maxLinkAuth bounds one authentication message: ids, a nonce and a MAC.
const maxLinkAuth = 1024

// checkDialer decodes the dialer's proof msg and checks it against
// token, this replica's id self, its nonce mine and the channel binding.
// It returns the dialer's message and whether the proof holds.
func checkDialer(token []byte, self string, msg []byte, mine string, binding []byte) (linkAuth, bool) {
	var hello linkAuth
	if err := json.Unmarshal(msg, &hello); err != nil {
		return linkAuth{}, false
	}
	if hello.Replica == "" || hello.Nonce == "" || len(hello.Replica) > 253 || len(hello.Nonce) > 64 {
		return hello, false
	}
	return hello, macEqual(hello.MAC, linkMAC(token, macDialer, hello.Replica, self, hello.Nonce, mine, binding))
}

// handleCluster accepts another replica's link: it authenticates the
// dialer, then serves the streams it opens (connections it forwards to
// this replica's agent sessions).
func (g *Gateway) handleCluster(w http.ResponseWriter, r *http.Request) {
	f := g.fabric
	src := remoteIP(r.RemoteAddr)
	if f == nil {
		http.Error(w, "portway gateway: not in a cluster", http.StatusNotFound)
		return
	}
	if !g.limiter.allowed(src) {
		g.metrics.AuthFailures.WithLabelValues(metrics.ReasonRateLimited.String()).Inc()
		w.Header().Set("Connection", "close")
		http.Error(w, "too many failed authentication attempts", http.StatusTooManyRequests)
		return
	}
	if !g.track() {
		http.Error(w, "gateway shutting down", http.StatusServiceUnavailable)
		return
	}
	defer g.wg.Done()
	ws, err := g.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	timeout := g.cfg.HandshakeTimeout.Duration
	ws.SetReadDeadline(time.Now().Add(timeout))
	ws.SetWriteDeadline(time.Now().Add(timeout))
	ws.SetReadLimit(maxLinkAuth)
	mine := newNonce()
	var msg []byte
	err = ws.WriteJSON(linkAuth{Replica: f.self, Nonce: mine})
	if err == nil {
		_, msg, err = ws.ReadMessage()
	}
	if err != nil {
		ws.Close()
		return
	}
	binding := channelBinding(ws)
	hello, ok := checkDialer(f.token, f.self, msg, mine, binding)
	if !ok {
		g.metrics.AuthFailures.WithLabelValues(metrics.ReasonBadToken.String()).Inc()
		g.limiter.fail(src)
		g.log.Warn("rejected cluster link: bad proof of cluster.token", "source", src, "replica", truncate(hello.Replica, 64))
		ws.Close()
		return
	}
	if err := ws.WriteJSON(linkAuth{MAC: linkMAC(f.token, macAccepter, hello.Replica, f.self, hello.Nonce, mine, binding)}); err != nil {
		ws.Close()
		return
	}
	ws.SetReadDeadline(time.Time{})
	ws.SetWriteDeadline(time.Time{})
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	// The dialer opens the streams, so it plays the tunnel's gateway
	// side; this replica accepts them as an agent would.
	sess, err := tunnel.Client(ctx, ws, tunnel.Config{Protocol: protocol.ProtocolYamux, WriteTimeout: 10 * time.Second,
		MaxStreamWindow: g.conf().MaxStreamWindow, Logger: g.log})
	cancel()
	if err != nil {
		g.log.Warn("cluster link handshake failed", "replica", hello.Replica, "err", err)
		return
	}
	if !f.addIncoming(sess) {
		sess.Close()
		return
	}
	defer f.removeIncoming(sess)
	g.log.Info("cluster link accepted", "replica", hello.Replica, "remote", r.RemoteAddr)
	for {
		in, err := sess.Accept(context.Background())
		if err != nil {
			return
		}
		go f.serveForwarded(in)
	}
}

// dialLink opens this replica's link to r and authenticates both ends.
// The returned session opens streams to r.
func (f *fabric) dialLink(ctx context.Context, r cluster.Replica) (*tunnel.Session, error) {
	g := f.g
	scheme, tlsCfg := "ws", (*tls.Config)(nil)
	if g.cfg.TLS != nil {
		// Replicas reach each other by address, which the public
		// certificate does not name: the HMAC proofs, bound to this TLS
		// connection, authenticate the peer instead.
		scheme, tlsCfg = "wss", &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} //nolint:gosec // peer authenticated by the channel-bound HMAC
	}
	d := websocket.Dialer{HandshakeTimeout: g.cfg.HandshakeTimeout.Duration, TLSClientConfig: tlsCfg,
		ReadBufferSize: 64 << 10, WriteBufferSize: 64 << 10}
	url := scheme + "://" + r.Advertise + clusterPath
	ws, resp, err := d.DialContext(ctx, url, nil)
	if err != nil {
		if resp != nil {
			resp.Body.Close()
		}
		return nil, fmt.Errorf("cluster link to %s (%s): %w", r.ID, r.Advertise, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		ws.SetReadDeadline(dl)
		ws.SetWriteDeadline(dl)
	}
	ws.SetReadLimit(maxLinkAuth)
	var theirs, proof linkAuth
	mine := newNonce()
	if err := ws.ReadJSON(&theirs); err != nil {
		ws.Close()
		return nil, fmt.Errorf("cluster link to %s: %w", r.ID, err)
	}
	binding := channelBinding(ws)
	err = ws.WriteJSON(linkAuth{Replica: f.self, Nonce: mine,
		MAC: linkMAC(f.token, macDialer, f.self, theirs.Replica, mine, theirs.Nonce, binding)})
	if err == nil {
		err = ws.ReadJSON(&proof)
	}
	if err != nil {
		ws.Close()
		return nil, fmt.Errorf("cluster link to %s: %w (is cluster.token the same on both?)", r.ID, err)
	}
	if theirs.Replica != r.ID || !macEqual(proof.MAC, linkMAC(f.token, macAccepter, f.self, theirs.Replica, mine, theirs.Nonce, binding)) {
		ws.Close()
		return nil, fmt.Errorf("cluster link to %s: %w", r.ID, errLinkAuth)
	}
	ws.SetReadDeadline(time.Time{})
	ws.SetWriteDeadline(time.Time{})
	cfg := g.conf()
	hello := &protocol.Hello{
		Version:             protocol.Version,
		Protocols:           []string{protocol.ProtocolYamux},
		HeartbeatIntervalMS: cfg.HeartbeatInterval.Milliseconds(),
		MaxMessageSize:      cfg.MaxMessageSize,
		MaxServices:         1,
		StreamWindow:        cfg.StreamWindow,
		Agent:               f.self,
		Server:              g.version,
		Replica:             f.self,
	}
	return tunnel.Server(ctx, ws, hello, g.tunnelConfig())
}
