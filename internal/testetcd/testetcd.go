//go:build linux

// Package testetcd runs a real etcd cluster for tests: three members on
// loopback, started from the etcd binary that scripts/k8s-test-env.sh
// builds (KUBEBUILDER_ASSETS names its folder), healthy in about a second.
// A test may kill and restart single members to take quorum away and give
// it back. Every member is stopped, and its data removed, when the test
// ends. For tests only.
//
// When KUBEBUILDER_ASSETS is not set the test is skipped, unless the
// environment variable CI is set: then it fails, so that CI cannot pass
// with these tests silently skipped.
package testetcd

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/portway/portway/internal/testproc"
)

// startTimeout is a hang guard for a member (or the cluster) to become
// healthy, not a performance bound.
const startTimeout = 30 * time.Second

// Cluster is a running etcd cluster.
type Cluster struct {
	t       testing.TB
	bin     string
	dir     string
	members []*member
}

type member struct {
	name       string
	client     string // http://127.0.0.1:port
	peer       string
	dataDir    string
	logPath    string
	proc       *testproc.Process
	initialArg string
}

// Start starts a 3-member cluster and waits until every member is healthy.
func Start(t testing.TB) *Cluster {
	t.Helper()
	return StartN(t, 3)
}

// StartN starts an n-member cluster and waits until every member is
// healthy.
func StartN(t testing.TB, n int) *Cluster {
	t.Helper()
	c := &Cluster{t: t, bin: binary(t), dir: t.TempDir()}
	ports := freePorts(t, 2*n)
	var initial []string
	for i := range n {
		m := &member{
			name:   fmt.Sprintf("e%d", i+1),
			client: fmt.Sprintf("http://127.0.0.1:%d", ports[2*i]),
			peer:   fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
		}
		m.dataDir = filepath.Join(c.dir, m.name)
		m.logPath = filepath.Join(c.dir, m.name+".log")
		initial = append(initial, m.name+"="+m.peer)
		c.members = append(c.members, m)
	}
	for _, m := range c.members {
		m.initialArg = strings.Join(initial, ",")
		c.start(m)
	}
	for i := range c.members {
		c.WaitHealthy(i)
	}
	return c
}

// binary returns the etcd binary from KUBEBUILDER_ASSETS.
func binary(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	msg := ""
	if dir == "" {
		msg = "testetcd: KUBEBUILDER_ASSETS is not set; run: export KUBEBUILDER_ASSETS=\"$(scripts/k8s-test-env.sh)\""
	} else if fi, err := os.Stat(filepath.Join(dir, "etcd")); err != nil || fi.Mode().Perm()&0o111 == 0 {
		msg = fmt.Sprintf("testetcd: KUBEBUILDER_ASSETS=%s has no executable etcd; run scripts/k8s-test-env.sh", dir)
	}
	if msg != "" {
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return filepath.Join(dir, "etcd")
}

// freePorts returns n loopback ports that were free a moment ago.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("testetcd: %v", err)
		}
		lns = append(lns, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

func (c *Cluster) start(m *member) {
	c.t.Helper()
	cmd := exec.Command(c.bin,
		"--name", m.name, "--data-dir", m.dataDir,
		"--listen-client-urls", m.client, "--advertise-client-urls", m.client,
		"--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer,
		"--initial-cluster", m.initialArg, "--initial-cluster-state", "new",
		"--initial-cluster-token", "portway-test",
		"--log-level", "warn",
		// Short ticks: a lost leader is noticed, and a new one elected,
		// quickly.
		"--heartbeat-interval", "50", "--election-timeout", "500",
	)
	m.proc = testproc.Start(c.t, "etcd "+m.name, cmd, m.logPath, syscall.SIGTERM)
}

// Endpoints returns every member's client URL.
func (c *Cluster) Endpoints() []string {
	out := make([]string, len(c.members))
	for i, m := range c.members {
		out[i] = m.client
	}
	return out
}

// Endpoint returns member i's client URL.
func (c *Cluster) Endpoint(i int) string { return c.members[i].client }

// Kill ends member i with SIGKILL and waits until it is gone.
func (c *Cluster) Kill(i int) {
	c.t.Helper()
	m := c.members[i]
	if err := m.proc.Signal(syscall.SIGKILL); err != nil {
		c.t.Fatalf("testetcd: kill %s: %v", m.name, err)
	}
	select {
	case <-m.proc.Done():
	case <-time.After(startTimeout):
		c.t.Fatalf("testetcd: %s still running after SIGKILL", m.name)
	}
}

// Restart starts member i again on its data directory, after Kill, and
// waits until it is healthy (which needs a quorum).
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	c.start(c.members[i])
}

// Healthy reports whether member i answers /health with a leader.
func (c *Cluster) Healthy(i int) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.members[i].client+"/health", nil)
	if err != nil {
		return false
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return strings.Contains(string(b), `"health":"true"`)
}

// WaitHealthy waits until member i is healthy, failing the test after a
// generous hang guard.
func (c *Cluster) WaitHealthy(i int) {
	c.t.Helper()
	deadline := time.Now().Add(startTimeout)
	for !c.Healthy(i) {
		m := c.members[i]
		if m.proc.Exited() {
			c.t.Fatalf("testetcd: %s exited: %v\n%s", m.name, m.proc.Err(), m.proc.LogTail())
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("testetcd: %s not healthy after %v\n%s", m.name, startTimeout, m.proc.LogTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Client connects to endpoints (one member's, or several) and closes the
// client when the test ends.
func Client(t testing.TB, endpoints ...string) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
