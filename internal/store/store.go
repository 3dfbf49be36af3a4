// Package store keeps the gateway's port allocations, so that a restart or a
// reconnect gives every service the same public port again, and so that
// several gateway replicas never hand one public port to two services.
//
// The gateway sees only the Store interface, whose operations each act on
// one allocation with compare-and-swap semantics: a claim succeeds only if
// the port is free, its holder's retention has expired, or it is already
// the claimer's. Two implementations share those semantics and one
// conformance suite: File (one gateway; the state file, all in memory and
// written through, concurrent changes sharing one write; Memory is the
// same without the file)
// and Etcd (several replicas; one key per port, every change a
// transaction).
//
// # Locks
//
// The file store has one lock, engine.mu, held for an operation's change in
// memory and for taking a snapshot of the allocations, never for a file
// write: the one writer at a time (engine.writing) encodes and writes the
// snapshot without it, and callers waiting for their change to be written
// wait on a condition of it (engine.written). Nothing outside the package is
// called under it (OnWriteError is called by the writer before it locks
// again). Watchers are woken by a non-blocking send and copy events under
// it, then deliver them after unlocking. The etcd store holds no lock of its
// own.
package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/portway/portway/internal/protocol"
)

// Allocation is one public port held by one service of one agent.
type Allocation struct {
	Agent    string        `json:"agent"`
	Service  string        `json:"service"`
	Protocol protocol.Kind `json:"protocol"`
	Port     int           `json:"port"`
	// LastUsed is when the allocation was last claimed, refreshed or
	// retained. Its holder refreshes a live allocation periodically; one
	// not stamped for the store's retention has expired and may be
	// claimed by anyone.
	LastUsed time.Time `json:"last_used"`
	// Live is set while a gateway serves the port; a retained (withdrawn)
	// allocation is kept for its service until it expires.
	Live bool `json:"live,omitempty"`
	// Spec is the service as its agent registered it when the port was
	// claimed: replicas that hold no session of the agent serve the port
	// from it (its kind, source policy and PROXY protocol) and forward
	// what arrives. Nil in records written by older versions.
	Spec *protocol.Service `json:"spec,omitempty"`
	// Revision is the store's revision of this record when it was read
	// or written (0: unknown). Release compares it, so that an eviction
	// decided on a stale read does not free a port that changed since.
	Revision int64 `json:"-"`
}

// Key is a public port: TCP and UDP ports are separate spaces.
type Key struct {
	Protocol protocol.Kind
	Port     int
}

// Key returns the port a holds.
func (a Allocation) Key() Key { return Key{a.Protocol, a.Port} }

// sameOwner reports whether a and b belong to the same (agent, service).
func (a Allocation) sameOwner(b Allocation) bool {
	return a.Agent == b.Agent && a.Service == b.Service && a.Protocol == b.Protocol
}

// valid checks the fields every stored allocation must have.
func (a Allocation) valid() error {
	if a.Agent == "" || a.Service == "" || !a.Protocol.Valid() || a.Port < 1 || a.Port > 65535 {
		return fmt.Errorf("allocation is invalid: %+v", a)
	}
	return nil
}

var (
	// ErrTaken is returned (inside a *TakenError) by Claim when another
	// (agent, service) holds the port and its retention has not expired.
	ErrTaken = errors.New("port is held by another service")
	// ErrNotHeld is returned by Refresh, Retain and Release when the
	// allocation is no longer the caller's: expired and claimed by
	// another, or (Release with a Revision) changed since it was read.
	ErrNotHeld = errors.New("allocation is no longer held")
	// ErrUnavailable wraps every failure to reach the store (etcd without
	// quorum, an unwritable state file), so that callers can tell "try
	// again later" from "this port is taken".
	ErrUnavailable = errors.New("allocation store unavailable")
	// ErrCompacted ends a watch that asked to resume from a revision the
	// store no longer holds events for: list again and watch from there.
	ErrCompacted = errors.New("watch revision compacted")
)

// TakenError is Claim's answer when the port is someone else's.
type TakenError struct {
	// Holder is the allocation that holds the port.
	Holder Allocation
}

func (e *TakenError) Error() string {
	return fmt.Sprintf("%s port %d is held by agent %q service %q", e.Holder.Protocol, e.Holder.Port, e.Holder.Agent, e.Holder.Service)
}

// Is makes errors.Is(err, ErrTaken) true.
func (e *TakenError) Is(target error) bool { return target == ErrTaken }

// Store keeps allocations, one port at a time. Every method is safe for
// concurrent use, by one process or (etcd) by many.
type Store interface {
	// Claim gives a's port to a's (agent, service), live and stamped now,
	// if the port is free, expired, or already theirs; otherwise it
	// returns a *TakenError. It returns the stored allocation with its
	// revision.
	Claim(ctx context.Context, a Allocation) (Allocation, error)
	// Refresh stamps each of allocs live and now. It returns those it
	// stamped, with their new revisions, and those no longer held by
	// their service (that is not an error here).
	Refresh(ctx context.Context, allocs []Allocation) (refreshed, lost []Allocation, err error)
	// Retain marks a withdrawn: kept for its service, stamped now, until
	// the retention expires. ErrNotHeld if it is no longer theirs or,
	// when a.Revision is set, changed since (a newer claim of the same
	// service must not be marked withdrawn by an older withdrawal).
	Retain(ctx context.Context, a Allocation) (Allocation, error)
	// Release frees a's port if it is still a's (agent, service) and, when
	// a.Revision is set, unchanged since. Releasing a free port is not an
	// error; one held by another service is ErrNotHeld.
	Release(ctx context.Context, a Allocation) error
	// List returns every allocation and the revision it was read at.
	List(ctx context.Context) ([]Allocation, int64, error)
	// Watch streams the changes after revision after, until ctx ends
	// (the channel is then closed). An event with Err set is the last.
	Watch(ctx context.Context, after int64) <-chan Event
	// Close releases the store's resources; allocations stay stored.
	Close() error
}

// EventType says what happened to a port.
type EventType int

// The event types.
const (
	// Put: the port was claimed, refreshed or retained.
	Put EventType = iota + 1
	// Delete: the port was released or its allocation expired and
	// was replaced (then a Put follows).
	Delete
)

// Event is one change seen by Watch.
type Event struct {
	Type EventType
	// Alloc is the allocation after a Put; after a Delete only its
	// Protocol and Port are set.
	Alloc    Allocation
	Revision int64
	// Err ends the stream: ErrCompacted, or the store's failure.
	Err error
}

// Options are the policy both stores apply.
type Options struct {
	// Retention is how long an allocation not stamped stays its
	// service's; 0 keeps allocations until they are released.
	Retention time.Duration
	// Now is the clock; nil is time.Now.
	Now func() time.Time
}

func (o *Options) now() time.Time {
	if o.Now != nil {
		return o.Now().UTC()
	}
	return time.Now().UTC()
}

// expired reports whether a's holder has lost it to the retention.
func (o *Options) expired(a Allocation, now time.Time) bool {
	return o.Retention > 0 && a.LastUsed.Add(o.Retention).Before(now)
}

// claimable reports whether want may take the port held by cur.
func (o *Options) claimable(cur, want Allocation, now time.Time) bool {
	return cur.sameOwner(want) || o.expired(cur, now)
}

// DecodeRecord parses and validates one stored allocation: the value of
// an etcd key, or one entry of the state file.
func DecodeRecord(b []byte) (Allocation, error) {
	var a Allocation
	if err := json.Unmarshal(b, &a); err != nil {
		return Allocation{}, fmt.Errorf("corrupt allocation: %w", err)
	}
	if err := a.valid(); err != nil {
		return Allocation{}, err
	}
	return a, nil
}

// unavailable wraps a failure to reach the store.
func unavailable(op string, err error) error {
	if errors.Is(err, ErrUnavailable) {
		return err
	}
	return fmt.Errorf("%s: %w: %w", op, ErrUnavailable, err)
}
