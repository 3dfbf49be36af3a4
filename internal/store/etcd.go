package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/portway/portway/internal/protocol"
)

// Etcd is a Store shared by several gateway replicas: one key per port,
// PREFIX/ports/tcp/01234, whose value is the allocation as JSON. Every
// change is a transaction that compares the key's revision as it was read,
// so two replicas can never both win a port, and a retained allocation
// whose retention expired is taken over by whichever replica sees it first.
// Calls block until ctx ends when etcd has no quorum; the error then wraps
// ErrUnavailable.
type Etcd struct {
	client *clientv3.Client
	prefix string // ends in "ports/"
	opt    Options
}

// NewEtcd returns the etcd store under prefix (which ends in "/"). The
// client stays the caller's to close.
func NewEtcd(client *clientv3.Client, prefix string, opt Options) *Etcd {
	return &Etcd{client: client, prefix: prefix + "ports/", opt: opt}
}

// maxCASAttempts bounds the read-compare-write rounds of one operation;
// each lost round means another replica changed the key in between.
const maxCASAttempts = 8

// errContended is returned when every round lost to another writer.
var errContended = errors.New("port changed by other replicas on every attempt")

func (e *Etcd) key(k Key) string {
	return fmt.Sprintf("%s%s/%05d", e.prefix, k.Protocol, k.Port)
}

// ParseKey parses the port part of a key ("tcp/01234") under the prefix.
func ParseKey(s string) (Key, error) {
	proto, port, ok := strings.Cut(s, "/")
	if !ok {
		return Key{}, fmt.Errorf("key %q is not protocol/port", s)
	}
	var k Key
	switch proto {
	case "tcp":
		k.Protocol = protocol.KindTCP
	case "udp":
		k.Protocol = protocol.KindUDP
	default:
		return Key{}, fmt.Errorf("key %q: unknown protocol %q", s, proto)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 || fmt.Sprintf("%05d", n) != port {
		return Key{}, fmt.Errorf("key %q: port %q is not 00001-65535", s, port)
	}
	k.Port = n
	return k, nil
}

// decodeKV decodes an allocation stored at kv, checking that the value
// names the port of its key.
func (e *Etcd) decodeKV(kv *mvccpb.KeyValue) (Allocation, error) {
	return decodeEtcd(e.prefix, kv.Key, kv.Value, kv.ModRevision)
}

// decodeEtcd is decodeKV on the raw fields, for the fuzz target.
func decodeEtcd(prefix string, key, value []byte, rev int64) (Allocation, error) {
	rest, ok := strings.CutPrefix(string(key), prefix)
	if !ok {
		return Allocation{}, fmt.Errorf("key %q is outside %q", key, prefix)
	}
	k, err := ParseKey(rest)
	if err != nil {
		return Allocation{}, err
	}
	a, err := DecodeRecord(value)
	if err != nil {
		return Allocation{}, fmt.Errorf("key %q: %w", key, err)
	}
	if a.Key() != k {
		return Allocation{}, fmt.Errorf("key %q holds %s port %d", key, a.Protocol, a.Port)
	}
	a.Revision = rev
	return a, nil
}

func encode(a Allocation) string {
	b, _ := json.Marshal(a) // plain fields: cannot fail
	return string(b)
}

// Claim implements Store. A free port is taken in one transaction (create
// revision 0); a held one is read and, if claimable, replaced by a
// transaction that compares the revision read. A value that does not
// decode is treated as free: it names nobody.
func (e *Etcd) Claim(ctx context.Context, a Allocation) (Allocation, error) {
	if err := a.valid(); err != nil {
		return Allocation{}, fmt.Errorf("store: claim: %w", err)
	}
	key := e.key(a.Key())
	cmp := clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	for range maxCASAttempts {
		now := e.opt.now()
		a.Live, a.LastUsed = true, now
		resp, err := e.client.Txn(ctx).If(cmp).Then(clientv3.OpPut(key, encode(a))).Else(clientv3.OpGet(key)).Commit()
		if err != nil {
			return Allocation{}, unavailable(fmt.Sprintf("etcd: claim %s port %d", a.Protocol, a.Port), err)
		}
		if resp.Succeeded {
			a.Revision = resp.Header.Revision
			return a, nil
		}
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			cmp = clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
			continue // released meanwhile
		}
		cur, derr := e.decodeKV(kvs[0])
		if derr == nil && !e.opt.claimable(cur, a, now) {
			return Allocation{}, &TakenError{Holder: cur}
		}
		cmp = clientv3.Compare(clientv3.ModRevision(key), "=", kvs[0].ModRevision)
	}
	return Allocation{}, fmt.Errorf("etcd: claim %s port %d: %w", a.Protocol, a.Port, errContended)
}

// update rewrites the caller's own allocation at a's port with change
// applied, comparing the revision read. It returns ErrNotHeld when the
// key is gone or someone else's.
func (e *Etcd) update(ctx context.Context, op string, a Allocation, change func(*Allocation)) (Allocation, error) {
	// a.Revision, when set, is compared on the first read only: a later
	// round re-reads because of a concurrent write, which is then a
	// change the caller did not see.
	key := e.key(a.Key())
	for range maxCASAttempts {
		resp, err := e.client.Get(ctx, key)
		if err != nil {
			return Allocation{}, unavailable(fmt.Sprintf("etcd: %s %s port %d", op, a.Protocol, a.Port), err)
		}
		if len(resp.Kvs) == 0 {
			return Allocation{}, ErrNotHeld
		}
		cur, err := e.decodeKV(resp.Kvs[0])
		if err != nil || !cur.sameOwner(a) || (a.Revision != 0 && cur.Revision != a.Revision) {
			return Allocation{}, ErrNotHeld
		}
		change(&cur)
		tr, err := e.client.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", resp.Kvs[0].ModRevision)).
			Then(clientv3.OpPut(key, encode(cur))).Commit()
		if err != nil {
			return Allocation{}, unavailable(fmt.Sprintf("etcd: %s %s port %d", op, a.Protocol, a.Port), err)
		}
		if tr.Succeeded {
			cur.Revision = tr.Header.Revision
			return cur, nil
		}
	}
	return Allocation{}, fmt.Errorf("etcd: %s %s port %d: %w", op, a.Protocol, a.Port, errContended)
}

// Refresh implements Store, one transaction per allocation. It compares
// owners, not revisions: a refresh only restamps.
func (e *Etcd) Refresh(ctx context.Context, allocs []Allocation) (refreshed, lost []Allocation, err error) {
	for _, a := range allocs {
		a.Revision = 0
		got, err := e.update(ctx, "refresh", a, func(c *Allocation) { c.Live, c.LastUsed = true, e.opt.now() })
		switch {
		case errors.Is(err, ErrNotHeld):
			lost = append(lost, a)
		case err != nil:
			return refreshed, lost, err
		default:
			refreshed = append(refreshed, got)
		}
	}
	return refreshed, lost, nil
}

// Retain implements Store.
func (e *Etcd) Retain(ctx context.Context, a Allocation) (Allocation, error) {
	return e.update(ctx, "retain", a, func(c *Allocation) { c.Live, c.LastUsed = false, e.opt.now() })
}

// Release implements Store.
func (e *Etcd) Release(ctx context.Context, a Allocation) error {
	key := e.key(a.Key())
	for range maxCASAttempts {
		resp, err := e.client.Get(ctx, key)
		if err != nil {
			return unavailable(fmt.Sprintf("etcd: release %s port %d", a.Protocol, a.Port), err)
		}
		if len(resp.Kvs) == 0 {
			return nil
		}
		kv := resp.Kvs[0]
		cur, err := e.decodeKV(kv)
		if err != nil || !cur.sameOwner(a) || (a.Revision != 0 && kv.ModRevision != a.Revision) {
			return ErrNotHeld
		}
		tr, err := e.client.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
			Then(clientv3.OpDelete(key)).Commit()
		if err != nil {
			return unavailable(fmt.Sprintf("etcd: release %s port %d", a.Protocol, a.Port), err)
		}
		if tr.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("etcd: release %s port %d: %w", a.Protocol, a.Port, errContended)
}

// List implements Store. Values that do not decode are skipped: they
// name nobody, and a claim replaces them.
func (e *Etcd) List(ctx context.Context) ([]Allocation, int64, error) {
	resp, err := e.client.Get(ctx, e.prefix, clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, 0, unavailable("etcd: list allocations", err)
	}
	out := make([]Allocation, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if a, err := e.decodeKV(kv); err == nil {
			out = append(out, a)
		}
	}
	return out, resp.Header.Revision, nil
}

// Watch implements Store with an etcd watch from after+1. Keys whose
// values do not decode are reported as deleted.
func (e *Etcd) Watch(ctx context.Context, after int64) <-chan Event {
	out := make(chan Event)
	go func() {
		defer close(out)
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		defer cancel()
		wch := e.client.Watch(wctx, e.prefix, clientv3.WithPrefix(), clientv3.WithRev(after+1))
		for resp := range wch {
			if err := resp.Err(); err != nil {
				if errors.Is(err, rpctypes.ErrCompacted) {
					err = ErrCompacted
				} else {
					err = unavailable("etcd: watch allocations", err)
				}
				sendEvent(ctx, out, Event{Err: err, Revision: resp.Header.Revision})
				return
			}
			for _, ev := range resp.Events {
				var x Event
				x.Revision = ev.Kv.ModRevision
				a, err := e.decodeKV(ev.Kv)
				if ev.Type == clientv3.EventTypePut && err == nil {
					x.Type, x.Alloc = Put, a
				} else {
					k, kerr := ParseKey(strings.TrimPrefix(string(ev.Kv.Key), e.prefix))
					if kerr != nil {
						continue
					}
					x.Type, x.Alloc = Delete, Allocation{Protocol: k.Protocol, Port: k.Port}
				}
				if !sendEvent(ctx, out, x) {
					return
				}
			}
		}
		if ctx.Err() == nil {
			sendEvent(ctx, out, Event{Err: unavailable("etcd: watch allocations", errors.New("watch ended"))})
		}
	}()
	return out
}

// Close implements Store; the client is the caller's.
func (e *Etcd) Close() error { return nil }
