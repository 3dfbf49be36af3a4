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
// through to one JSON file (replaced atomically). The zero value with Path
// set is ready; the file is read on first use. An existing state file keeps
// its ports: the format is the one earlier builds wrote, with a "live"
// field they ignore.
//
// Writes are grouped: a change is made in memory (with its revision and
// watch event) at once, and its call then waits for a write of the file
// that began after it, so that every call returns with its change on disk
// while many concurrent changes share one write. A change that only
// stamps a live allocation's LastUsed (a claim of a port its service
// already holds live) waits for no write of its own: the next write, at the
// latest the holder's periodic Refresh, carries it.
type File struct {
	// Path is the state file; empty keeps allocations in memory only.
	Path string
	// Options are the store's retention policy and clock.
	Options
	// OnWriteError, when set, is told of a failed write of the state
	// file (outside the store's lock, by the call that wrote), and the
	// changes are kept in memory, to be written with the next one: a
	// full disk does not stop a single gateway from allocating. When
	// nil, a failed write undoes every change not yet on disk (the
	// write's and those made while it ran, which were decided on them)
	// and each of their calls is refused with ErrUnavailable.
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

	// Group commit. pending collects the changes made since the last
	// snapshot; the writer (at most one: writing) takes it with a
	// snapshot, writes outside mu, and settles it. written is signalled
	// (on mu) whenever a write ends.
	pending  *batch
	inflight *batch
	writing  bool
	written  *sync.Cond
	// disk is what the file holds, as of revision diskRev: a failed
	// write (OnWriteError nil) puts the allocations back to it.
	disk    []Allocation
	diskRev int64
	// writes counts the writes begun, and beforeWrite (when set) is
	// called by the writer before each, without mu: tests' hooks.
	writes      int
	beforeWrite func()
}

// batch is the changes one write makes durable; err is its outcome, set
// when done is.
type batch struct {
	done bool
	err  error
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
	f.disk = f.sorted()
	f.diskRev = f.rev
	f.written = sync.NewCond(&f.mu)
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

// apply records changes (nil value: delete) in memory with a new
// revision and their watch events, and returns the batch the caller must
// wait for (nil: none). A change that only stamps LastUsed (lastUsedOnly)
// joins no batch of its own but waits for the latest one, since what it
// restamps may not be on disk yet. Caller holds f.mu.
func (f *File) apply(changes map[Key]*Allocation, lastUsedOnly bool) *batch {
	f.record(changes)
	if f.Path == "" {
		return nil
	}
	if lastUsedOnly {
		return f.latest()
	}
	if f.pending == nil {
		f.pending = &batch{}
	}
	return f.pending
}

// record applies changes in memory under one new revision and wakes the
// watchers. Caller holds f.mu.
func (f *File) record(changes map[Key]*Allocation) {
	f.rev++
	keys := make([]Key, 0, len(changes))
	for k := range changes {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keyLess(keys[i], keys[j]) })
	for _, k := range keys {
		ev := Event{Revision: f.rev}
		if v := changes[k]; v == nil {
			delete(f.recs, k)
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
}

// wait returns once b is settled: its write done (nil, or with
// OnWriteError set, whatever the write's outcome), or failed and undone
// (the write's error). While b is not settled and no write runs, the
// caller writes, so one write serves every change made before it began.
// Caller holds f.mu.
func (f *File) wait(b *batch) error {
	for b != nil && !b.done {
		if f.writing {
			f.written.Wait()
			continue
		}
		f.flush()
	}
	if b == nil {
		return nil
	}
	return b.err
}

// flush writes the pending changes: snapshot under f.mu, encode and write
// without it, settle under it again. Caller holds f.mu and f.writing is
// false.
func (f *File) flush() {
	b := f.pending
	if b == nil {
		return
	}
	f.pending, f.inflight, f.writing = nil, b, true
	snap := make([]Allocation, 0, len(f.recs))
	for _, a := range f.recs {
		snap = append(snap, a)
	}
	rev := f.rev
	f.writes++
	hook, onErr := f.beforeWrite, f.OnWriteError
	f.mu.Unlock()
	if hook != nil {
		hook()
	}
	sort.Slice(snap, func(i, j int) bool { return keyLess(snap[i].Key(), snap[j].Key()) })
	err := f.write(snap)
	if err != nil && onErr != nil {
		onErr(err)
	}
	f.mu.Lock()
	switch {
	case err == nil:
		f.disk, f.diskRev = snap, rev
	case onErr == nil:
		f.undo()
		if p := f.pending; p != nil {
			// Made on the undone state: undone too.
			p.done, p.err = true, err
			f.pending = nil
		}
		b.err = err
	}
	b.done = true
	f.inflight, f.writing = nil, false
	f.written.Broadcast()
}

// undo puts every allocation changed since the file was last written
// back as the file holds it, as one new revision. Caller holds f.mu.
func (f *File) undo() {
	disk := make(map[Key]Allocation, len(f.disk))
	for _, a := range f.disk {
		disk[a.Key()] = a
	}
	changes := map[Key]*Allocation{}
	for k, cur := range f.recs {
		if cur.Revision <= f.diskRev {
			continue
		}
		if d, ok := disk[k]; ok {
			changes[k] = &d
		} else {
			changes[k] = nil
		}
	}
	for k, d := range disk {
		if _, ok := f.recs[k]; !ok {
			changes[k] = &d
		}
	}
	if len(changes) > 0 {
		f.record(changes)
	}
	f.diskRev = f.rev
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
	cur, held := f.recs[a.Key()]
	if held && !f.claimable(cur, a, now) {
		return Allocation{}, &TakenError{Holder: cur}
	}
	a.Live, a.LastUsed = true, now
	// Already live and its service's: only the stamp changes.
	stampOnly := held && cur.Live && cur.sameOwner(a)
	if err := f.wait(f.apply(map[Key]*Allocation{a.Key(): &a}, stampOnly)); err != nil {
		return Allocation{}, err
	}
	return a, nil
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
		// The stamp is the point of a refresh: it is written.
		if err := f.wait(f.apply(changes, false)); err != nil {
			return nil, nil, err
		}
	}
	for _, a := range changes {
		refreshed = append(refreshed, *a)
	}
	sort.Slice(refreshed, func(i, j int) bool { return keyLess(refreshed[i].Key(), refreshed[j].Key()) })
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
	// The stamp starts the retention: it is written even when the
	// allocation was withdrawn already.
	cur.Live, cur.LastUsed = false, f.now()
	if err := f.wait(f.apply(map[Key]*Allocation{a.Key(): &cur}, false)); err != nil {
		return Allocation{}, err
	}
	return cur, nil
}

// Release implements Store.
func (f *File) Release(_ context.Context, a Allocation) error {
	if err := f.begin(); err != nil {
		return err
	}
	defer f.mu.Unlock()
	cur, ok := f.recs[a.Key()]
	if !ok {
		// Nothing to change, but a claim of it may not be on disk yet
		// either: the port is free once that is settled.
		return f.wait(f.latest())
	}
	if !cur.sameOwner(a) || (a.Revision != 0 && cur.Revision != a.Revision) {
		return ErrNotHeld
	}
	return f.wait(f.apply(map[Key]*Allocation{a.Key(): nil}, false))
}

// latest is the batch that settles every change made so far (nil: all
// are settled). Caller holds f.mu.
func (f *File) latest() *batch {
	if f.pending != nil {
		return f.pending
	}
	return f.inflight
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
// the new state. Caller does not hold f.mu: one write at a time
// (f.writing) keeps them in order.
func (f *File) write(allocs []Allocation) error {
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
