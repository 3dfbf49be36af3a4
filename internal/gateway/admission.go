package gateway

import (
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Bounds of the Retry-After given to an agent turned away because
// max_concurrent_handshakes were in progress. Agents wait that long plus up
// to as long again at random.
const (
	minHandshakeRetryAfter = 1 * time.Second
	maxHandshakeRetryAfter = 10 * time.Second
)

// admission is the gateway's admission control for agent handshakes: a
// count of handshakes in progress against max_concurrent_handshakes, and
// the rates that size Retry-After.
//
// Retry-After follows the load: it is the time the gateway needs to admit
// the agents it turned away in the last window of admissionWindow, at the
// pace handshakes have been taking (a moving average of their duration,
// max_concurrent_handshakes at a time), within 1–10 s. Were it fixed, ten
// thousand agents dropped at once would come back every second or two,
// and the gateway (and every agent) would spend its CPU turning them away
// rather than on the handshakes it admitted; spread over the time the
// gateway needs to admit them, the attempts stay close to what it can
// admit, and a small storm still comes back within a second or two.
// mu is a leaf lock.
type admission struct {
	mu       sync.Mutex
	inFlight int
	limit    int // max_concurrent_handshakes, as of the last admit
	// now is the clock (tests replace it).
	now         func() time.Time
	windowStart time.Time
	deferred    int // attempts deferred in the current window
	retryAfter  time.Duration
	// took is the moving average of how long a handshake takes.
	took time.Duration
}

// admissionWindow is the window over which the rates are counted.
const admissionWindow = time.Second

func (a *admission) rotate(now time.Time) {
	if a.windowStart.IsZero() {
		a.windowStart = now
	}
	if now.Sub(a.windowStart) < admissionWindow {
		return
	}
	var ra time.Duration
	if limit := max(a.limit, 1); a.deferred > 0 {
		ra = time.Duration(a.deferred) * a.took / time.Duration(limit)
		ra = ra.Round(time.Second)
	}
	a.retryAfter = min(max(ra, minHandshakeRetryAfter), maxHandshakeRetryAfter)
	a.windowStart, a.deferred = now, 0
}

// admit takes one of limit slots, or returns the Retry-After to answer
// with when none is free.
func (a *admission) admit(limit int) (ok bool, retryAfter time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.limit = limit
	a.rotate(a.now())
	if limit > 0 && a.inFlight >= limit {
		a.deferred++
		return false, max(a.retryAfter, minHandshakeRetryAfter)
	}
	a.inFlight++
	return true, 0
}

// done gives back a slot taken at admitted.
func (a *admission) done(admitted time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.inFlight--
	took := a.now().Sub(admitted)
	if a.took == 0 {
		a.took = took
	} else {
		a.took += (took - a.took) / 8
	}
}

// admitHandshake takes one of the max_concurrent_handshakes slots, or
// answers the agent 503 with Retry-After and reports false. The limit is
// read from the live configuration, so a reload changes it for the next
// handshake. A slot is given back by handshakeDone once the hello exchange
// has ended either way: a session that is up costs little, a handshake in
// progress holds buffers, a goroutine and the CPU of its exchange, and
// those are what the limit bounds when thousands of agents reconnect at
// once.
func (g *Gateway) admitHandshake(w http.ResponseWriter) (admitted time.Time, ok bool) {
	ok, retryAfter := g.admission.admit(g.conf().MaxConcurrentHandshakes)
	if !ok {
		g.deferHandshake(w, retryAfter)
		return time.Time{}, false
	}
	g.metrics.HandshakesInFlight.Inc()
	return g.admission.now(), true
}

// handshakeDone gives back the slot admitHandshake took at admitted.
func (g *Gateway) handshakeDone(admitted time.Time) {
	g.admission.done(admitted)
	g.metrics.HandshakesInFlight.Dec()
}

// deferHandshake answers an agent that found every handshake slot taken:
// 503 with Retry-After, before any WebSocket upgrade, so it costs the
// gateway one short HTTP response. Not logged: in a storm there are
// thousands; the counter tells.
func (g *Gateway) deferHandshake(w http.ResponseWriter, retryAfter time.Duration) {
	g.metrics.HandshakesDeferred.Inc()
	w.Header().Set("Connection", "close")
	w.Header().Set("Retry-After", strconv.Itoa(int(retryAfter/time.Second)))
	http.Error(w, "gateway busy with other agents' handshakes; retry after the Retry-After delay", http.StatusServiceUnavailable)
}
