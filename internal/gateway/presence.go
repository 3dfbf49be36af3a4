package gateway

import (
	"context"
	"fmt"
	"time"

	"github.com/portway/portway/internal/cluster"
	"github.com/portway/portway/internal/tunnel"
)

// rejoinInterval is how often a replica that lost its lease tries to
// join again.
const rejoinInterval = 2 * time.Second

// joinCluster publishes this replica's presence when a cluster: block
// exists, and watches its lease: a replica that loses it says so and joins
// again once etcd answers, publishing the sessions it still holds.
func (g *Gateway) joinCluster(ctx context.Context) error {
	c := g.cfg.Cluster
	if c == nil || g.etcd == nil {
		return nil
	}
	jctx, cancel := context.WithTimeout(ctx, c.Etcd.RequestTimeout.Duration)
	p, err := g.join(jctx)
	cancel()
	if err != nil {
		return fmt.Errorf("gateway: join the cluster in etcd %v: %w", c.Etcd.Endpoints, err)
	}
	g.setPresence(p)
	g.wg.Add(1)
	go g.keepPresence(p)
	return nil
}

func (g *Gateway) join(ctx context.Context) (*cluster.Etcd, error) {
	c := g.cfg.Cluster
	self := cluster.Replica{ID: c.ReplicaID, Advertise: c.Advertise}
	return cluster.Join(ctx, g.etcd, c.Etcd.Prefix, self, c.Etcd.LeaseTTL.Duration)
}

// keepPresence waits for the lease to be lost, then rejoins until it
// succeeds or the gateway closes, republishing the live sessions.
func (g *Gateway) keepPresence(p *cluster.Etcd) {
	defer g.wg.Done()
	for {
		select {
		case <-g.done:
			return
		case <-p.Lost():
		}
		g.etcdLost.Store(true)
		g.log.Error("lost this replica's lease in etcd: the other replicas no longer see its agent sessions; rejoining",
			"replica", g.cfg.Cluster.ReplicaID)
		t := time.NewTicker(rejoinInterval)
		for {
			select {
			case <-g.done:
				t.Stop()
				return
			case <-t.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), g.cfg.Cluster.Etcd.RequestTimeout.Duration)
			np, err := g.join(ctx)
			cancel()
			if err != nil {
				continue
			}
			g.setPresence(np)
			g.republish(np)
			g.etcdLost.Store(false)
			p = np
			g.log.Info("rejoined the cluster in etcd", "replica", g.cfg.Cluster.ReplicaID)
			break
		}
		t.Stop()
	}
}

// retryAfterSeconds is the Retry-After a replica without etcd gives the
// agents it refuses: about when it next tries to rejoin.
const retryAfterSeconds = "2"

// notReadyReason says why the gateway is not ready ("" when it is).
func (g *Gateway) notReadyReason() string {
	if !g.ready.Load() {
		return "not listening or state not loaded"
	}
	if g.etcdLost.Load() {
		return "lost this replica's lease in etcd (etcd unreachable or without quorum): new allocations fail and agents new to this replica are refused; ports already served keep working"
	}
	return ""
}

// refuseNewAgent reports whether an agent's handshake is refused because
// this replica lost its etcd lease. An agent this replica already knows
// (it held a session here since the gateway started) is let in: its
// ports are held here and a reconnect gets them back without etcd. A new
// one is sent to another replica: here it could not get a port, and the
// others could not see its session.
func (g *Gateway) refuseNewAgent(name string) bool {
	if !g.etcdLost.Load() {
		return false
	}
	return g.agentNamed(name) == nil
}

func (g *Gateway) setPresence(p cluster.Presence) {
	g.mu.Lock()
	g.presence = p
	g.mu.Unlock()
}

func (g *Gateway) currentPresence() cluster.Presence {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.presence
}

// republish publishes every live agent session again, after a rejoin.
func (g *Gateway) republish(p cluster.Presence) {
	for _, a := range g.agentList() {
		for _, in := range a.liveInstances() {
			ctx, cancel := context.WithTimeout(context.Background(), g.cfg.Cluster.Etcd.RequestTimeout.Duration)
			err := p.AddSession(ctx, cluster.Session{Agent: a.name, Instance: in.id, Protocol: in.sess.Protocol()})
			cancel()
			if err != nil {
				g.log.Warn("republishing an agent session in etcd", "agent", a.name, "instance", in.id, "err", err)
			}
		}
	}
}

// publishAttempts bounds the tries of publishSession. etcd does not
// retry a write cut short by a leader election (one member lost), and a
// record missing here is missing until the replica rejoins; the second
// try, after the election, finds a leader.
const publishAttempts = 2

// publishSession records an agent session in the cluster's presence,
// trying again once when etcd did not answer in time. It is called with no
// lock held, before the session's withdrawal is deferred, so a retry never
// outlives the session's end.
func (g *Gateway) publishSession(agent, instance string, sess *tunnel.Session) {
	p := g.currentPresence()
	if _, noop := p.(cluster.Noop); noop {
		return
	}
	rec := cluster.Session{Agent: agent, Instance: instance, Protocol: sess.Protocol()}
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), g.storeTimeout)
		err := p.AddSession(ctx, rec)
		cancel()
		if err == nil {
			return
		}
		select {
		case <-g.done:
			attempt = publishAttempts
		default:
		}
		if attempt >= publishAttempts {
			g.log.Warn("publishing an agent session in etcd", "agent", agent, "instance", instance, "attempts", attempt, "err", err)
			return
		}
	}
}

// withdrawSession removes an ended session from the presence, unless a
// newer session of the same instance took over (it published the same
// record).
func (g *Gateway) withdrawSession(agent, instance string, sess *tunnel.Session) {
	p := g.currentPresence()
	if _, noop := p.(cluster.Noop); noop {
		return
	}
	if a := g.agentNamed(agent); a != nil && a.replacedBy(instance, sess) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), g.storeTimeout)
	defer cancel()
	if err := p.RemoveSession(ctx, cluster.Session{Agent: agent, Instance: instance}); err != nil {
		g.log.Warn("withdrawing an agent session from etcd", "agent", agent, "instance", instance, "err", err)
	}
}

// agentNamed returns the agent's state, or nil.
func (g *Gateway) agentNamed(name string) *agentState {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.agents[name]
}

// leaveCluster withdraws this replica's presence (its lease) and closes
// the etcd client, after every session ended.
func (g *Gateway) leaveCluster() {
	if err := g.currentPresence().Close(); err != nil {
		g.log.Warn("leaving the cluster", "err", err)
	}
	if err := g.ports.st.Close(); err != nil {
		g.log.Warn("closing the allocation store", "err", err)
	}
	if g.etcd != nil {
		g.etcd.Close()
	}
}
