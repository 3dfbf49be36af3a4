package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Etcd is a replica's presence in etcd: its lease, kept alive in the
// background, and the records bound to it.
type Etcd struct {
	client *clientv3.Client
	prefix string
	self   Replica
	sess   *concurrency.Session
	cancel context.CancelFunc

	mu       sync.Mutex
	sessions map[string]Session // by key
}

// Join grants the replica a lease of ttl (whole seconds, at least etcd's
// minimum), publishes its record and keeps the lease alive until Close or
// until etcd cannot be reached for ttl. ctx bounds the join itself.
func Join(ctx context.Context, client *clientv3.Client, prefix string, self Replica, ttl time.Duration) (*Etcd, error) {
	secs := int64((ttl + time.Second - 1) / time.Second)
	grant, err := client.Grant(ctx, secs)
	if err != nil {
		return nil, fmt.Errorf("cluster: grant lease: %w", err)
	}
	kctx, cancel := context.WithCancel(context.Background())
	sess, err := concurrency.NewSession(client, concurrency.WithLease(grant.ID), concurrency.WithContext(kctx))
	if err != nil {
		cancel()
		return nil, fmt.Errorf("cluster: keep lease alive: %w", err)
	}
	if self.Since.IsZero() {
		self.Since = time.Now().UTC()
	}
	b, _ := json.Marshal(self)
	if _, err := client.Put(ctx, replicaKey(prefix, self.ID), string(b), clientv3.WithLease(grant.ID)); err != nil {
		cancel()
		revokeCtx, rcancel := context.WithTimeout(context.Background(), time.Second)
		client.Revoke(revokeCtx, grant.ID)
		rcancel()
		return nil, fmt.Errorf("cluster: publish replica %s: %w", self.ID, err)
	}
	return &Etcd{client: client, prefix: prefix, self: self, sess: sess, cancel: cancel, sessions: map[string]Session{}}, nil
}

// Lease is the replica's lease id.
func (e *Etcd) Lease() clientv3.LeaseID { return e.sess.Lease() }

// Lost implements Presence.
func (e *Etcd) Lost() <-chan struct{} { return e.sess.Done() }

func (e *Etcd) lost() bool {
	select {
	case <-e.sess.Done():
		return true
	default:
		return false
	}
}

// AddSession implements Presence.
func (e *Etcd) AddSession(ctx context.Context, s Session) error {
	if e.lost() {
		return errLost
	}
	s.Replica = e.self.ID
	if s.Since.IsZero() {
		s.Since = time.Now().UTC()
	}
	key := sessionKey(e.prefix, s)
	b, _ := json.Marshal(s)
	if _, err := e.client.Put(ctx, key, string(b), clientv3.WithLease(e.sess.Lease())); err != nil {
		return fmt.Errorf("cluster: publish session of %s: %w", s.Agent, err)
	}
	e.mu.Lock()
	e.sessions[key] = s
	e.mu.Unlock()
	return nil
}

// RemoveSession implements Presence.
func (e *Etcd) RemoveSession(ctx context.Context, s Session) error {
	s.Replica = e.self.ID
	key := sessionKey(e.prefix, s)
	e.mu.Lock()
	delete(e.sessions, key)
	e.mu.Unlock()
	if e.lost() {
		return nil // gone with the lease
	}
	if _, err := e.client.Delete(ctx, key); err != nil {
		return fmt.Errorf("cluster: withdraw session of %s: %w", s.Agent, err)
	}
	return nil
}

// Sessions returns the sessions this replica has published.
func (e *Etcd) Sessions() []Session {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]Session, 0, len(e.sessions))
	for _, s := range e.sessions {
		out = append(out, s)
	}
	return out
}

// revokeTimeout bounds Close's revoke: when etcd does not answer, the
// lease expires by itself after its TTL anyway.
const revokeTimeout = 2 * time.Second

// Close implements Presence: it revokes the lease, which removes every
// record of the replica at once.
func (e *Etcd) Close() error {
	defer e.cancel()
	if e.lost() {
		return nil
	}
	e.sess.Orphan() // stop the keep-alive; the revoke below ends the lease
	ctx, cancel := context.WithTimeout(context.Background(), revokeTimeout)
	defer cancel()
	if _, err := e.client.Revoke(ctx, e.sess.Lease()); err != nil {
		return fmt.Errorf("cluster: revoke lease: %w", err)
	}
	return nil
}

// View is everyone's presence as read from etcd.
type View struct {
	Replicas []Replica
	Sessions []Session
	Revision int64
}

// Read returns the presence records under prefix. Records that do not
// decode are skipped.
func Read(ctx context.Context, client *clientv3.Client, prefix string) (View, error) {
	var v View
	resp, err := client.Get(ctx, prefix+replicasDir, clientv3.WithPrefix())
	if err != nil {
		return v, fmt.Errorf("cluster: read replicas: %w", err)
	}
	for _, kv := range resp.Kvs {
		if r, err := DecodeReplica(prefix, kv.Key, kv.Value); err == nil {
			v.Replicas = append(v.Replicas, r)
		}
	}
	sresp, err := client.Get(ctx, prefix+sessionsDir, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision))
	if err != nil {
		return v, fmt.Errorf("cluster: read sessions: %w", err)
	}
	for _, kv := range sresp.Kvs {
		if s, err := DecodeSession(prefix, kv.Key, kv.Value); err == nil {
			v.Sessions = append(v.Sessions, s)
		}
	}
	v.Revision = resp.Header.Revision
	return v, nil
}

// Change is one presence record appearing or vanishing.
type Change struct {
	// Replica or Session is set: the record that changed. After a
	// delete only its key's fields are known.
	Replica *Replica
	Session *Session
	Deleted bool
	Err     error
}

// Watch streams presence changes after revision after until ctx ends. A
// Change with Err set is the last.
func Watch(ctx context.Context, client *clientv3.Client, prefix string, after int64) <-chan Change {
	out := make(chan Change)
	go func() {
		defer close(out)
		send := func(c Change) bool {
			select {
			case out <- c:
				return true
			case <-ctx.Done():
				return false
			}
		}
		for resp := range client.Watch(clientv3.WithRequireLeader(ctx), prefix, clientv3.WithPrefix(), clientv3.WithRev(after+1), clientv3.WithPrevKV()) {
			if err := resp.Err(); err != nil {
				send(Change{Err: fmt.Errorf("cluster: watch presence: %w", err)})
				return
			}
			for _, ev := range resp.Events {
				kv, deleted := ev.Kv, ev.Type == clientv3.EventTypeDelete
				if deleted && ev.PrevKv != nil {
					kv = ev.PrevKv
				}
				var c Change
				c.Deleted = deleted
				if r, err := DecodeReplica(prefix, kv.Key, kv.Value); err == nil {
					c.Replica = &r
				} else if s, err := DecodeSession(prefix, kv.Key, kv.Value); err == nil {
					c.Session = &s
				} else {
					continue
				}
				if !send(c) {
					return
				}
			}
		}
		if ctx.Err() == nil {
			send(Change{Err: fmt.Errorf("cluster: watch presence ended")})
		}
	}()
	return out
}
