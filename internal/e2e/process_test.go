package e2e

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/childproc"
	"github.com/portway/portway/internal/testproc"
	"github.com/portway/portway/internal/testwait"
)

// The reliability tests run the gateway and the agent as real processes of
// the portway binary, so that they can be killed, partitioned and measured
// (RSS, goroutines, file descriptors) one by one.

var (
	buildOnce sync.Once
	buildDir  string
	buildPath string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// portwayBinary builds cmd/portway once per test run.
func portwayBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		buildDir, buildErr = os.MkdirTemp("", "portway-e2e-bin-")
		if buildErr != nil {
			return
		}
		buildPath = filepath.Join(buildDir, "portway")
		cmd := exec.Command("go", "build", "-o", buildPath, "./cmd/portway")
		cmd.Dir = root
		cmd.SysProcAttr = childproc.SysProcAttr()
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildPath
}

// proc is a running portway process.
type proc struct {
	*testproc.Process
	t    *testing.T
	done <-chan struct{} // closed when the process has exited
}

// startProc starts `portway <args...>` with its log in a file, and kills it
// when the test ends.
func startProc(t *testing.T, name string, env []string, args ...string) *proc {
	t.Helper()
	bin := portwayBinary(t)
	logPath := filepath.Join(t.TempDir(), name+".log")
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	// In a process group of its own, out of the terminal's, and killed with
	// the test binary even when that dies without cleaning up (a -timeout
	// panic).
	tp := testproc.Start(t, name, cmd, logPath, syscall.SIGKILL)
	p := &proc{Process: tp, t: t, done: tp.Done()}
	t.Cleanup(func() {
		p.kill()
		checkNoSecrets(t, name, p.logText())
		if t.Failed() {
			t.Logf("---- %s log ----\n%s", name, tail(p.logText(), 4000))
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *proc) kill() { p.Stop(p.t) }

func (p *proc) logText() string { return p.Log() }

// memKiB reads VmRSS and VmHWM (peak) of the process.
func (p *proc) memKiB() (rss, peak int64) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.Pid()))
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "VmRSS:":
			rss = v
		case "VmHWM:":
			peak = v
		}
	}
	return rss, peak
}

func writeConfig(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// procGateway describes a gateway process's config, so a test can restart
// it identically.
type procGateway struct {
	listen, admin, state string
	heartbeat            string
}

func newProcGateway(t *testing.T, heartbeat string) *procGateway {
	return &procGateway{
		listen:    fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		admin:     fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		state:     filepath.Join(t.TempDir(), "gateway.db"),
		heartbeat: heartbeat,
	}
}

func (g *procGateway) start(t *testing.T) *proc {
	cfg := writeConfig(t, "gateway.yaml", fmt.Sprintf(`
listen: %q
public_host: 127.0.0.1
bind_address: 127.0.0.1
state_file: %q
insecure: true
heartbeat_interval: %s
handshake_timeout: 2s
agents:
  - {name: agent-a, token: %q}
admin: {listen: %q, token: %q}
`, g.listen, g.state, g.heartbeat, tokenA, g.admin, adminToken))
	p := startProc(t, "gateway", nil, "gateway", "--config", cfg, "--log-level", "debug")
	testwait.For(t, 10*time.Second, "the gateway process to serve", func() bool {
		code, _ := httpGetQuiet("http://" + g.admin + "/readyz")
		return code == 200
	})
	return p
}

func (g *procGateway) url() string { return "ws://" + g.listen + "/v1/tunnel" }

// startAgentProc starts an agent process; url may point at a proxy.
func startAgentProc(t *testing.T, url, mode, metrics, services string, extra string) *proc {
	cfg := writeConfig(t, "agent.yaml", fmt.Sprintf(`
gateway: {url: %q, protocol: %s}
metrics: {listen: %q}
%s
services:
%s`, url, mode, metrics, extra, services))
	return startProc(t, "agent", []string{"PORTWAY_GATEWAY_TOKEN=" + tokenA}, "agent", "--config", cfg, "--log-level", "debug")
}
