package cli

import (
	"context"
	"crypto/sha256"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// defaultWatchInterval is how often the gateway and the agent look at
// their config (and TLS) files for a change.
const defaultWatchInterval = 2 * time.Second

// fileState is what a poll compares: modification time, size and content
// hash. The hash catches a replacement that keeps both (a Kubernetes
// Secret's symlink swap, a copy with preserved times).
type fileState struct {
	mod  time.Time
	size int64
	sum  [sha256.Size]byte
	err  string
}

// maxWatchedFile bounds what a poll reads of one file: configs and
// certificates are small.
const maxWatchedFile = 4 << 20

func readFileState(path string) fileState {
	f, err := os.Open(path)
	if err != nil {
		return fileState{err: err.Error()}
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fileState{err: err.Error()}
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.LimitReader(f, maxWatchedFile)); err != nil {
		return fileState{err: err.Error()}
	}
	st := fileState{mod: fi.ModTime(), size: fi.Size()}
	h.Sum(st.sum[:0])
	return st
}

// reloadLoop calls reload on SIGHUP and whenever one of paths() changes
// (polled every interval; 0 turns polling off) until ctx ends. paths is
// asked again after every poll, since a reload may name other files.
// SIGHUP is caught from here on, so it no longer ends the process.
func reloadLoop(ctx context.Context, log *slog.Logger, interval time.Duration, paths func() []string, reload func(reason string)) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	seen := map[string]fileState{}
	for _, p := range paths() {
		seen[p] = readFileState(p)
	}
	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	log.Info("live reload ready: on SIGHUP and on change of", "files", paths(), "poll_interval", interval)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			reload("SIGHUP")
		case <-tick:
			var changed []string
			now := map[string]fileState{}
			for _, p := range paths() {
				st := readFileState(p)
				now[p] = st
				if old, ok := seen[p]; ok && old != st {
					changed = append(changed, p)
				}
			}
			seen = now
			if len(changed) > 0 {
				reload("changed: " + strings.Join(changed, ", "))
			}
		}
	}
}

// oneLine joins a multi-line error (config validation joins one line per
// key) so that a failed reload is one log line.
func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }

// applyLogLevel sets the loggers' level from a config's log_level, unless
// --log-level was given (the flag wins, as flags do over the file).
func (a *app) applyLogLevel(cfgLevel string, flagSet bool) {
	if flagSet {
		return
	}
	v := cfgLevel
	if v == "" {
		v = a.logLevel
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(v)); err == nil { // validated
		a.level.Set(l)
	}
}
