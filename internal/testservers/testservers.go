// Package testservers starts real third-party servers (PostgreSQL, Redis,
// OpenSSH sshd, dnsmasq, HAProxy) as child processes for end-to-end tests, and runs
// their real clients (psql, redis-cli, ssh/scp, dig) against any host and port,
// typically a portway tunnel endpoint.
//
// Every starter takes a testing.TB, listens on a free 127.0.0.1 port, keeps
// all of its files in a private temporary directory, waits (bounded) until the
// server answers a real protocol-level request, and registers a t.Cleanup that
// stops the server (SIGTERM or the server's fast-shutdown signal, SIGKILL after
// a grace period), waits for it and removes its files, also when the test
// fails. Server output goes to a log file in that directory; when a server
// does not become ready the tail of that log is part of the failure message.
//
// Missing binaries: when the environment variable CI is non-empty the test
// fails, otherwise it is skipped; the message names the Debian package and
// scripts/install-test-deps.sh, which installs everything this package needs.
//
// Processes are started and stopped by testproc. The package uses only the
// standard library besides, and is meant for tests only.
package testservers

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/testproc"
)

const (
	// readyTimeout bounds how long a starter waits for its server.
	readyTimeout = 20 * time.Second
	// clientTimeout bounds every client command (psql, redis-cli, ssh, ...).
	clientTimeout = 60 * time.Second
	// maxStartAttempts is how often a starter retries when its port was
	// taken by someone else between FreePort and the server's bind.
	maxStartAttempts = 3
)

// installHint is appended to every missing-binary message.
const installHint = "run scripts/install-test-deps.sh"

// sbinDirs are searched after PATH: sbin directories are often not on a
// normal user's PATH, and Debian puts sshd and dnsmasq there.
var sbinDirs = []string{"/usr/local/sbin", "/usr/sbin", "/sbin"}

// Require returns the absolute path of binary, searching PATH, the usual sbin
// directories and (newest first) /usr/lib/postgresql/*/bin. If the binary is
// missing the test is failed when the environment variable CI is non-empty and
// skipped otherwise; either way the message names debianPackage and
// scripts/install-test-deps.sh. A binary given as a path (containing a slash)
// is only checked for existence.
func Require(t testing.TB, binary, debianPackage string) string {
	t.Helper()
	if p, ok := findBinary(binary); ok {
		return p
	}
	missing(t, fmt.Sprintf("testservers: required binary %q not found in PATH, %s or %s (Debian package %q; %s)",
		binary, strings.Join(sbinDirs, ", "), "/usr/lib/postgresql/*/bin", debianPackage, installHint))
	return "" // not reached: missing always stops the test
}

// missing fails (CI) or skips (local) the test with msg.
func missing(t testing.TB, msg string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("%s", msg)
	}
	t.Skipf("%s", msg)
}

func findBinary(binary string) (string, bool) {
	if strings.Contains(binary, "/") {
		if isExecutable(binary) {
			abs, err := filepath.Abs(binary)
			if err == nil {
				return abs, true
			}
		}
		return "", false
	}
	if p, err := exec.LookPath(binary); err == nil {
		if abs, err := filepath.Abs(p); err == nil {
			return abs, true
		}
	}
	dirs := append([]string{}, sbinDirs...)
	dirs = append(dirs, postgresBinDirs()...)
	for _, d := range dirs {
		p := filepath.Join(d, binary)
		if isExecutable(p) {
			return p, true
		}
	}
	return "", false
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

// postgresBinDirs lists /usr/lib/postgresql/<version>/bin, newest first.
func postgresBinDirs() []string {
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	type dir struct {
		path string
		ver  []int
	}
	var dirs []dir
	for _, m := range matches {
		v := filepath.Base(filepath.Dir(m))
		var ver []int
		for _, part := range strings.Split(v, ".") {
			n, err := strconv.Atoi(part)
			if err != nil {
				n = -1
			}
			ver = append(ver, n)
		}
		dirs = append(dirs, dir{m, ver})
	}
	sort.Slice(dirs, func(i, j int) bool {
		a, b := dirs[i].ver, dirs[j].ver
		for k := 0; k < len(a) && k < len(b); k++ {
			if a[k] != b[k] {
				return a[k] > b[k]
			}
		}
		return len(a) > len(b)
	})
	out := make([]string, len(dirs))
	for i, d := range dirs {
		out[i] = d.path
	}
	return out
}

var (
	portsMu sync.Mutex
	// portsGiven remembers every port handed out by this process so two
	// servers of one test binary never get the same port.
	portsGiven = map[int]bool{}
)

// FreePort returns a port on 127.0.0.1 that is currently free for network
// "tcp" or "udp" ("tcp4"/"udp4" are accepted too). It never returns the same
// port twice within one test binary. The port is released before returning, so
// another process can in principle grab it; the starters in this package retry
// with a new port when that happens.
func FreePort(t testing.TB, network string) int {
	t.Helper()
	return freePortOn(t, network, "127.0.0.1")
}

// freePortOn is FreePort for an IPv4 address of this host other than
// 127.0.0.1.
func freePortOn(t testing.TB, network, host string) int {
	t.Helper()
	for i := 0; i < 50; i++ {
		var port int
		switch network {
		case "tcp", "tcp4":
			l, err := net.Listen("tcp4", net.JoinHostPort(host, "0"))
			if err != nil {
				t.Fatalf("testservers: FreePort: %v", err)
			}
			port = l.Addr().(*net.TCPAddr).Port
			l.Close()
		case "udp", "udp4":
			c, err := net.ListenPacket("udp4", net.JoinHostPort(host, "0"))
			if err != nil {
				t.Fatalf("testservers: FreePort: %v", err)
			}
			port = c.LocalAddr().(*net.UDPAddr).Port
			c.Close()
		default:
			t.Fatalf("testservers: FreePort: unsupported network %q (want tcp or udp)", network)
		}
		portsMu.Lock()
		dup := portsGiven[port]
		portsGiven[port] = true
		portsMu.Unlock()
		if !dup {
			return port
		}
	}
	t.Fatalf("testservers: FreePort: no unused %s port found", network)
	return 0
}

// freeTCPUDPPort returns a port free for both TCP and UDP on host (for
// DNS, which serves both).
func freeTCPUDPPort(t testing.TB, host string) int {
	t.Helper()
	for i := 0; i < 50; i++ {
		port := freePortOn(t, "tcp", host)
		c, err := net.ListenPacket("udp4", net.JoinHostPort(host, strconv.Itoa(port)))
		if err == nil {
			c.Close()
			return port
		}
	}
	t.Fatalf("testservers: no port free for both tcp and udp found")
	return 0
}

// serverDir makes a private temporary directory for one server and registers
// its removal. It is created with os.MkdirTemp (not t.TempDir) so that it can
// be made traversable for a server running as another user; see Postgres.
func serverDir(t testing.TB, name string) string {
	t.Helper()
	dir, err := os.MkdirTemp(tempRoot(), "portway-"+name+"-")
	if err != nil {
		t.Fatalf("testservers: %v", err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Logf("testservers: removing %s: %v", dir, err)
		}
	})
	return dir
}

// tempRoot is os.TempDir(), or /tmp when some directory above os.TempDir() is
// not traversable by other users (a 0700 TMPDIR would lock out the postgres
// user when the tests run as root).
func tempRoot() string {
	d := os.TempDir()
	if os.Geteuid() != 0 {
		return d
	}
	for p := d; ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm()&0o001 == 0 {
			return "/tmp"
		}
		if p == filepath.Dir(p) {
			return d
		}
	}
}

// process is one running server.
type process = testproc.Process

// startProcess starts cmd with its output appended to logPath, headed by
// its command line, as testproc.Start does: it is stopped with stopSig
// when the test ends.
func startProcess(t testing.TB, name string, cmd *exec.Cmd, logPath string, stopSig syscall.Signal) *process {
	t.Helper()
	header := fmt.Sprintf("=== testservers: %s\n", strings.Join(cmd.Args, " "))
	if err := os.WriteFile(logPath, []byte(header), 0o644); err != nil {
		t.Fatalf("testservers: %s: %v", name, err)
	}
	return testproc.Start(t, name, cmd, logPath, stopSig)
}

// tailFile returns the end of a log file (see testproc.TailFile).
func tailFile(path string, maxLines, maxBytes int) string {
	return testproc.TailFile(path, maxLines, maxBytes)
}

// errExited is returned by waitReady when the server exited while starting.
var errExited = errors.New("server exited before it was ready")

// waitReady polls check until it succeeds, the process exits or readyTimeout
// passes. It returns nil when ready, else the last check error (wrapped with
// errExited if the process died).
func waitReady(p *process, check func() error) error {
	deadline := time.Now().Add(readyTimeout)
	delay := 20 * time.Millisecond
	var last error
	for {
		if p.Exited() {
			return fmt.Errorf("%w (%v); last check: %v", errExited, p.Err(), last)
		}
		if last = check(); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v: %v", readyTimeout, last)
		}
		select {
		case <-p.Done():
		case <-time.After(delay):
		}
		if delay < 200*time.Millisecond {
			delay *= 2
		}
	}
}

// startServer runs start (which must start exactly one process on port and
// return it) and waits for ready. When the process died because its address
// was in use, it is retried with a new port. On failure the test is failed
// with the log tail.
func startServer(t testing.TB, name string, newPort func() int, start func(port int) *process, ready func(port int) error) (*process, int) {
	t.Helper()
	for attempt := 1; ; attempt++ {
		port := newPort()
		begin := time.Now()
		p := start(port)
		err := waitReady(p, func() error { return ready(port) })
		if err == nil {
			t.Logf("testservers: %s ready on port %d in %v (log %s)", name, port, time.Since(begin).Round(time.Millisecond), p.LogPath())
			return p, port
		}
		tail := p.LogTail()
		p.Stop(t)
		if errors.Is(err, errExited) && strings.Contains(tail, "in use") && attempt < maxStartAttempts {
			t.Logf("testservers: %s: port %d was taken, retrying with another port", name, port)
			continue
		}
		t.Fatalf("testservers: %s on port %d did not start: %v\n--- tail of %s ---\n%s", name, port, err, p.LogPath(), tail)
	}
}

// runClient runs a client binary with a bounded time, stdin from /dev/null,
// and returns its stdout. On failure the error includes stderr.
func runClient(t testing.TB, env []string, name string, args ...string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (timed out after %v)", err, clientTimeout)
		}
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// cleanEnv returns the current environment without variables whose names
// start with one of the prefixes, plus extra.
func cleanEnv(dropPrefixes []string, extra ...string) []string {
	var env []string
next:
	for _, kv := range os.Environ() {
		for _, p := range dropPrefixes {
			if strings.HasPrefix(kv, p) {
				continue next
			}
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// hostPort joins host and port, bracketing IPv6 literals.
func hostPort(host string, port int) string { return net.JoinHostPort(host, strconv.Itoa(port)) }
