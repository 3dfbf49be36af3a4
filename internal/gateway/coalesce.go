package gateway

import (
	"sync"
	"sync/atomic"
)

// coalesced runs a whole-state job (save every allocation, count every
// service) for callers that ask for it concurrently and often: when a
// thousand agents register at once, each wants the job run after its
// change, and one run that starts after all their changes serves them all.
// A caller returns once a run that began after its call has finished; what
// would be thousands of O(agents) runs in a reconnect storm becomes a few.
//
// mu is held while the job runs, so it comes before whatever locks the job
// takes (the package's lock order lists each use).
type coalesced struct {
	req atomic.Uint64 // numbers the calls

	mu   sync.Mutex
	done uint64 // calls up to this number are served
}

// do runs job unless a run that started after this call has already
// succeeded; it returns that run's result or job's error. A failed run
// serves nobody: the next caller runs the job again.
func (c *coalesced) do(job func() error) error {
	seq := c.req.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done >= seq {
		return nil
	}
	// Every call numbered up to now made its change before this run
	// starts, so the run covers it.
	upTo := c.req.Load()
	if err := job(); err != nil {
		return err
	}
	c.done = upTo
	return nil
}
