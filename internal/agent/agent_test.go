package agent

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	b := backoff{initial: 500 * time.Millisecond, max: 30 * time.Second}
	prevCap := time.Duration(0)
	for i := 0; i < 12; i++ {
		d := b.next()
		cap := min(500*time.Millisecond<<i, 30*time.Second)
		if d < cap/2 || d > cap {
			t.Fatalf("attempt %d: delay %v outside [%v, %v]", i, d, cap/2, cap)
		}
		prevCap = cap
	}
	if prevCap != 30*time.Second {
		t.Fatalf("backoff did not reach its cap: %v", prevCap)
	}
	b.reset()
	if d := b.next(); d > 500*time.Millisecond {
		t.Fatalf("after reset: %v", d)
	}
}

func TestClientCommand(t *testing.T) {
	cases := []struct {
		proto string
		port  int
		want  string
	}{
		{"tcp", 5432, "psql -h gw.example.com -p 15432"},
		{"tcp", 6379, "redis-cli -h gw.example.com -p 15432"},
		{"tcp", 2222, "ssh -p 15432 user@gw.example.com"},
		{"udp", 53, "dig @gw.example.com -p 15432 example.com"},
		{"tcp", 9999, "gw.example.com:15432"},
	}
	for _, c := range cases {
		if got := ClientCommand(c.proto, c.port, "gw.example.com:15432"); got != c.want {
			t.Errorf("%s/%d: %q, want %q", c.proto, c.port, got, c.want)
		}
	}
}
