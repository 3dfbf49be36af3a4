package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/cluster"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/relay"
	"github.com/portway/portway/internal/store"
	"github.com/portway/portway/internal/tunnel"
)

// fabric is what a replica of a cluster needs to serve every allocated
// port: the other replicas and the agent sessions each holds (watched in
// the presence records), the allocations (watched in the store) with the
// mirror listeners it opened for ports whose agent it holds no session
// of, and its links to the other replicas.
//
// fabric.mu is a leaf: nothing is called under it but socket binds
// (mirror listeners, a local syscall), and no network I/O is done while
// holding it. Mirror services are closed and link sessions ended after
// unlocking.
type fabric struct {
	g     *Gateway
	self  string
	token []byte
	log   *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	// viewed is closed once the presence records were first read: the
	// mirrors wait for it, so that a replica starting up does not refuse
	// clients for want of knowing where their agents are.
	viewed chan struct{}

	mu sync.Mutex
	// replicas are the replica records; sessions count, per agent, the
	// sessions each replica holds.
	replicas map[string]cluster.Replica
	sessions map[string]map[string]int
	// records are the session records themselves, for the admin API.
	records map[sessionID]cluster.Session
	// links are this replica's links to the others, by replica id.
	links map[string]*link
	// unreachable holds when a dial to a replica last failed: for
	// dialBackoff it is tried after the others, so that a replica that
	// died without a word (its records live until its lease expires)
	// does not cost every connection a dial timeout.
	unreachable map[string]time.Time
	// incoming are the links other replicas opened to this one.
	incoming map[*tunnel.Session]bool
	// allocs are the allocations as last seen in the store.
	allocs map[store.Key]store.Allocation
	// mirrors serve ports whose service is not registered here.
	mirrors map[store.Key]publicService
	// local counts the sockets of services registered here per port:
	// while one is open (or being opened) no mirror binds the port.
	local map[store.Key]int
	// bindFailed are the ports whose mirror could not be bound, each
	// logged once until it is; retrying is set while a retry of
	// reconcile is scheduled.
	bindFailed map[store.Key]bool
	retrying   atomic.Bool
	next       uint64
	closed     bool
}

// sessionID is a session record's key.
type sessionID struct{ replica, agent, instance string }

func idOf(s cluster.Session) sessionID { return sessionID{s.Replica, s.Agent, s.Instance} }

// link is one outgoing link; ready is closed once sess or err is set.
type link struct {
	advertise string
	ready     chan struct{}
	sess      *tunnel.Session
	err       error
}

// errNoReplica: no other replica holds a session of the agent.
var errNoReplica = errors.New("no replica holds a session of the agent")

// maxForwardTries bounds the replicas one forward tries.
const maxForwardTries = 3

// dialBackoff is how long a replica that could not be dialled is tried
// last.
const dialBackoff = 5 * time.Second

// watchRetry spaces the restarts of a failed watch.
const watchRetry = time.Second

func newFabric(g *Gateway) *fabric {
	ctx, cancel := context.WithCancel(context.Background())
	return &fabric{g: g, self: g.cfg.Cluster.ReplicaID, token: []byte(g.cfg.Cluster.Token), log: g.log,
		ctx: ctx, cancel: cancel, viewed: make(chan struct{}),
		replicas: map[string]cluster.Replica{}, sessions: map[string]map[string]int{}, records: map[sessionID]cluster.Session{},
		links: map[string]*link{}, unreachable: map[string]time.Time{}, incoming: map[*tunnel.Session]bool{},
		allocs: map[store.Key]store.Allocation{}, mirrors: map[store.Key]publicService{}, local: map[store.Key]int{}, bindFailed: map[store.Key]bool{}}
}

// start watches the presence records and the allocations.
func (f *fabric) start() {
	f.g.wg.Add(2)
	go func() {
		defer f.g.wg.Done()
		f.watchPresence()
	}()
	go func() {
		defer f.g.wg.Done()
		f.watchAllocations()
	}()
}

// stop ends the watches, closes the mirrors and every link.
func (f *fabric) stop() {
	f.cancel()
	f.mu.Lock()
	f.closed = true
	mirrors := make([]publicService, 0, len(f.mirrors))
	for k, m := range f.mirrors {
		mirrors = append(mirrors, m)
		delete(f.mirrors, k)
	}
	var sessions []*tunnel.Session
	for id, l := range f.links {
		if l.sess != nil {
			sessions = append(sessions, l.sess)
		}
		delete(f.links, id)
	}
	for s := range f.incoming {
		sessions = append(sessions, s)
	}
	f.mu.Unlock()
	for _, m := range mirrors {
		m.close()
	}
	for _, s := range sessions {
		s.CloseWithError(protocol.CodeShutdown, "gateway shutting down")
	}
}

// sleep waits d unless the fabric stops first; it reports whether to go on.
func (f *fabric) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-f.ctx.Done():
		return false
	}
}

// watchPresence keeps the view of replicas and sessions: a read, then a
// watch from its revision, again after any failure.
func (f *fabric) watchPresence() {
	c := f.g.cfg.Cluster
	for f.ctx.Err() == nil {
		rctx, cancel := context.WithTimeout(f.ctx, c.Etcd.RequestTimeout.Duration)
		v, err := cluster.Read(rctx, f.g.etcd, c.Etcd.Prefix)
		cancel()
		if err != nil {
			if !f.sleep(watchRetry) {
				return
			}
			continue
		}
		f.mu.Lock()
		f.replicas = map[string]cluster.Replica{}
		for _, r := range v.Replicas {
			f.replicas[r.ID] = r
		}
		f.sessions = map[string]map[string]int{}
		f.records = map[sessionID]cluster.Session{}
		for _, s := range v.Sessions {
			f.addSessionLocked(s)
		}
		f.mu.Unlock()
		select {
		case <-f.viewed:
		default:
			close(f.viewed)
		}
		f.reconcile()
		for ch := range cluster.Watch(f.ctx, f.g.etcd, c.Etcd.Prefix, v.Revision) {
			if ch.Err != nil {
				break
			}
			f.mu.Lock()
			switch {
			case ch.Replica != nil && ch.Deleted:
				delete(f.replicas, ch.Replica.ID)
				delete(f.unreachable, ch.Replica.ID)
			case ch.Replica != nil:
				f.replicas[ch.Replica.ID] = *ch.Replica
			case ch.Session != nil && ch.Deleted:
				if _, ok := f.records[idOf(*ch.Session)]; !ok {
					break
				}
				delete(f.records, idOf(*ch.Session))
				if m := f.sessions[ch.Session.Agent]; m != nil {
					if m[ch.Session.Replica]--; m[ch.Session.Replica] <= 0 {
						delete(m, ch.Session.Replica)
					}
					if len(m) == 0 {
						delete(f.sessions, ch.Session.Agent)
					}
				}
			case ch.Session != nil:
				f.addSessionLocked(*ch.Session)
			}
			f.mu.Unlock()
			if ch.Session != nil {
				f.reconcile()
			}
		}
		if !f.sleep(watchRetry / 4) {
			return
		}
	}
}

func (f *fabric) addSessionLocked(s cluster.Session) {
	if _, ok := f.records[idOf(s)]; ok {
		f.records[idOf(s)] = s // rewritten: counted already
		return
	}
	f.records[idOf(s)] = s
	m := f.sessions[s.Agent]
	if m == nil {
		m = map[string]int{}
		f.sessions[s.Agent] = m
	}
	m[s.Replica]++
}

// peers returns the other replicas holding a session of agent, in turn
// from a rotating start.
func (f *fabric) peers(agent string) []cluster.Replica {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []cluster.Replica
	for id, n := range f.sessions[agent] {
		if r, ok := f.replicas[id]; ok && n > 0 && id != f.self && r.Advertise != "" {
			out = append(out, r)
		}
	}
	if len(out) > 1 {
		slices.SortFunc(out, func(a, b cluster.Replica) int { return strings.Compare(a.ID, b.ID) })
		f.next++
		k := int(f.next % uint64(len(out)))
		out = append(out[k:], out[:k]...)
		if len(f.unreachable) > 0 {
			now := time.Now()
			slices.SortStableFunc(out, func(a, b cluster.Replica) int {
				return boolCmp(now.Sub(f.unreachable[a.ID]) < dialBackoff, now.Sub(f.unreachable[b.ID]) < dialBackoff)
			})
		}
	}
	return out
}

// linkTo returns the link to r, dialling it if there is none. Callers
// wanting the same replica at once share one dial.
func (f *fabric) linkTo(ctx context.Context, r cluster.Replica) (*tunnel.Session, error) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil, errors.New("gateway shutting down")
	}
	l := f.links[r.ID]
	if l != nil && l.advertise == r.Advertise {
		f.mu.Unlock()
		select {
		case <-l.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if l.err != nil {
			return nil, l.err
		}
		return l.sess, nil
	}
	stale := l
	l = &link{advertise: r.Advertise, ready: make(chan struct{})}
	f.links[r.ID] = l
	f.mu.Unlock()
	if stale != nil && stale.sess != nil {
		stale.sess.Close()
	}
	sess, err := f.dialLink(ctx, r)
	f.mu.Lock()
	l.sess, l.err = sess, err
	if err != nil && f.links[r.ID] == l {
		delete(f.links, r.ID)
	}
	// A replica failing again within dialBackoff is logged at debug
	// level: a dead replica must not log once per client.
	now := time.Now()
	prev, failedBefore := f.unreachable[r.ID]
	if err != nil {
		f.unreachable[r.ID] = now
	} else {
		delete(f.unreachable, r.ID)
	}
	closed := f.closed
	f.mu.Unlock()
	close(l.ready)
	if err != nil {
		level := slog.LevelWarn
		if failedBefore && now.Sub(prev) < dialBackoff {
			level = slog.LevelDebug
		}
		f.log.Log(context.Background(), level, "cannot reach a replica to forward to", "replica", r.ID, "err", err)
		return nil, err
	}
	if closed {
		sess.Close()
		return nil, errors.New("gateway shutting down")
	}
	f.log.Info("cluster link up", "replica", r.ID, "advertise", r.Advertise)
	go func() {
		<-sess.Done()
		f.mu.Lock()
		if f.links[r.ID] == l {
			delete(f.links, r.ID)
		}
		f.mu.Unlock()
	}()
	return sess, nil
}

func (f *fabric) addIncoming(s *tunnel.Session) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.incoming[s] = true
	return true
}

func (f *fabric) removeIncoming(s *tunnel.Session) {
	f.mu.Lock()
	delete(f.incoming, s)
	f.mu.Unlock()
}

// boolCmp orders false before true.
func boolCmp(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// linkService names a forwarded stream's service on a link: the agent,
// then the service id (agent names hold no "/").
func linkService(agent, id string) string { return agent + "/" + id }

// open opens a stream for h, a connection to agent's service that this
// replica cannot carry itself, on the link to a replica holding a session
// of agent. It returns the replica's id.
func (f *fabric) open(ctx context.Context, agent string, h protocol.StreamHeader) (tunnel.Stream, string, error) {
	peers := f.peers(agent)
	if len(peers) == 0 {
		return nil, "", errNoReplica
	}
	h.Service = linkService(agent, h.Service)
	if len(h.Service) > protocol.MaxServiceIDLen {
		return nil, "", fmt.Errorf("forward: agent and service names are too long for a stream header")
	}
	var err error
	for i, r := range peers {
		if i >= maxForwardTries || ctx.Err() != nil {
			break
		}
		var sess *tunnel.Session
		if sess, err = f.linkTo(ctx, r); err != nil {
			continue
		}
		var st tunnel.Stream
		if st, err = sess.Open(ctx, h); err == nil {
			return st, r.ID, nil
		}
	}
	return nil, "", err
}

// serveForwarded carries a stream another replica forwarded: it opens it
// on a local session of the agent (the least busy instance) and splices
// the two. A forwarded stream is never forwarded again: when no local
// session of the agent serves the service, it is refused, so a stale view
// of the presence cannot make two replicas pass a connection back and
// forth.
func (f *fabric) serveForwarded(in *tunnel.Incoming) {
	h, err := in.Header()
	if err != nil {
		in.Reject(protocol.StatusError)
		return
	}
	agent, id, ok := strings.Cut(h.Service, "/")
	if !ok {
		in.Reject(protocol.StatusUnknownService)
		return
	}
	var ps publicService
	if a := f.g.agentNamed(agent); a != nil {
		a.mu.Lock()
		ps = a.services[protocol.ServiceKey{ID: id, Kind: h.Kind}]
		a.mu.Unlock()
	}
	if ps == nil {
		in.Reject(protocol.StatusUnknownService)
		return
	}
	b := ps.base()
	inst := b.pick()
	if inst == nil {
		in.Reject(protocol.StatusUnknownService)
		return
	}
	h.Service = id
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	st, inst, err := b.open(ctx, inst, h)
	cancel()
	if err != nil {
		b.refuse(metrics.ReasonTunnelError)
		in.Reject(protocol.StatusError)
		return
	}
	ls, err := in.Accept()
	if err != nil {
		st.Reset()
		inst.active.Add(-1)
		return
	}
	if h.Kind == protocol.KindUDP {
		splicePackets(tunnel.AsPackets(ls), tunnel.AsPackets(st))
		inst.active.Add(-1)
		return
	}
	relay.Start(ls, st, relay.Options{BufferSize: b.conf().BufferSize}, nil, func(relay.Result) {
		inst.active.Add(-1)
	})
}

// splicePackets copies datagrams both ways between a and b until either
// ends, then closes both. The datagram framing of each side is its own
// (a link is always yamux, an agent session may be json).
func splicePackets(a, b tunnel.PacketConn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src tunnel.PacketConn) {
		buf := make([]byte, tunnel.PacketHeadroom+protocol.MaxDatagram)
		for {
			n, err := src.ReadPacket(buf[tunnel.PacketHeadroom:])
			if errors.Is(err, protocol.ErrDatagramTooLarge) {
				continue
			}
			if err != nil || dst.WritePacket(buf[:tunnel.PacketHeadroom+n]) != nil {
				break
			}
		}
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	a.Close()
	b.Close()
	<-done
}

// forwardTCP carries an admitted connection c, which no local session of
// the agent can take, through a replica that holds one. The caller has
// done the source checks; release undoes their counts.
func (s *tcpService) forwardTCP(c *net.TCPConn, h protocol.StreamHeader, release func()) {
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	st, to, err := s.fwd.open(ctx, s.agent, h)
	cancel()
	if err != nil {
		release()
		if errors.Is(err, errNoReplica) {
			s.refuse(metrics.ReasonNoReplica)
		} else {
			s.refuse(metrics.ReasonTunnelError)
		}
		relay.Abort(c)
		return
	}
	s.enter()
	s.metrics.Forwarded.WithLabelValues(s.agent, h.Service).Inc()
	stats := new(relay.Stats)
	flow := s.metrics.ForwardedBytes.Track(func() (int64, int64) { return stats.ToBackend.Load(), stats.FromBackend.Load() }, s.agent, h.Service)
	relay.Start(c, st, relay.Options{BufferSize: s.conf().BufferSize, IdleTimeout: time.Duration(s.spec.Load().IdleTimeoutMS) * time.Millisecond},
		stats, func(res relay.Result) {
			flow.Done()
			s.leave()
			release()
			s.log.Debug("forwarded connection closed", "agent", s.agent, "service", h.Service, "replica", to,
				"in", stats.ToBackend.Load(), "out", stats.FromBackend.Load(), "err", res.Err)
		})
}

// servedBy reports, for the admin API, how this replica serves port key:
// "local", "forwarded" (a mirror) or "" (not at all).
func (f *fabric) servedBy(k store.Key) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case f.local[k] > 0:
		return "local"
	case f.mirrors[k] != nil:
		return "forwarded"
	}
	return ""
}

// info describes the cluster as this replica sees it, for the admin API.
func (f *fabric) info() adminapi.ClusterInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	ci := adminapi.ClusterInfo{Replica: f.self, Forwarding: true}
	byReplica := map[string]*adminapi.ReplicaInfo{}
	for id, r := range f.replicas {
		ri := &adminapi.ReplicaInfo{ID: id, Advertise: r.Advertise, Since: r.Since}
		if l := f.links[id]; l != nil && l.sess != nil {
			ri.Link = "up"
		}
		byReplica[id] = ri
	}
	for _, s := range f.records {
		ri := byReplica[s.Replica]
		if ri == nil {
			ri = &adminapi.ReplicaInfo{ID: s.Replica}
			byReplica[s.Replica] = ri
		}
		ri.Sessions = append(ri.Sessions, adminapi.ClusterSession{Agent: s.Agent, Instance: s.Instance, Protocol: s.Protocol})
	}
	for _, ri := range byReplica {
		slices.SortFunc(ri.Sessions, func(a, b adminapi.ClusterSession) int {
			return strings.Compare(a.Agent+"\x00"+a.Instance, b.Agent+"\x00"+b.Instance)
		})
		ci.Replicas = append(ci.Replicas, *ri)
	}
	slices.SortFunc(ci.Replicas, func(a, b adminapi.ReplicaInfo) int { return strings.Compare(a.ID, b.ID) })
	for k, a := range f.allocs {
		pi := adminapi.PortInfo{Protocol: k.Protocol.String(), Port: k.Port, Agent: a.Agent, Service: a.Service, Live: a.Live}
		switch {
		case f.local[k] > 0:
			pi.Served = "local"
		case f.mirrors[k] != nil:
			pi.Served = "forwarded"
		}
		for id := range f.sessions[a.Agent] {
			if id != f.self {
				pi.Via = append(pi.Via, id)
			}
		}
		slices.Sort(pi.Via)
		ci.Ports = append(ci.Ports, pi)
	}
	slices.SortFunc(ci.Ports, func(a, b adminapi.PortInfo) int {
		if a.Protocol != b.Protocol {
			return strings.Compare(a.Protocol, b.Protocol)
		}
		return a.Port - b.Port
	})
	return ci
}

// keyOf is the store key of a public port.
func keyOf(kind protocol.Kind, port int) store.Key { return store.Key{Protocol: kind, Port: port} }

// portString is a port for the log.
func portString(k store.Key) string { return k.Protocol.String() + "/" + strconv.Itoa(k.Port) }
