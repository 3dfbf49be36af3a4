package bench

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/portway/portway/internal/childproc"
)

// Exec says how to run the portway binary for the gateway and agent child
// processes.
type Exec struct {
	// Path is the portway binary (os.Executable() for `portway bench`).
	Path string
	// Env is added to the children's environment.
	Env []string
}

// child is a gateway or agent running as a child process, its output in a
// log file.
type child struct {
	name     string
	cmd      *exec.Cmd
	log      string
	exited   chan struct{} // closed once the process has been waited for
	waitErr  error         // valid after exited is closed
	stopping atomic.Bool
}

// stopGrace is how long a child may take to shut down after SIGTERM
// before it is killed.
const stopGrace = 5 * time.Second

// startChild runs `portway args...` with its log in dir/name.log. onExit is
// called, from another goroutine, if the process ends before stop was
// called.
func startChild(ex Exec, dir, name string, args []string, onExit func(*child)) (*child, error) {
	logPath := filepath.Join(dir, name+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	cmd := exec.Command(ex.Path, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = childEnv(os.Environ(), ex.Env)
	cmd.SysProcAttr = childproc.SysProcAttr()
	err = cmd.Start()
	lf.Close() // the child holds its own descriptor
	if err != nil {
		return nil, fmt.Errorf("%s: start: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, log: logPath, exited: make(chan struct{})}
	go func() {
		c.waitErr = cmd.Wait()
		close(c.exited)
		if !c.stopping.Load() && onExit != nil {
			onExit(c)
		}
	}()
	return c, nil
}

// childEnv is the bench's environment without PORTWAY_* variables, which
// would override the children's config files (a token or gateway URL from
// the user's shell must not redirect the bench's agent), plus extra.
func childEnv(env, extra []string) []string {
	out := make([]string, 0, len(env)+len(extra))
	for _, kv := range env {
		if !strings.HasPrefix(kv, "PORTWAY_") {
			out = append(out, kv)
		}
	}
	return append(out, extra...)
}

func (c *child) proc() proc { return proc(c.cmd.Process.Pid) }

// stop ends the child: SIGTERM, then SIGKILL after stopGrace. It returns
// once the process is gone.
func (c *child) stop() {
	c.stopping.Store(true)
	select {
	case <-c.exited:
		return
	default:
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(stopGrace)
	defer t.Stop()
	select {
	case <-c.exited:
	case <-t.C:
		c.cmd.Process.Kill()
		<-c.exited
	}
}

// exitError reports a child that ended while the bench still needed it.
type exitError struct {
	name string
	err  error
	tail string
}

func (e *exitError) Error() string {
	status := "exited"
	if e.err != nil {
		status = e.err.Error()
	}
	return fmt.Sprintf("%s ended unexpectedly (%s); last lines of its log:\n%s", e.name, status, e.tail)
}

func (e *exitError) Unwrap() error { return e.err }

// exitErr describes the child's unexpected end, with its log tail.
func (c *child) exitErr() error {
	return &exitError{name: c.name, err: c.waitErr, tail: logTail(c.log, 20)}
}

// logTail returns up to the last n lines of the file at path.
func logTail(path string, n int) string {
	const maxTail = 16 << 10
	f, err := os.Open(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > maxTail {
		f.Seek(st.Size()-maxTail, io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, maxTail))
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	if len(lines) == 1 && len(lines[0]) == 0 {
		return "(log is empty)"
	}
	return string(bytes.Join(lines, []byte("\n")))
}
