// Package testwait waits, in tests, for a condition that becomes true
// asynchronously, bounded in time. For tests only.
package testwait

import (
	"testing"
	"time"
)

// For polls cond every 20 ms until it holds, failing the test (naming what
// it waited for) once timeout has passed.
func For(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
