package gateway

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Every caller of coalesced.do returns only after a run that saw its
// change; concurrent callers share runs.
func TestCoalescedRunCoversEveryCaller(t *testing.T) {
	var c coalesced
	var state, snapshot atomic.Int64
	var runs atomic.Int64
	job := func() error {
		runs.Add(1)
		s := state.Load()
		time.Sleep(time.Millisecond) // changes land during the run
		snapshot.Store(s)
		return nil
	}
	const callers = 200
	var wg sync.WaitGroup
	var stale atomic.Int64
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mine := state.Add(1)
			c.do(job)
			if snapshot.Load() < mine {
				stale.Add(1)
			}
		}()
	}
	wg.Wait()
	if n := stale.Load(); n > 0 {
		t.Fatalf("%d callers returned before a run that saw their change", n)
	}
	if r := runs.Load(); r >= callers {
		t.Fatalf("%d runs for %d concurrent callers: nothing coalesced", r, callers)
	}
}
