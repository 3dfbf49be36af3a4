package bench

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/tunnel"
)

// Names of the bench's agent and of the services it exposes.
const (
	agentName   = "bench"
	sinkService = "sink"
	echoService = "echo"
)

// startupTimeout bounds the wait for the agent's services to be served.
const startupTimeout = 20 * time.Second

// tunnelSpec describes a gateway and agent pair to start.
type tunnelSpec struct {
	// name prefixes the config and log files ("yamux-run1").
	name string
	// protocol is the agent's gateway.protocol: yamux or json.
	protocol string
	// sink and echo are the backends' addresses.
	sink, echo string
	// delay, when set, puts a delay stage adding this much each way
	// between the agent and the gateway's WebSocket endpoint.
	delay time.Duration
	// maxConns is the agent's tunnels.tcp.max_connections.
	maxConns int
	// tls, when set, serves the tunnel endpoint over TLS with this
	// certificate (wss://), which the agent trusts.
	tls *benchCert
}

// tunnelPath is a running gateway and agent with the backends exposed
// through them. Its ctx ends, with the child's exit as the cause, when
// either process dies.
type tunnelPath struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	gw, ag *child
	// others are more children, stopped after the gateway: a second
	// replica and etcd (forwarded.go).
	others []*child
	delay  *tcpServer
	// sink and echo are the public endpoints on the gateway.
	sink, echo string
}

// startTunnel starts the gateway and the agent as children of ex in dir,
// and returns once both services are served on public ports.
func startTunnel(ctx context.Context, ex Exec, dir string, spec tunnelSpec) (_ *tunnelPath, err error) {
	t := &tunnelPath{}
	t.ctx, t.cancel = context.WithCancelCause(ctx)
	defer func() {
		if err != nil {
			t.close()
		}
	}()
	onExit := func(c *child) { t.cancel(c.exitErr()) }

	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	tunnelAddr, adminAddr := ports[0], ports[1]
	agentToken, adminToken := rand.Text(), rand.Text()

	gcfg := config.DefaultGateway()
	gcfg.Listen = tunnelAddr
	gcfg.PublicHost = "127.0.0.1"
	gcfg.BindAddress = "127.0.0.1"
	gcfg.StateFile = "" // allocations in memory only
	gcfg.Insecure = spec.tls == nil
	if spec.tls != nil {
		gcfg.TLS = &config.TLS{CertFile: spec.tls.certFile, KeyFile: spec.tls.keyFile}
	}
	gcfg.Agents = []config.AgentIdentity{{Name: agentName, Token: agentToken}}
	gcfg.Admin = config.Admin{Listen: adminAddr, Token: adminToken}
	gpath, err := writeConfig(dir, spec.name+"-gateway.yaml", gcfg)
	if err != nil {
		return nil, err
	}
	if t.gw, err = startChild(ex, dir, spec.name+"-gateway", childArgs("gateway", gpath), onExit); err != nil {
		return nil, err
	}

	agentDial := tunnelAddr
	if spec.delay > 0 {
		if t.delay, err = startDelay(tunnelAddr, spec.delay); err != nil {
			return nil, fmt.Errorf("delay stage: %w", err)
		}
		agentDial = t.delay.Addr()
	}
	acfg := config.DefaultAgent()
	acfg.Gateway = config.GatewayConn{URL: "ws://" + agentDial + tunnel.Path, Token: agentToken, Protocol: spec.protocol}
	if spec.tls != nil {
		acfg.Gateway.URL = "wss://" + agentDial + tunnel.Path
		acfg.Gateway.CAFile = spec.tls.certFile
	}
	acfg.Metrics.Listen = "" // no metrics server: nothing the bench needs
	acfg.Tunnels.TCP.MaxConnections = max(acfg.Tunnels.TCP.MaxConnections, spec.maxConns)
	acfg.Services = []config.StaticService{
		staticService(sinkService, spec.sink),
		staticService(echoService, spec.echo),
	}
	apath, err := writeConfig(dir, spec.name+"-agent.yaml", acfg)
	if err != nil {
		return nil, err
	}
	if t.ag, err = startChild(ex, dir, spec.name+"-agent", childArgs("agent", apath), onExit); err != nil {
		return nil, err
	}

	eps, err := waitServices(t.ctx, adminAddr, adminToken)
	if err != nil {
		return nil, err
	}
	t.sink, t.echo = eps[sinkService], eps[echoService]
	return t, nil
}

// childArgs runs a gateway or agent from a config file, logging only
// warnings and errors: the bench reads the log only when a child fails.
func childArgs(cmd, configPath string) []string {
	return []string{cmd, "--config", configPath, "--log-level", "warn"}
}

func staticService(name, backend string) config.StaticService {
	_, p, _ := net.SplitHostPort(backend)
	var port int
	fmt.Sscan(p, &port)
	return config.StaticService{Name: name, Protocol: "tcp", Port: port, Backend: backend}
}

// writeConfig writes cfg as a config file. YAML is a superset of JSON, and
// the config types carry the YAML keys as JSON tags, so renaming a key
// breaks the bench at compile time rather than at run time.
func writeConfig(dir, name string, cfg any) (string, error) {
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	return path, nil
}

// freePorts returns n distinct free loopback addresses. They are free when
// returned; a process could take one before the child binds it, which on
// a bench machine is rare enough to report as an error rather than retry.
func freePorts(n int) ([]string, error) { return freePortsOn("127.0.0.1", n) }

// waitServices polls the gateway's admin API until both services have a
// public endpoint.
func waitServices(ctx context.Context, adminAddr, token string) (map[string]string, error) {
	client := http.Client{Timeout: 2 * time.Second}
	var eps map[string]string
	err := poll(ctx, "the agent's services were served", func(ctx context.Context) bool {
		var err error
		eps, err = services(ctx, &client, adminAddr, token)
		return err == nil && eps[sinkService] != "" && eps[echoService] != ""
	})
	return eps, err
}

// poll calls done every 20 ms until it reports true, or fails with an
// error saying that what did not happen within startupTimeout.
func poll(ctx context.Context, what string, done func(context.Context) bool) error {
	ctx, cancel := context.WithTimeoutCause(ctx, startupTimeout, fmt.Errorf("not within %v: %s", startupTimeout, what))
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if done(ctx) {
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-tick.C:
		}
	}
}

// services returns the bench agent's endpoints by service name.
func services(ctx context.Context, client *http.Client, adminAddr, token string) (map[string]string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+adminAddr+adminapi.ServicesPath, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Close = true // keep no idle connection to a gateway about to be stopped
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("admin API: HTTP %d", resp.StatusCode)
	}
	var list []adminapi.ServiceInfo
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		return nil, fmt.Errorf("admin API: %w", err)
	}
	eps := map[string]string{}
	for _, s := range list {
		if s.Agent == agentName && s.Protocol == "tcp" {
			eps[s.ID] = s.Endpoint
		}
	}
	return eps, nil
}

// procs returns the gateway and the agent, in that order.
func (t *tunnelPath) procs() []proc { return []proc{t.gw.proc(), t.ag.proc()} }

// failed returns the child's exit when a child died, else nil.
func (t *tunnelPath) failed() error {
	var ee *exitError
	if err := context.Cause(t.ctx); errors.As(err, &ee) {
		return err
	}
	return nil
}

// reapGrace is how long a failed measurement waits to learn whether a
// child died: the reset a client sees often arrives before the bench has
// reaped the dead child.
const reapGrace = time.Second

// explain returns the death of a child, with its log, in place of err when
// a child has died or dies within reapGrace: that explains err. Otherwise
// it returns err.
func (t *tunnelPath) explain(err error) error {
	if err == nil {
		return nil
	}
	timer := time.NewTimer(reapGrace)
	defer timer.Stop()
	select {
	case <-t.ctx.Done():
	case <-timer.C:
	}
	if ferr := t.failed(); ferr != nil {
		return ferr
	}
	return err
}

// close stops the agent, then the gateway, then the delay stage.
func (t *tunnelPath) close() {
	if t.ag != nil {
		t.ag.stop()
	}
	if t.gw != nil {
		t.gw.stop()
	}
	for _, c := range t.others {
		c.stop()
	}
	if t.delay != nil {
		t.delay.Close()
	}
	t.cancel(nil)
}
