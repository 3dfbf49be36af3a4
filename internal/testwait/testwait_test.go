package testwait

import (
	"testing"
	"time"
)

func TestUntilHoldsAtOnce(t *testing.T) {
	calls := 0
	if !Until(time.Second, func() bool { calls++; return true }) {
		t.Fatal("Until = false for a condition that holds")
	}
	if calls != 1 {
		t.Errorf("cond asked %d times, want 1", calls)
	}
}

func TestUntilWaitsForTheCondition(t *testing.T) {
	calls := 0
	if !Until(10*time.Second, func() bool { calls++; return calls == 3 }) {
		t.Fatal("Until = false for a condition that holds on the third poll")
	}
	if calls != 3 {
		t.Errorf("cond asked %d times, want 3", calls)
	}
}

// A condition that never holds ends the wait, by time or by count: with a
// cond that takes longer than the whole timeout, the poll count bounds it.
func TestUntilGivesUp(t *testing.T) {
	calls := 0
	if Until(100*time.Millisecond, func() bool { calls++; return false }) {
		t.Fatal("Until = true for a condition that never holds")
	}
	if calls < 2 {
		t.Errorf("cond asked %d times in 100ms, want at least 2 (every 20ms)", calls)
	}
	calls = 0
	if Until(0, func() bool { calls++; return false }) {
		t.Fatal("Until(0) = true for a condition that never holds")
	}
	if calls < 1 || calls > 2 {
		t.Errorf("Until(0) asked cond %d times, want 1 or 2", calls)
	}
}
