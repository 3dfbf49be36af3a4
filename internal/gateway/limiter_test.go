package gateway

import (
	"fmt"
	"testing"
	"time"
)

// failUntilThrottled fails src until the limiter reports it over the limit
// and returns how many failures that took.
func failUntilThrottled(t *testing.T, l *authLimiter, src string) int {
	t.Helper()
	for i := 1; i <= l.limit; i++ {
		if l.fail(src) {
			return i
		}
	}
	t.Fatalf("%s not throttled after %d failures", src, l.limit)
	return 0
}

// An IPv6 client counts as its /64, so rotating addresses within it buys
// no extra tries; IPv4 addresses count one by one.
func TestAuthLimiterKeysIPv6OnSlash64(t *testing.T) {
	l := newAuthLimiter(3, time.Minute)
	l.now = (&fakeClock{t: time.Unix(1000, 0)}).now
	for i := 0; i < 3; i++ {
		if !l.allowed(fmt.Sprintf("2001:db8:1:2::%x", i+1)) {
			t.Fatalf("attempt %d throttled early", i)
		}
		l.fail(fmt.Sprintf("2001:db8:1:2:%x::%x", i, i+7))
	}
	for _, src := range []string{"2001:db8:1:2::ffff", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::1%eth0"} {
		if l.allowed(src) {
			t.Errorf("%s, in the throttled /64, still allowed", src)
		}
	}
	for _, src := range []string{"2001:db8:1:3::1", "2001:db8:2:2::1", "10.0.0.1"} {
		if !l.allowed(src) {
			t.Errorf("%s, outside the throttled /64, refused", src)
		}
	}

	// IPv4: each address on its own; the IPv4-mapped form is the same address.
	l.fail("192.0.2.1")
	l.fail("::ffff:192.0.2.1")
	if !l.fail("192.0.2.1") {
		t.Error("three failures of 192.0.2.1, two of them IPv4-mapped, did not reach the limit")
	}
	if l.allowed("::ffff:192.0.2.1") {
		t.Error("throttled IPv4 address allowed in its IPv4-mapped form")
	}
	if !l.allowed("192.0.2.2") {
		t.Error("the neighbouring IPv4 address was throttled")
	}
}

// With the table full, the oldest windows go (ended ones first); the
// others keep their counts instead of every window being cleared.
func TestAuthLimiterEvictsOldestWhenFull(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	l := newAuthLimiter(3, time.Minute)
	l.now = clk.now
	l.max = 3
	at := func(d time.Duration) { clk.t = time.Unix(1000, 0).Add(d) }

	at(0)
	failUntilThrottled(t, l, "192.0.2.1") // ends at 60s
	at(30 * time.Second)
	l.fail("192.0.2.2")
	l.fail("192.0.2.2")
	at(40 * time.Second)
	failUntilThrottled(t, l, "192.0.2.3")

	// .1's window has ended: it is the one dropped for .4.
	at(61 * time.Second)
	l.fail("192.0.2.4")
	if len(l.sources) != 3 {
		t.Fatalf("tracking %d sources, want 3", len(l.sources))
	}
	if l.allowed("192.0.2.3") {
		t.Error(".3, throttled until 100s, was forgotten when .4 arrived")
	}
	// Full of live windows: the oldest, .2's, goes for .5; .3 stays throttled.
	at(62 * time.Second)
	l.fail("192.0.2.5")
	if _, ok := l.sources[sourceKey("192.0.2.2")]; ok {
		t.Error(".2, the oldest window, was not the one evicted")
	}
	if l.allowed("192.0.2.3") {
		t.Error(".3 lost its window to a newer source")
	}
	if len(l.sources) != 3 || l.order.Len() != 3 {
		t.Errorf("tracking %d sources in a list of %d, want 3", len(l.sources), l.order.Len())
	}
}
