// Package testlog collects what a component logs during a test: tests can
// search it, and it is printed when the test fails. For tests only.
package testlog

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// Buffer is a log buffer safe for a component writing while the test reads.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write implements io.Writer.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Count counts the occurrences of substr.
func (b *Buffer) Count(substr string) int { return strings.Count(b.String(), substr) }

// CountLines counts the lines that contain every one of parts.
func (b *Buffer) CountLines(parts ...string) int {
	n := 0
	for _, line := range strings.Split(b.String(), "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			n++
		}
	}
	return n
}

// Since returns the log from the line after the n-th line containing
// marker up to and including the (n+1)-th: one event's worth of log.
func (b *Buffer) Since(n int, marker string) string {
	seen := 0
	var out strings.Builder
	for _, line := range strings.SplitAfter(b.String(), "\n") {
		if seen >= n {
			out.WriteString(line)
		}
		if strings.Contains(line, marker) {
			seen++
			if seen > n {
				break
			}
		}
	}
	return out.String()
}

// New returns a debug-level text logger writing into a Buffer whose content
// is printed, under name, if t fails.
func New(t testing.TB, name string) (*slog.Logger, *Buffer) {
	b := &Buffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("---- %s log ----\n%s", name, b.String())
		}
	})
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug})), b
}
