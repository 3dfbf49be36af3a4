package agent

import (
	"testing"
	"time"

	"github.com/portway/portway/internal/protocol"
)

// The documented schedule: 500 ms doubling to 30 s, each delay between half
// its step and the step ("equal jitter"), back to 500 ms after a reset.
func TestBackoff(t *testing.T) {
	ms := time.Millisecond
	steps := []time.Duration{500 * ms, 1000 * ms, 2000 * ms, 4000 * ms, 8000 * ms, 16000 * ms,
		30000 * ms, 30000 * ms, 30000 * ms, 30000 * ms, 30000 * ms, 30000 * ms}
	b := backoff{initial: 500 * ms, max: 30 * time.Second}
	// Jitter is random: several rounds, and the delays of one attempt must
	// differ between rounds (agents must not reconnect in lockstep).
	seen := map[time.Duration]bool{}
	for round := 0; round < 50; round++ {
		b.reset()
		for i, step := range steps {
			d := b.next()
			if d < step/2 || d > step {
				t.Fatalf("attempt %d: delay %v outside [%v, %v]", i+1, d, step/2, step)
			}
			if i == 4 {
				seen[d] = true
			}
		}
	}
	if len(seen) < 2 {
		t.Fatalf("the fifth delay was the same in 50 rounds: no jitter")
	}
	b.reset()
	if d := b.next(); d < 250*ms || d > 500*ms {
		t.Fatalf("after reset: %v, want 250ms-500ms", d)
	}
}

func TestClientCommand(t *testing.T) {
	cases := []struct {
		proto protocol.Kind
		port  int
		want  string
	}{
		{protocol.KindTCP, 5432, "psql -h gw.example.com -p 15432"},
		{protocol.KindTCP, 6379, "redis-cli -h gw.example.com -p 15432"},
		{protocol.KindTCP, 2222, "ssh -p 15432 user@gw.example.com"},
		{protocol.KindUDP, 53, "dig @gw.example.com -p 15432 example.com"},
		{protocol.KindTCP, 9999, "gw.example.com:15432"},
	}
	for _, c := range cases {
		if got := ClientCommand(c.proto, c.port, "gw.example.com:15432"); got != c.want {
			t.Errorf("%s/%d: %q, want %q", c.proto, c.port, got, c.want)
		}
	}
}
