// Package testwait waits, in tests, for a condition that becomes true
// asynchronously, bounded in time and in the number of polls. It is the one
// place tests poll: For fails the test when the wait runs out, Until reports
// it to a caller that goes on. For tests only.
package testwait

import (
	"testing"
	"time"
)

// interval is how long a poll waits before asking cond again.
const interval = 20 * time.Millisecond

// For polls cond every 20 ms until it holds, failing the test (naming what
// it waited for) once timeout has passed.
func For(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	if !Until(timeout, cond) {
		t.Fatalf("timed out after %v waiting for %s", timeout, what)
	}
}

// Until polls cond every 20 ms until it holds (true) or timeout has passed
// (false). cond is asked at least once, and once more after the deadline
// when the last poll began before it, so a slow cond (one that dials a
// wedged server, say) still gets its last word. The number of polls is
// bounded by timeout/20ms + 2 as well as by the time.
func Until(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for i := 0; i <= int(timeout/interval)+1; i++ {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
	return false
}
