package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
)

// File is a Store for one gateway: the allocations in memory, written
// through to one JSON file (replaced atomically) on every change. The zero
// value with Path set is ready; the file is read on first use. An existing
// state file keeps its ports: the format is the one earlier builds wrote,
// with a "live" field they ignore.
type File struct {
	// Path is the state file; empty keeps allocations in memory only.
	Path string
	// Options are the store's retention policy and clock.
	Options
	// OnWriteError, when set, is told of a failed write of the state
	// file (under the store's lock: it must not call the store), and the
	// change is kept in memory, to be written with the next one: a full
	// disk does not stop a single gateway from allocating. When nil, a
	// change that cannot be written is undone and refused with
	// ErrUnavailable.
	OnWriteError func(error)
	engine
}

// Memory is a Store that keeps allocations in memory only: a File
// without a file.
type Memory = File

// historyLen bounds the events kept for watchers that resume: one that
// falls further behind gets ErrCompacted and lists again.
const historyLen = 4096

// engine is the file store's state.
type engine struct {
	mu      sync.Mutex
	loaded  bool
	rev     int64
	recs    map[Key]Allocation
	history []Event // the last historyLen events, oldest first
	wake    map[chan struct{}]struct{}
}

const fileVersion = 1

type fileFormat struct {
	Version     int          `json:"version"`
	Allocations []Allocation `json:"allocations"`
}

// Decode parses and validates the state file's contents.
func Decode(b []byte) ([]Allocation, error) {
	var ff fileFormat
	if err := json.Unmarshal(b, &ff); err != nil {
		return nil, fmt.Errorf("corrupt state: %w", err)
	}
	if ff.Version != fileVersion {
		return nil, fmt.Errorf("state version %d, this build reads %d", ff.Version, fileVersion)
	}
	seen := map[Key]bool{}
	for i, a := range ff.Allocations {
		if a.valid() != nil {
			return nil, fmt.Errorf("allocation %d is invalid: %+v", i, a)
		}
		if seen[a.Key()] {
			return nil, fmt.Errorf("%s port %d is allocated twice", a.Protocol, a.Port)
		}
		seen[a.Key()] = true
	}
	return ff.Allocations, nil
}

// load reads the file once. Caller holds f.mu.
func (f *File) load() error {
	if f.loaded {
		return nil
	}
	f.recs = map[Key]Allocation{}
	f.wake = map[chan struct{}]struct{}{}
	if f.Path != "" {
		b, err := os.ReadFile(f.Path)
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			return unavailable("store: read state", err)
		default:
			allocs, err := Decode(b)
			if err != nil {
				return fmt.Errorf("store: %s: %w", f.Path, err)
			}
			for _, a := range allocs {
				f.rev++
				a.Revision = f.rev
				f.recs[a.Key()] = a
			}
		}
	}
	f.loaded = true
	return nil
}

// begin locks f and loads it.
func (f *File) begin() error {
	f.mu.Lock()
	if err := f.load(); err != nil {
		f.mu.Unlock()
		return err
	}
	return nil
}

// apply records changes (nil value: delete) and writes the file; on a
// failed write the changes are undone. Caller holds f.mu.
func (f *File) apply(changes map[Key]*Allocation) (int64, error) {
	old := make(map[Key]*Allocation, len(changes))
	for k, v := range changes {
		if cur, ok := f.recs[k]; ok {
			old[k] = &cur
		} else {
			old[k] = nil
		}
		if v == nil {
			delete(f.recs, k)
		} else {
			f.recs[k] = *v
		}
	}
	if err := f.write(); err != nil && f.OnWriteError != nil {
		f.OnWriteError(err)
	} else if err != nil {
		for k, v := range old {
			if v == nil {
				delete(f.recs, k)
			} else {
				f.recs[k] = *v
			}
		}
		return 0, err
	}
	f.rev++
	keys := make([]Key, 0, len(changes))
	for k := range changes {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keyLess(keys[i], keys[j]) })
	for _, k := range keys {
		ev := Event{Revision: f.rev}
		if v := changes[k]; v == nil {
			ev.Type, ev.Alloc = Delete, Allocation{Protocol: k.Protocol, Port: k.Port}
		} else {
			v.Revision = f.rev
			f.recs[k] = *v
			ev.Type, ev.Alloc = Put, *v
		}
		f.history = append(f.history, ev)
	}
	if over := len(f.history) - historyLen; over > 0 {
		f.history = append(f.history[:0], f.history[over:]...)
	}
	for w := range f.wake {
		select {
		case w <- struct{}{}:
		default:
		}
	}
	return f.rev, nil
}

func keyLess(a, b Key) bool {
	if a.Protocol != b.Protocol {
		return a.Protocol < b.Protocol
	}
	return a.Port < b.Port
}

// Claim implements Store.
func (f *File) Claim(_ context.Context, a Allocation) (Allocation, error) {
	if err := a.valid(); err != nil {
		return Allocation{}, fmt.Errorf("store: claim: %w", err)
	}
	if err := f.begin(); err != nil {
		return Allocation{}, err
	}
	defer f.mu.Unlock()
	now := f.now()
	if cur, ok := f.recs[a.Key()]; ok && !f.claimable(cur, a, now) {
		return Allocation{}, &TakenError{Holder: cur}
	}
	a.Live, a.LastUsed = true, now
	if _, err := f.apply(map[Key]*Allocation{a.Key(): &a}); err != nil {
		return Allocation{}, err
	}
	return f.recs[a.Key()], nil
}

// Refresh implements Store.
func (f *File) Refresh(_ context.Context, allocs []Allocation) (refreshed, lost []Allocation, err error) {
	if err := f.begin(); err != nil {
		return nil, nil, err
	}
	defer f.mu.Unlock()
	now := f.now()
	changes := map[Key]*Allocation{}
	for _, a := range allocs {
		cur, ok := f.recs[a.Key()]
		if !ok || !cur.sameOwner(a) {
			lost = append(lost, a)
			continue
		}
		cur.Live, cur.LastUsed = true, now
		changes[a.Key()] = &cur
	}
	if len(changes) > 0 {
		if _, err := f.apply(changes); err != nil {
			return nil, nil, err
		}
	}
	for k := range changes {
		refreshed = append(refreshed, f.recs[k])
	}
	return refreshed, lost, nil
}

// Retain implements Store.
func (f *File) Retain(_ context.Context, a Allocation) (Allocation, error) {
	if err := f.begin(); err != nil {
		return Allocation{}, err
	}
	defer f.mu.Unlock()
	cur, ok := f.recs[a.Key()]
	if !ok || !cur.sameOwner(a) || (a.Revision != 0 && cur.Revision != a.Revision) {
		return Allocation{}, ErrNotHeld
	}
	cur.Live, cur.LastUsed = false, f.now()
	if _, err := f.apply(map[Key]*Allocation{a.Key(): &cur}); err != nil {
		return Allocation{}, err
	}
	return f.recs[a.Key()], nil
}

// Release implements Store.
func (f *File) Release(_ context.Context, a Allocation) error {
	if err := f.begin(); err != nil {
		return err
	}
	defer f.mu.Unlock()
	cur, ok := f.recs[a.Key()]
	if !ok {
		return nil
	}
	if !cur.sameOwner(a) || (a.Revision != 0 && cur.Revision != a.Revision) {
		return ErrNotHeld
	}
	_, err := f.apply(map[Key]*Allocation{a.Key(): nil})
	return err
}

// List implements Store, in (protocol, port) order.
func (f *File) List(context.Context) ([]Allocation, int64, error) {
	if err := f.begin(); err != nil {
		return nil, 0, err
	}
	defer f.mu.Unlock()
	return f.sorted(), f.rev, nil
}

// sorted returns the allocations in (protocol, port) order. Caller holds
// f.mu.
func (f *File) sorted() []Allocation {
	out := make([]Allocation, 0, len(f.recs))
	for _, a := range f.recs {
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return keyLess(out[i].Key(), out[j].Key()) })
	return out
}

// Watch implements Store. Events are kept for the last historyLen
// changes; a watcher that resumes from further back gets ErrCompacted.
func (f *File) Watch(ctx context.Context, after int64) <-chan Event {
	out := make(chan Event)
	wake := make(chan struct{}, 1)
	if err := f.begin(); err != nil {
		go func() {
			defer close(out)
			sendEvent(ctx, out, Event{Err: err})
		}()
		return out
	}
	f.wake[wake] = struct{}{}
	f.mu.Unlock()
	wake <- struct{}{}
	go func() {
		defer close(out)
		defer func() {
			f.mu.Lock()
			delete(f.wake, wake)
			f.mu.Unlock()
		}()
		last := after
		for {
			select {
			case <-ctx.Done():
				return
			case <-wake:
			}
			f.mu.Lock()
			var evs []Event
			compacted := last < f.rev && (len(f.history) == 0 || f.history[0].Revision > last+1)
			if !compacted {
				for _, e := range f.history {
					if e.Revision > last {
						evs = append(evs, e)
					}
				}
			}
			f.mu.Unlock()
			if compacted {
				sendEvent(ctx, out, Event{Err: ErrCompacted})
				return
			}
			for _, e := range evs {
				if !sendEvent(ctx, out, e) {
					return
				}
				last = e.Revision
			}
		}
	}()
	return out
}

func sendEvent(ctx context.Context, out chan<- Event, e Event) bool {
	select {
	case out <- e:
		return true
	case <-ctx.Done():
		return false
	}
}

// Close implements Store.
func (f *File) Close() error { return nil }

// write replaces the state file with the allocations: a temporary file,
// synced, renamed over the old one, so a crash leaves either the old or
// the new state. Caller holds f.mu.
func (f *File) write() error {
	if f.Path == "" {
		return nil
	}
	allocs := f.sorted()
	b, err := json.MarshalIndent(fileFormat{Version: fileVersion, Allocations: allocs}, "", "  ")
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	dir := filepath.Dir(f.Path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return unavailable("store: create state directory", err)
	}
	tmp, err := os.CreateTemp(dir, filepath.Base(f.Path)+".tmp*")
	if err != nil {
		return unavailable("store: write state", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return unavailable("store: write "+tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return unavailable("store: sync "+tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return unavailable("store: write state", err)
	}
	if err := os.Rename(tmp.Name(), f.Path); err != nil {
		return unavailable("store: replace state", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
