package tunnel

import (
	"testing"
	"time"
)

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"1":                             time.Second,
		" 7 ":                           7 * time.Second,
		"0":                             0,
		"-3":                            0,
		"soon":                          0,
		"99999":                         5 * time.Minute, // capped
		"Sat, 28 Nov 2026 12:00:30 GMT": 30 * time.Second,
		"Sat, 28 Nov 2026 11:00:00 GMT": 0, // in the past
	} {
		if got := ParseRetryAfter(in, now); got != want {
			t.Errorf("ParseRetryAfter(%q) = %v, want %v", in, got, want)
		}
	}
}
