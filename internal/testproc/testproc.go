// Package testproc runs child processes for tests: the portway binary in
// the end-to-end tests, third-party servers in testservers. A process is
// started with its output in a log file, in its own process group, dying
// with the test binary, and is stopped when the test ends (the group and
// every descendant, so nothing outlives the test). For tests only.
package testproc

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/childproc"
)

// stopGrace is how long a process may take to exit after the stop signal
// before it (and its process group and descendants) get SIGKILL, and how
// long it then has to be gone.
const stopGrace = 5 * time.Second

// Process is one running child process.
type Process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	stopSig syscall.Signal
	done    chan struct{} // closed when cmd.Wait returned
	waitErr error         // cmd.Wait's result, set before done is closed
	once    sync.Once
}

// Start starts cmd with stdout and stderr appended to logPath, in its own
// process group, with SIGKILL as parent-death signal where the system has
// one (so a test binary that dies hard leaves nothing behind), and
// registers a cleanup that stops it with stopSig (see Stop).
func Start(t testing.TB, name string, cmd *exec.Cmd, logPath string, stopSig syscall.Signal) *Process {
	t.Helper()
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("testproc: %s: %v", name, err)
	}
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = childproc.SysProcAttr()
	} else {
		// Keep what the caller set (credentials, say) and add the group
		// and the parent-death signal.
		cmd.SysProcAttr.Setpgid = true
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("testproc: starting %s: %v", name, err)
	}
	logFile.Close() // the child has its own copy
	p := &Process{name: name, cmd: cmd, logPath: logPath, stopSig: stopSig, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() { p.Stop(t) })
	return p
}

// Pid is the process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed once the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is how the process ended (cmd.Wait's error); nil while it runs.
func (p *Process) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.waitErr
}

// Signal sends sig to the process (not its group).
func (p *Process) Signal(sig syscall.Signal) error {
	if err := p.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("testproc: signalling %s: %w", p.name, err)
	}
	return nil
}

// LogPath is the file the process's output goes to.
func (p *Process) LogPath() string { return p.logPath }

// Log returns everything the process has written so far.
func (p *Process) Log() string {
	b, _ := os.ReadFile(p.logPath)
	return string(b)
}

// LogTail returns the last lines of the process's log.
func (p *Process) LogTail() string { return TailFile(p.logPath, 40, 8<<10) }

// Stop ends the process: the stop signal to its process group, SIGKILL to
// the group and to every descendant (also those that left the group, like
// sshd's per-connection children) after a grace period, and fails the test
// if it is still there after that. Safe to call more than once and after
// the process exited by itself.
func (p *Process) Stop(t testing.TB) {
	p.once.Do(func() {
		pid := p.cmd.Process.Pid
		desc := descendants(pid)
		if !p.Exited() {
			_ = syscall.Kill(-pid, p.stopSig)
			_ = syscall.Kill(pid, p.stopSig)
		}
		select {
		case <-p.done:
		case <-time.After(stopGrace):
			t.Logf("testproc: %s (pid %d) did not exit within %v after %v; killing it", p.name, pid, stopGrace, p.stopSig)
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		if !p.Exited() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		for _, d := range desc {
			d.kill()
		}
		select {
		case <-p.done:
		case <-time.After(stopGrace):
			t.Errorf("testproc: %s (pid %d) still running after SIGKILL", p.name, pid)
		}
	})
}

// TailFile returns at most the last maxLines lines and maxBytes bytes of
// the file at path, or a note saying why it cannot be read.
func TailFile(path string, maxLines, maxBytes int) string {
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

// descendants lists all descendants of pid (children, grandchildren, ...)
// from /proc; none where there is no /proc.
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
