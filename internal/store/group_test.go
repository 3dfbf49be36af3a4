package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portway/portway/internal/protocol"
)

// writeCount is how many writes of the state file f has begun.
func writeCount(f *File) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.writes
}

// readState decodes f's state file, by port.
func readState(t testing.TB, path string) map[Key]Allocation {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	allocs, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[Key]Allocation, len(allocs))
	for _, a := range allocs {
		out[a.Key()] = a
	}
	return out
}

// sameState fails t unless the file holds exactly the store's allocations
// (revisions are not stored).
func sameState(t *testing.T, f *File) {
	t.Helper()
	mem, _, err := f.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	disk := readState(t, f.Path)
	if len(disk) != len(mem) {
		t.Fatalf("the file holds %d allocations, the store %d", len(disk), len(mem))
	}
	for _, m := range mem {
		d, ok := disk[m.Key()]
		if !ok || !d.sameOwner(m) || d.Live != m.Live || !d.LastUsed.Equal(m.LastUsed) {
			t.Fatalf("the file holds %+v for %+v", d, m)
		}
	}
}

// Many concurrent changes share writes: far fewer writes than claims, yet
// every claim is in the file when it returns, and after a storm of
// concurrent withdrawals and claims of the same ports the file holds what
// the store does.
func TestFileGroupCommit(t *testing.T) {
	const goroutines, perG = 20, 20
	c := newClock()
	f := &File{Path: filepath.Join(t.TempDir(), "gateway.db"), Options: Options{Retention: time.Hour, Now: c.now}}
	ctx, cancel := context.WithTimeout(context.Background(), conformanceTimeout)
	defer cancel()
	var wg sync.WaitGroup
	var failures atomic.Int64
	fail := func(format string, args ...any) {
		if failures.Add(1) <= 5 {
			t.Errorf(format, args...)
		}
	}
	for g := range goroutines {
		wg.Go(func() {
			for i := range perG {
				if ctx.Err() != nil {
					return
				}
				a := alloc(fmt.Sprintf("g%d", g), fmt.Sprintf("s%d", i), 1000+g*perG+i)
				got, err := f.Claim(ctx, a)
				if err != nil {
					fail("claim %+v: %v", a, err)
					return
				}
				// Durable when it returns: in the file now.
				b, err := os.ReadFile(f.Path)
				if err != nil {
					fail("read state: %v", err)
					return
				}
				if want := fmt.Sprintf(`"port": %d,`, got.Port); !strings.Contains(string(b), want) {
					fail("claim of port %d returned before it was written", got.Port)
				}
				if i == perG-1 {
					d, ok := readState(t, f.Path)[a.Key()]
					if !ok || !d.sameOwner(a) || !d.Live {
						fail("the file holds %+v for the claim %+v", d, got)
					}
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	claims := goroutines * perG
	writes := writeCount(f)
	t.Logf("%d concurrent claims, %d writes %v", claims, writes, time.Now())
	if writes*4 > claims {
		t.Fatalf("%d concurrent claims took %d writes of the state file", claims, writes)
	}
	sameState(t, f)

	// The same ports withdrawn and claimed again by goroutines racing on
	// each: the file ends as the store's memory does.
	for g := range goroutines {
		wg.Go(func() {
			for i := range perG {
				a := alloc(fmt.Sprintf("g%d", g/2*2), fmt.Sprintf("s%d", i), 1000+g/2*2*perG+i)
				var err error
				if (g+i)%2 == 0 {
					_, err = f.Retain(ctx, a)
				} else {
					_, err = f.Claim(ctx, a)
				}
				if err != nil {
					fail("%+v: %v", a, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if !t.Failed() {
		sameState(t, f)
	}
}

// A claim of a port its service holds live only restamps it: no write of
// its own (the refresh writes the stamp), though a new revision and an
// event as ever. A claim that makes a retained port live is written.
func TestFileStampOnlyClaimNotWritten(t *testing.T) {
	c := newClock()
	f := &File{Path: filepath.Join(t.TempDir(), "gateway.db"), Options: Options{Retention: time.Hour, Now: c.now}}
	ctx := context.Background()
	first, err := f.Claim(ctx, alloc("a", "s", 100))
	if err != nil {
		t.Fatal(err)
	}
	before := writeCount(f)
	c.add(time.Minute)
	again, err := f.Claim(ctx, alloc("a", "s", 100))
	if err != nil || again.Revision <= first.Revision || !again.LastUsed.Equal(c.now()) {
		t.Fatalf("claim of its own live port: %+v, %v", again, err)
	}
	if n := writeCount(f); n != before {
		t.Fatalf("restamping a live port wrote the state file (%d writes, was %d)", n, before)
	}
	if d := readState(t, f.Path)[again.Key()]; !d.LastUsed.Equal(first.LastUsed) {
		t.Fatalf("the file's stamp is %v, want the first claim's %v", d.LastUsed, first.LastUsed)
	}
	if _, _, err := f.Refresh(ctx, []Allocation{again}); err != nil {
		t.Fatal(err)
	}
	if d := readState(t, f.Path)[again.Key()]; writeCount(f) != before+1 || !d.LastUsed.Equal(c.now()) {
		t.Fatalf("after a refresh the file holds %+v, %d writes", d, writeCount(f)-before)
	}
	if _, err := f.Retain(ctx, alloc("a", "s", 100)); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Claim(ctx, alloc("a", "s", 100)); err != nil {
		t.Fatal(err)
	}
	if d := readState(t, f.Path)[again.Key()]; writeCount(f) != before+3 || !d.Live {
		t.Fatalf("the claim of a retained port: the file holds %+v after %d writes", d, writeCount(f)-before)
	}
}

// When a write that serves many concurrent changes fails (no
// OnWriteError), every one of them is refused and undone: memory and
// watchers end where the file is.
func TestFileGroupWriteFailure(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	f := &File{Path: filepath.Join(stateDir, "gateway.db")}
	ctx, cancel := context.WithTimeout(context.Background(), conformanceTimeout)
	defer cancel()
	kept, err := f.Claim(ctx, alloc("a", "kept", 100))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(stateDir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stateDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, rev, _ := f.List(ctx)
	w := f.Watch(ctx, rev)
	const n = 20
	// The first write waits until every change is made: one is in its
	// snapshot, the rest made while it runs, on what it fails to write.
	// The disk recovers then: a second write would succeed, and must not
	// make the undone changes look written.
	var writes atomic.Int64
	f.mu.Lock()
	f.beforeWrite = func() {
		if writes.Add(1) == 2 {
			if err := os.Remove(stateDir); err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Error(err)
			}
			return
		}
		if writes.Load() == 1 {
			for deadline := time.Now().Add(conformanceTimeout); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
				f.mu.Lock()
				all := f.rev >= rev+n+1
				f.mu.Unlock()
				if all {
					return
				}
			}
			t.Error("the changes were not all made during the first write")
		}
	}
	f.mu.Unlock()
	var wg sync.WaitGroup
	errs := make(chan error, n+1)
	for i := range n {
		wg.Go(func() {
			_, err := f.Claim(ctx, alloc("b", fmt.Sprintf("s%d", i), 200+i))
			errs <- err
		})
	}
	wg.Go(func() { errs <- f.Release(ctx, kept) })
	wg.Wait()
	close(errs)
	for err := range errs {
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("a change the file could not take: %v", err)
		}
	}
	all, last, err := f.List(ctx)
	if err != nil || len(all) != 1 || all[0].Service != "kept" {
		t.Fatalf("after the failed writes the store holds %+v, %v", all, err)
	}
	// The watcher saw the changes and their undoing: replayed, they end
	// where the store is. A change after the disk recovered marks the end.
	if err := os.Remove(stateDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if _, err := f.Claim(ctx, alloc("c", "end", 300)); err != nil {
		t.Fatal(err)
	}
	seen := map[Key]Event{}
	for e := next(t, w); e.Revision <= last; e = next(t, w) {
		if e.Type == Put {
			seen[e.Alloc.Key()] = e
		} else {
			delete(seen, e.Alloc.Key())
		}
	}
	if len(seen) != 1 || seen[kept.Key()].Alloc.Service != "kept" {
		t.Fatalf("the watcher ends with %+v", seen)
	}
}

// BenchmarkFileClaim claims retained ports of a state file of 10,000
// allocations: one caller at a time, and many at once (a reconnect storm).
func BenchmarkFileClaim(b *testing.B) {
	const n = 10000
	for _, par := range []int{1, 50} {
		b.Run(fmt.Sprintf("allocs=%d/callers=%d", n, par), func(b *testing.B) {
			path := filepath.Join(b.TempDir(), "gateway.db")
			ff := fileFormat{Version: fileVersion}
			t0 := time.Now().UTC()
			for i := range n {
				ff.Allocations = append(ff.Allocations, Allocation{Agent: "a", Service: fmt.Sprintf("s%d", i), Protocol: protocol.KindTCP, Port: 10000 + i, LastUsed: t0})
			}
			js, err := json.Marshal(ff)
			if err != nil {
				b.Fatal(err)
			}
			if err := os.WriteFile(path, js, 0o600); err != nil {
				b.Fatal(err)
			}
			f := &File{Path: path}
			ctx := context.Background()
			if _, _, err := f.List(ctx); err != nil {
				b.Fatal(err)
			}
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			for range par {
				wg.Go(func() {
					for {
						i := next.Add(1) - 1
						if i >= int64(b.N) {
							return
						}
						if _, err := f.Claim(ctx, Allocation{Agent: "a", Service: fmt.Sprintf("s%d", i%n), Protocol: protocol.KindTCP, Port: 10000 + int(i%n)}); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(writeCount(f))/float64(b.N), "writes/op")
		})
	}
}

// A restamping claim waits for no write of its own, but for the write of
// a change to the port not yet on disk: it returns with the port written.
func TestFileStampOnlyClaimWaitsForPendingWrite(t *testing.T) {
	f := &File{Path: filepath.Join(t.TempDir(), "gateway.db")}
	ctx, cancel := context.WithTimeout(context.Background(), conformanceTimeout)
	defer cancel()
	release := make(chan struct{})
	f.mu.Lock()
	f.beforeWrite = func() {
		select {
		case <-release:
		case <-ctx.Done():
		}
	}
	f.mu.Unlock()
	first := make(chan error, 1)
	go func() {
		_, err := f.Claim(ctx, alloc("a", "s", 100))
		first <- err
	}()
	for {
		f.mu.Lock()
		writing := f.writing
		f.mu.Unlock()
		if writing || ctx.Err() != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	type result struct {
		onDisk bool
		err    error
	}
	second := make(chan result, 1)
	go func() {
		_, err := f.Claim(ctx, alloc("a", "s", 100))
		b, _ := os.ReadFile(f.Path)
		second <- result{strings.Contains(string(b), `"port": 100,`), err}
	}()
	var r result
	select {
	case r = <-second:
		close(release)
	case <-time.After(100 * time.Millisecond):
		close(release)
		r = <-second
	}
	if err := <-first; err != nil || r.err != nil {
		t.Fatalf("claims: %v, %v", err, r.err)
	}
	if !r.onDisk {
		t.Fatal("the restamping claim returned before the claim it restamps was written")
	}
}
