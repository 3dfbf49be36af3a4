package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/tunnel"
)

// forwardHost is the second replica's loopback address: the same public
// port numbers as the first's, on an address of its own.
const forwardHost = "127.0.0.2"

// etcdBinary returns the etcd to run for the forwarded path: the one in
// $KUBEBUILDER_ASSETS (where the project's test environment puts it),
// else etcd on PATH, else "".
func etcdBinary() string {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir != "" {
		p := filepath.Join(dir, "etcd")
		if fi, err := os.Stat(p); err == nil && fi.Mode().Perm()&0o111 != 0 {
			return p
		}
	}
	if p, err := exec.LookPath("etcd"); err == nil {
		return p
	}
	return ""
}

// startForwarded starts a one-member etcd, two gateway replicas sharing
// it (the second on forwardHost) and an agent holding a session to the
// first only; the returned path's endpoints are the second replica's, so
// every connection is forwarded.
func startForwarded(ctx context.Context, ex Exec, dir, name, sink, echo string) (_ *tunnelPath, err error) {
	t := &tunnelPath{}
	t.ctx, t.cancel = context.WithCancelCause(ctx)
	defer func() {
		if err != nil {
			t.close()
		}
	}()
	onExit := func(c *child) { t.cancel(c.exitErr()) }

	eports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	client, peer := "http://"+eports[0], "http://"+eports[1]
	etcd, err := startChild(Exec{Path: etcdBinary(), Env: ex.Env}, dir, name+"-etcd", []string{
		"--name", "bench", "--data-dir", filepath.Join(dir, name+"-etcd.data"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "bench=" + peer, "--log-level", "warn",
	}, onExit)
	if err != nil {
		return nil, err
	}
	t.others = append(t.others, etcd)
	if err := waitEtcd(t.ctx, client); err != nil {
		return nil, err
	}

	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	ports2, err := freePortsOn(forwardHost, 2)
	if err != nil {
		return nil, err
	}
	agentToken, adminToken, clusterToken := rand.Text(), rand.Text(), rand.Text()
	replica := func(id, host, listen, admin string) (string, error) {
		c := config.DefaultGateway()
		c.Listen = listen
		c.PublicHost = host
		c.BindAddress = host
		c.StateFile = ""
		c.Insecure = true
		c.Agents = []config.AgentIdentity{{Name: agentName, Token: agentToken}}
		c.Admin = config.Admin{Listen: admin, Token: adminToken}
		c.Cluster = &config.Cluster{ReplicaID: id, Advertise: listen, Token: clusterToken,
			Etcd: config.ClusterEtcd{Endpoints: []string{client}, Prefix: "/bench/"}}
		return writeConfig(dir, name+"-"+id+".yaml", c)
	}
	p1, err := replica("a", "127.0.0.1", ports[0], ports[1])
	if err != nil {
		return nil, err
	}
	p2, err := replica("b", forwardHost, ports2[0], ports2[1])
	if err != nil {
		return nil, err
	}
	if t.gw, err = startChild(ex, dir, name+"-gateway-a", childArgs("gateway", p1), onExit); err != nil {
		return nil, err
	}
	gw2, err := startChild(ex, dir, name+"-gateway-b", childArgs("gateway", p2), onExit)
	if err != nil {
		return nil, err
	}
	// Stopped before etcd, after the first replica.
	t.others = append([]*child{gw2}, t.others...)

	acfg := config.DefaultAgent()
	acfg.Gateway = config.GatewayConn{URL: "ws://" + ports[0] + tunnel.Path, Token: agentToken, Protocol: "yamux"}
	acfg.Metrics.Listen = ""
	acfg.Services = []config.StaticService{staticService(sinkService, sink), staticService(echoService, echo)}
	apath, err := writeConfig(dir, name+"-agent.yaml", acfg)
	if err != nil {
		return nil, err
	}
	if t.ag, err = startChild(ex, dir, name+"-agent", childArgs("agent", apath), onExit); err != nil {
		return nil, err
	}
	eps, err := waitServices(t.ctx, ports[1], adminToken)
	if err != nil {
		return nil, err
	}
	onSecond := func(ep string) string {
		_, port, _ := net.SplitHostPort(ep)
		return net.JoinHostPort(forwardHost, port)
	}
	t.sink, t.echo = onSecond(eps[sinkService]), onSecond(eps[echoService])
	if err := waitEcho(t.ctx, t.echo); err != nil {
		return nil, fmt.Errorf("the second replica does not forward: %w", err)
	}
	// The sink's port is mirrored on its own watch event: it may open a
	// moment after the echo's.
	if err := waitOpen(t.ctx, t.sink); err != nil {
		return nil, fmt.Errorf("the second replica does not serve the sink: %w", err)
	}
	return t, nil
}

// freePortsOn is freePorts on host.
func freePortsOn(host string, n int) ([]string, error) {
	lns := make([]net.Listener, 0, n)
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	addrs := make([]string, 0, n)
	for range n {
		ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return nil, fmt.Errorf("free port on %s: %w", host, err)
		}
		lns = append(lns, ln)
		addrs = append(addrs, ln.Addr().String())
	}
	return addrs, nil
}

// waitEtcd polls etcd's /health until it answers healthy.
func waitEtcd(ctx context.Context, client string) error {
	hc := http.Client{Timeout: time.Second}
	return poll(ctx, "etcd answered healthy", func(ctx context.Context) bool {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, client+"/health", nil)
		resp, err := hc.Do(req)
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
		resp.Body.Close()
		return strings.Contains(string(b), `"health":"true"`)
	})
}

// waitOpen polls addr until it accepts a connection.
func waitOpen(ctx context.Context, addr string) error {
	return poll(ctx, addr+" accepted a connection", func(context.Context) bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

// waitEcho polls addr until a byte sent comes back: the port is served
// and forwarded.
func waitEcho(ctx context.Context, addr string) error {
	return poll(ctx, addr+" echoed", func(context.Context) bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		b := []byte{1}
		if _, err := c.Write(b); err != nil {
			return false
		}
		_, err = io.ReadFull(c, b)
		return err == nil
	})
}
