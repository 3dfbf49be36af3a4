package gateway

import (
	"net/http"
	"strconv"
)

// HandshakeRetryAfter is the Retry-After, in seconds, of an agent turned
// away because max_concurrent_handshakes were in progress. Agents wait that
// long plus up to as long again at random, so a storm of reconnects spreads
// over twice this time per round instead of coming back in one wave.
const HandshakeRetryAfter = 1

// admitHandshake takes one of the max_concurrent_handshakes slots, or
// reports that none is free. The limit is read from the live configuration,
// so a reload changes it for the next handshake. A slot is given back by
// handshakeDone once the hello exchange has ended either way: a session
// that is up costs little, a handshake in progress holds buffers, a
// goroutine and the CPU of its exchange, and those are what the limit
// bounds when thousands of agents reconnect at once.
func (g *Gateway) admitHandshake() bool {
	limit := int64(g.conf().MaxConcurrentHandshakes)
	if n := g.handshakes.Add(1); limit > 0 && n > limit {
		g.handshakes.Add(-1)
		return false
	}
	g.metrics.HandshakesInFlight.Inc()
	return true
}

// handshakeDone gives back the slot of admitHandshake.
func (g *Gateway) handshakeDone() {
	g.handshakes.Add(-1)
	g.metrics.HandshakesInFlight.Dec()
}

// deferHandshake answers an agent that found every handshake slot taken:
// 503 with Retry-After, before any WebSocket upgrade, so it costs the
// gateway one short HTTP response. Not logged: in a storm there are
// thousands; the counter tells.
func (g *Gateway) deferHandshake(w http.ResponseWriter) {
	g.metrics.HandshakesDeferred.Inc()
	w.Header().Set("Connection", "close")
	w.Header().Set("Retry-After", strconv.Itoa(HandshakeRetryAfter))
	http.Error(w, "gateway busy with other agents' handshakes; retry after the Retry-After delay", http.StatusServiceUnavailable)
}
