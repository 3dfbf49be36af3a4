package gateway

import (
	"context"
	"errors"
	"reflect"
	"time"

	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/store"
)

// watchAllocations keeps f.allocs in step with the store (a list, then a
// watch from its revision; a list again when the watch ends or is
// compacted) and, after every change, the mirror listeners with it.
func (f *fabric) watchAllocations() {
	st := f.g.ports.st
	select {
	case <-f.viewed:
	case <-f.ctx.Done():
		return
	}
	for f.ctx.Err() == nil {
		rctx, cancel := context.WithTimeout(f.ctx, f.g.storeTimeout)
		all, rev, err := st.List(rctx)
		cancel()
		if err != nil {
			if !f.sleep(watchRetry) {
				return
			}
			continue
		}
		f.mu.Lock()
		f.allocs = make(map[store.Key]store.Allocation, len(all))
		for _, a := range all {
			f.allocs[a.Key()] = a
		}
		f.mu.Unlock()
		f.reconcile()
		for ev := range st.Watch(f.ctx, rev) {
			if ev.Err != nil {
				if !errors.Is(ev.Err, store.ErrCompacted) {
					f.log.Warn("watching the port allocations; listing them again", "err", ev.Err)
				}
				break
			}
			k := ev.Alloc.Key()
			f.mu.Lock()
			if ev.Type == store.Delete {
				delete(f.allocs, k)
			} else {
				f.allocs[k] = ev.Alloc
			}
			f.mu.Unlock()
			f.reconcile()
		}
		if !f.sleep(watchRetry / 4) {
			return
		}
	}
}

// mirroredLocked reports whether a is a port this replica should serve
// for another replica's agent session: its record carries the service's
// spec, and it is live or its agent has a session somewhere (a replica
// that withdrew its own session's service marks the allocation retained
// even while another replica still serves it, until that one's refresh).
// The caller holds f.mu.
func (f *fabric) mirroredLocked(a store.Allocation) bool {
	return a.Spec != nil && a.Spec.Key() == protocol.ServiceKey{ID: a.Service, Kind: a.Protocol} &&
		(a.Live || len(f.sessions[a.Agent]) > 0)
}

// mirrorRetry is how soon reconcile runs again after a mirror could not
// be bound.
const mirrorRetry = time.Second

// reconcile opens a mirror for every live allocation not served here by
// a registered service, and closes the mirrors whose allocation is gone,
// withdrawn or now someone else's. Mirrors are bound under f.mu (a local
// bind, so that a registration's own bind of the port never races one)
// and closed after it.
func (f *fabric) reconcile() {
	var closing []publicService
	var forget []publicService
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	for k, m := range f.mirrors {
		a, ok := f.allocs[k]
		b := m.base()
		if !ok || !f.mirroredLocked(a) || a.Agent != b.agent || a.Service != b.key.ID || f.local[k] > 0 {
			closing = append(closing, m)
			if f.local[k] == 0 {
				// Gone from the cluster, not taken over here: its
				// metrics go with it.
				forget = append(forget, m)
			}
			delete(f.mirrors, k)
			continue
		}
		if cur := b.spec.Load(); a.Spec != nil && !reflect.DeepEqual(cur, a.Spec) {
			if pol, err := checkService(a.Spec, f.g.conf().Ceiling(a.Agent)); err == nil {
				b.setSpec(a.Spec, pol)
			}
		}
	}
	failed := false
	for k, a := range f.allocs {
		if f.mirrors[k] != nil || f.local[k] > 0 || !f.mirroredLocked(a) {
			continue
		}
		m, err := f.g.openMirror(a)
		if err != nil {
			failed = true
			if !f.bindFailed[k] {
				f.bindFailed[k] = true
				f.log.Warn("cannot serve a port of another replica's agent yet; trying again every second", "port", portString(k),
					"agent", a.Agent, "service", a.Service, "err", err)
			}
			continue
		}
		if f.bindFailed[k] {
			delete(f.bindFailed, k)
			f.log.Info("serving a port of another replica's agent after all", "port", portString(k), "agent", a.Agent, "service", a.Service)
		}
		f.mirrors[k] = m
	}
	for k := range f.bindFailed {
		if a, ok := f.allocs[k]; !ok || !f.mirroredLocked(a) || f.local[k] > 0 {
			delete(f.bindFailed, k)
		}
	}
	f.mu.Unlock()
	// A port another process holds on this host (a gateway that is still
	// shutting down, say) may be free in a moment; no watch event would
	// tell.
	if failed && f.retrying.CompareAndSwap(false, true) {
		time.AfterFunc(mirrorRetry, func() {
			f.retrying.Store(false)
			f.reconcile()
		})
	}
	for _, m := range closing {
		m.close()
	}
	for _, m := range forget {
		b := m.base()
		f.g.metrics.ForgetService(b.agent, b.key.ID)
	}
}

// takeLocal notes that a registered service is about to bind k, closing
// the mirror that serves it now, so the bind finds the port free. It is
// called with no lock of this package held.
func (f *fabric) takeLocal(k store.Key) {
	f.mu.Lock()
	f.local[k]++
	m := f.mirrors[k]
	delete(f.mirrors, k)
	f.mu.Unlock()
	if m != nil {
		m.close()
	}
}

// dropLocal notes that a registered service's socket on k is closed (or
// its bind failed): a mirror may serve the port again.
func (f *fabric) dropLocal(k store.Key) {
	f.mu.Lock()
	if f.local[k]--; f.local[k] <= 0 {
		delete(f.local, k)
	}
	f.mu.Unlock()
	f.reconcile()
}
