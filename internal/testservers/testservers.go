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
// The package uses only the standard library and is meant for tests only.
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
)

const (
	// readyTimeout bounds how long a starter waits for its server.
	readyTimeout = 20 * time.Second
	// stopGrace is how long a server may take to exit after the polite signal
	// before it (and its process group and descendants) get SIGKILL.
	stopGrace = 5 * time.Second
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
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	stopSig syscall.Signal
	done    chan struct{} // closed when cmd.Wait returned
	waitErr error
	once    sync.Once
}

// startProcess starts cmd with stdout and stderr appended to logPath, in its
// own process group, with SIGKILL as parent-death signal (so a test binary
// that dies hard does not leave servers behind), and registers a cleanup that
// stops it.
func startProcess(t testing.TB, name string, cmd *exec.Cmd, logPath string, stopSig syscall.Signal) *process {
	t.Helper()
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("testservers: %s: %v", name, err)
	}
	fmt.Fprintf(logFile, "=== testservers: %s\n", strings.Join(cmd.Args, " "))
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("testservers: starting %s: %v", name, err)
	}
	logFile.Close() // the child has its own copy
	p := &process{name: name, cmd: cmd, logPath: logPath, stopSig: stopSig, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() { p.stop(t) })
	return p
}

// exited reports whether the process has exited.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop ends the process: stopSig to its process group, SIGKILL to the group
// and to every descendant (also those that left the group, like sshd's
// per-connection children) after stopGrace. Safe to call more than once.
func (p *process) stop(t testing.TB) {
	p.once.Do(func() {
		pid := p.cmd.Process.Pid
		desc := descendants(pid)
		if !p.exited() {
			_ = syscall.Kill(-pid, p.stopSig)
			_ = syscall.Kill(pid, p.stopSig)
		}
		select {
		case <-p.done:
		case <-time.After(stopGrace):
			t.Logf("testservers: %s (pid %d) did not exit within %v after %v; killing it", p.name, pid, stopGrace, p.stopSig)
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		if !p.exited() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		for _, d := range desc {
			d.kill()
		}
		select {
		case <-p.done:
		case <-time.After(stopGrace):
			t.Errorf("testservers: %s (pid %d) still running after SIGKILL", p.name, pid)
		}
	})
}

// logTail returns the last lines of the process log.
func (p *process) logTail() string { return tailFile(p.logPath, 40, 8<<10) }

func tailFile(path string, maxLines, maxBytes int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	if len(b) > maxBytes {
		b = b[len(b)-maxBytes:]
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	return strings.Join(lines, "\n")
}

// errExited is returned by waitReady when the server exited while starting.
var errExited = errors.New("server exited before it was ready")

// waitReady polls check until it succeeds, the process exits or readyTimeout
// passes. It returns nil when ready, else the last check error (wrapped with
// errExited if the process died).
func (p *process) waitReady(check func() error) error {
	deadline := time.Now().Add(readyTimeout)
	delay := 20 * time.Millisecond
	var last error
	for {
		if p.exited() {
			return fmt.Errorf("%w (%v); last check: %v", errExited, p.waitErr, last)
		}
		if last = check(); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v: %v", readyTimeout, last)
		}
		select {
		case <-p.done:
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
		err := p.waitReady(func() error { return ready(port) })
		if err == nil {
			t.Logf("testservers: %s ready on port %d in %v (log %s)", name, port, time.Since(begin).Round(time.Millisecond), p.logPath)
			return p, port
		}
		tail := p.logTail()
		p.stop(t)
		if errors.Is(err, errExited) && strings.Contains(tail, "in use") && attempt < maxStartAttempts {
			t.Logf("testservers: %s: port %d was taken, retrying with another port", name, port)
			continue
		}
		t.Fatalf("testservers: %s on port %d did not start: %v\n--- tail of %s ---\n%s", name, port, err, p.logPath, tail)
	}
}

// procID identifies a process by pid and start time, so a recycled pid is
// never killed by mistake.
type procID struct {
	pid   int
	start string
}

func (d procID) kill() {
	if _, start, ok := procStat(d.pid); ok && start == d.start {
		_ = syscall.Kill(d.pid, syscall.SIGKILL)
	}
}

// procStat returns the parent pid and start time of pid from /proc.
func procStat(pid int) (ppid int, start string, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, "", false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, "", false
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state), f[1] field 4 (ppid), f[19] field 22 (starttime).
	if len(f) < 20 {
		return 0, "", false
	}
	ppid, err = strconv.Atoi(f[1])
	if err != nil {
		return 0, "", false
	}
	return ppid, f[19], true
}

// descendants lists all descendants of pid (children, grandchildren, ...).
func descendants(pid int) []procID {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]procID{}
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid, start, ok := procStat(n); ok {
			children[ppid] = append(children[ppid], procID{n, start})
		}
	}
	var out []procID
	queue := []int{pid}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		for _, c := range children[cur] {
			out = append(out, c)
			queue = append(queue, c.pid)
		}
	}
	return out
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
