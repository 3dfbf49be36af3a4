package agent

import (
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/portway/portway/internal/tunnel"
)

// A gateway busy with other handshakes answers 503 with Retry-After: the
// agent waits that long plus up to as long again (jitter), without
// advancing its backoff; any other failure takes the next backoff step.
func TestRetryDelayHonoursRetryAfter(t *testing.T) {
	b := backoff{initial: 500 * time.Millisecond, max: 30 * time.Second}
	busy := fmt.Errorf("dial: %w", &tunnel.DialError{StatusCode: http.StatusServiceUnavailable, RetryAfter: 2 * time.Second})
	seen := map[time.Duration]bool{}
	for range 200 {
		d := retryDelay(busy, &b)
		if d < 2*time.Second || d > 4*time.Second {
			t.Fatalf("delay %v after Retry-After: 2, want 2s-4s", d)
		}
		seen[d] = true
	}
	if len(seen) < 10 {
		t.Fatalf("only %d distinct delays in 200: no jitter", len(seen))
	}
	if b.cur != 0 {
		t.Fatalf("a deferred attempt advanced the backoff to %v", b.cur)
	}
	// 503 without Retry-After (a gateway shutting down), and other
	// errors: the backoff.
	for _, err := range []error{
		&tunnel.DialError{StatusCode: http.StatusServiceUnavailable},
		errors.New("connection refused"),
	} {
		b := backoff{initial: 500 * time.Millisecond, max: 30 * time.Second}
		if d := retryDelay(err, &b); d < 250*time.Millisecond || d > 500*time.Millisecond || b.cur != 500*time.Millisecond {
			t.Fatalf("%v: delay %v, backoff at %v; want the first backoff step", err, d, b.cur)
		}
	}
}
