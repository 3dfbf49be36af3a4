package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/url"
	"strconv"
	"time"
)

// errSameReplica ends a session that reached a gateway replica another of
// the agent's sessions holds already.
var errSameReplica = errors.New("session reached a gateway replica this agent is already connected to")

// target is one place to dial: a gateway URL, and for a URL whose host has
// several addresses, one of them. The URL's host stays the TLS server name
// and the Host header whichever address is dialed.
type target struct {
	url string
	// addr is the host:port to dial instead of the URL's host; "" dials
	// the URL as it is.
	addr string
}

func (t target) String() string {
	if t.addr == "" {
		return t.url
	}
	return t.url + " via " + t.addr
}

// slot is one of the agent's connections: the target it dials or holds,
// and the replica its live session reached.
type slot struct {
	target  target
	replica string
	// turn advances at each attempt, so a slot that keeps failing moves
	// on to another target.
	turn int
}

// resolveTimeout bounds the lookup of a gateway host's addresses.
const resolveTimeout = 5 * time.Second

// targets lists the places to dial: each URL, or each address of a URL
// whose host resolves to several. A URL whose host is an address, or does
// not resolve now, is one target dialed as it is.
func (a *Agent) targets(ctx context.Context) []target {
	var out []target
	for _, raw := range a.cfg.Gateway.GatewayURLs() {
		u, err := url.Parse(raw)
		if err != nil {
			continue // Validate refused it
		}
		host := u.Hostname()
		if net.ParseIP(host) != nil {
			out = append(out, target{url: raw})
			continue
		}
		port := u.Port()
		if port == "" {
			port = "80"
			if u.Scheme == "wss" {
				port = "443"
			}
		}
		rctx, cancel := context.WithTimeout(ctx, resolveTimeout)
		addrs, err := a.lookupHost(rctx, host)
		cancel()
		if err != nil || len(addrs) < 2 {
			out = append(out, target{url: raw})
			continue
		}
		for _, ip := range addrs {
			out = append(out, target{url: raw, addr: net.JoinHostPort(ip, port)})
		}
	}
	return out
}

// connections returns how many sessions to keep: gateway.connections, or
// by default two where the URLs name more than one address, else one.
func (a *Agent) connections(ctx context.Context) int {
	if n := a.cfg.Gateway.Connections; n > 0 {
		return n
	}
	return max(1, min(2, len(a.targets(ctx))))
}

// chooseTarget picks the target slot i dials next: one no other slot is
// dialing or holding, taken in turn so that a target that fails is not
// retried first; when every target is taken (one URL behind a load
// balancer), the next in turn.
func (a *Agent) chooseTarget(ctx context.Context, i int) target {
	list := a.targets(ctx)
	a.mu.Lock()
	defer a.mu.Unlock()
	sl := a.slots[i]
	if sl == nil {
		sl = &slot{turn: i}
		a.slots[i] = sl
	}
	if len(list) == 0 {
		return target{url: a.cfg.Gateway.URL}
	}
	taken := map[target]bool{}
	for j, other := range a.slots {
		if j != i {
			taken[other.target] = true
		}
	}
	pick := list[sl.turn%len(list)]
	for k := range list {
		if t := list[(sl.turn+k)%len(list)]; !taken[t] {
			pick = t
			break
		}
	}
	sl.turn++
	sl.target = pick
	return pick
}

// dialer returns the TCP dialer for tgt: the configured one, aimed at the
// target's address when it has one.
func (a *Agent) dialer(tgt target) func(ctx context.Context, network, addr string) (net.Conn, error) {
	dial := a.netDial
	if tgt.addr == "" {
		return dial
	}
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	return func(ctx context.Context, network, _ string) (net.Conn, error) {
		return dial(ctx, network, tgt.addr)
	}
}

// claimReplica records that slot i's session reached replica. It reports
// false, with the other slot, when another slot's live session holds that
// replica already. A gateway that names no replica is never a duplicate.
func (a *Agent) claimReplica(i int, replica string) (int, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if replica != "" {
		for j, other := range a.slots {
			if j != i && other.replica == replica {
				return j, true
			}
		}
	}
	if sl := a.slots[i]; sl != nil {
		sl.replica = replica
	}
	return 0, false
}

// releaseReplica forgets the replica of slot i's ended session.
func (a *Agent) releaseReplica(i int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if sl := a.slots[i]; sl != nil {
		sl.replica = ""
	}
}

// slotInstance is the instance id slot i of n sends: the process's, with
// the slot's number when there are several, so that the sessions of one
// process to one replica (briefly, before the duplicate is closed) are not
// taken for a reconnect that replaces the other.
func (a *Agent) slotInstance(i, n int) string {
	if n == 1 {
		return a.instance
	}
	return a.instance + "/" + strconv.Itoa(i)
}

// instanceID names this agent process for the gateway: POD_NAME when set
// (Kubernetes, through the downward API), else 8 random bytes in hex. A
// pod's name outlives a restart of its container, so a restarted agent
// replaces its predecessor's session at once, where a fresh random id
// would leave the dead one counted, and sent connections, until the
// gateway's heartbeat timeout.
func instanceID(getenv func(string) string) string {
	if v := getenv("POD_NAME"); v != "" {
		return v
	}
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
