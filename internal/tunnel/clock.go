package tunnel

import "time"

// clock is where a session's heartbeat logic reads the time: when the last
// message arrived, when to check for silence and when to send the next
// heartbeat. Sessions use the wall clock; tests substitute a fake one
// (through Config.clock) to check the heartbeat rule exactly, without
// waiting on, or being fooled by, a busy machine's scheduler.
type clock interface {
	// now returns the current time; only differences between its results
	// are used.
	now() time.Time
	// tick delivers the time on the returned channel every d, until stop
	// is called.
	tick(d time.Duration) (ticks <-chan time.Time, stop func())
}

// wallClock is the real clock.
type wallClock struct{}

func (wallClock) now() time.Time { return time.Now() }

func (wallClock) tick(d time.Duration) (<-chan time.Time, func()) {
	t := time.NewTicker(d)
	return t.C, t.Stop
}
