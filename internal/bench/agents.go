package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/config"
)

// Agents is the many-agents case: simulated agents (real agent code, in a
// child process of their own) against a real gateway process, each with
// one TCP service, otherwise idle.
type Agents struct {
	// Agents is how many were held (fewer than asked only when
	// RLIMIT_NOFILE did not allow more; Notes says so).
	Agents int `json:"agents"`
	// Protocol is the tunnel mode they used.
	Protocol string `json:"protocol"`
	// GatewayBytesPerAgent is the gateway's RSS growth per registered
	// agent once all have been idle for the heartbeat window;
	// GatewayRSSMiB its RSS then.
	GatewayBytesPerAgent float64 `json:"gateway_bytes_per_agent"`
	GatewayRSSMiB        float64 `json:"gateway_rss_mib"`
	// RegisterPerS is agents connected and registered per second from a
	// cold start, agentStartWorkers connecting at a time.
	RegisterPerS float64 `json:"register_per_s"`
	// StormRecoverS is the time from dropping every agent's connection at
	// once (all but one witness) until every one of them is registered
	// again.
	StormRecoverS float64 `json:"storm_recover_s"`
	// StormPeakRSSMiB and StormPeakGoroutines are the gateway's highest
	// RSS and goroutine count sampled during the storm; StormDeferred is
	// how many attempts it answered with 503 and Retry-After.
	StormPeakRSSMiB     float64 `json:"storm_peak_rss_mib"`
	StormPeakGoroutines int     `json:"storm_peak_goroutines"`
	StormDeferred       int     `json:"storm_deferred"`
	// HeartbeatCPUMsPerSPer1k is the gateway's CPU time while every agent
	// is connected and idle (heartbeats, yamux's RTT pings, the garbage
	// collector), in milliseconds per second per 1,000 agents.
	HeartbeatCPUMsPerSPer1k float64 `json:"heartbeat_cpu_ms_per_s_per_1k"`
}

// DefaultAgents is how many agents the agents case simulates.
const DefaultAgents = 10000

const (
	// agentStartWorkers is how many agents connect at once in the cold
	// start.
	agentStartWorkers = 64
	// agentFDsEach is the gateway's descriptors per agent: its WebSocket
	// and its service's public listener.
	agentFDsEach = 2
	// witnessAgent is the simulated agent the storm leaves connected, with
	// a client connection through it.
	witnessAgent = "sim-00000"
	// agentsPoll is how often progress is read.
	agentsPoll = 100 * time.Millisecond
	// maxHeartbeatWindow is the longest CPU window of the idle phase: two
	// default heartbeat intervals.
	maxHeartbeatWindow = 10 * time.Second
)

// agentsName returns simulated agent i's name.
func agentsName(i int) string { return fmt.Sprintf("sim-%05d", i) }

// measureAgents runs the agents case: it starts a gateway whose agents
// come from an agents file, starts the simulator, and measures the cold
// registration, the idle memory and CPU, and a storm.
func (r *runner) measureAgents(ctx context.Context, n int, proto string) (_ *Agents, err error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	onExit := func(c *child) { cancel(c.exitErr()) }

	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	tunnelAddr, adminAddr, controlAddr := ports[0], ports[1], ports[2]
	adminToken := rand.Text()

	var agentsFile, tokens bytes.Buffer
	fmt.Fprintf(&agentsFile, "# %d simulated agents of portway bench\n", n)
	for i := range n {
		tok := rand.Text()
		sum := sha256.Sum256([]byte(tok))
		fmt.Fprintln(&agentsFile, config.FormatAgentLine(&config.AgentIdentity{Name: agentsName(i), TokenSHA256: hex.EncodeToString(sum[:])}))
		fmt.Fprintf(&tokens, "%s %s\n", agentsName(i), tok)
	}
	afPath := filepath.Join(r.dir, "agents")
	tokPath := filepath.Join(r.dir, "agents-tokens")
	if err := os.WriteFile(afPath, agentsFile.Bytes(), 0o600); err != nil {
		return nil, fmt.Errorf("agents file: %w", err)
	}
	if err := os.WriteFile(tokPath, tokens.Bytes(), 0o600); err != nil {
		return nil, fmt.Errorf("agents tokens: %w", err)
	}

	gcfg := config.DefaultGateway()
	gcfg.Listen = tunnelAddr
	gcfg.PublicHost = "127.0.0.1"
	gcfg.BindAddress = "127.0.0.1"
	gcfg.StateFile = ""
	gcfg.Insecure = true
	gcfg.AgentsFile = afPath
	// Public ports below the usual ephemeral range (32768 and up), where
	// the simulator's own connections take theirs.
	gcfg.PortRange = fmt.Sprintf("12000-%d", min(12000+n+n/10+100, 32767))
	gcfg.Admin = config.Admin{Listen: adminAddr, Token: adminToken}
	gpath, err := writeConfig(r.dir, "agents-gateway.yaml", gcfg)
	if err != nil {
		return nil, err
	}
	gw, err := startChild(r.opts.Exec, r.dir, "agents-gateway", childArgs("gateway", gpath), onExit)
	if err != nil {
		return nil, err
	}
	defer gw.stop()
	if err := waitListening(ctx, gw, tunnelAddr, adminAddr); err != nil {
		return nil, err
	}
	gm := &gatewayMetrics{addr: adminAddr, token: adminToken, client: &http.Client{Timeout: 10 * time.Second}}
	if err := sleepCtx(ctx, r.idleSettle); err != nil {
		return nil, err
	}
	gp := gw.proc()
	before, err := gp.rssKB()
	if err != nil {
		return nil, err
	}

	// Cold start.
	r.log.Info("starting simulated agents", "agents", n, "protocol", proto)
	start := time.Now()
	sim, err := startChild(r.opts.Exec, r.dir, "agents-sim", []string{"bench-agents",
		"--url", simURL(tunnelAddr), "--tokens", tokPath, "--backend", r.echo.Addr(), "--control", controlAddr,
		"--workers", strconv.Itoa(agentStartWorkers), "--protocol", proto, "--log-level", "warn"}, onExit)
	if err != nil {
		return nil, err
	}
	defer sim.stop()
	// Generous: in a storm the simulator is as busy as the gateway.
	sc := &simClient{addr: controlAddr, client: &http.Client{Timeout: 2 * time.Minute}}
	// The cold start's and the storm's timeouts are hang guards, far
	// above what is expected (the storm's goal for 10,000 agents is 60 s).
	registerTimeout := max(time.Minute, time.Duration(n)*30*time.Millisecond)
	stormTimeout := registerTimeout
	if err := waitAgents(ctx, registerTimeout, "registered", func() (bool, error) {
		st, err := sc.status(ctx)
		return err == nil && st.Ready == n, nil
	}); err != nil {
		return nil, err
	}
	registered := time.Since(start)
	if err := gm.waitServices(ctx, n); err != nil {
		return nil, err
	}
	res := &Agents{Agents: n, Protocol: proto, RegisterPerS: round(float64(n)/registered.Seconds(), 0)}
	r.log.Info("agents registered", "agents", n, "seconds", round(registered.Seconds(), 2))

	// Idle: CPU over a window of heartbeats, then memory, so that what
	// is measured is agents that have been idle for a while rather than
	// the registration's leftovers.
	window := min(max(5*r.opts.Duration, time.Second), maxHeartbeatWindow)
	cpu0, err := gp.cpuSeconds()
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	if err := sleepCtx(ctx, window); err != nil {
		return nil, err
	}
	cpu1, err := gp.cpuSeconds()
	if err != nil {
		return nil, err
	}
	res.HeartbeatCPUMsPerSPer1k = round((cpu1-cpu0)*1000/time.Since(t0).Seconds()/(float64(n)/1000), 2)
	after, err := gp.rssKB()
	if err != nil {
		return nil, err
	}
	res.GatewayRSSMiB = round(float64(after)/1024, 1)
	res.GatewayBytesPerAgent = round(float64(after-before)*1024/float64(n), 0)

	// The witness: a client connection through an agent the storm leaves
	// alone, which must still answer afterwards.
	ep, err := gm.endpoint(ctx, witnessAgent, simService)
	if err != nil {
		return nil, err
	}
	witness, err := echoOnce(ctx, ep)
	if err != nil {
		return nil, fmt.Errorf("witness connection: %w", err)
	}
	defer witness.Close()
	before0, err := gm.scrape(ctx)
	if err != nil {
		return nil, err
	}

	// The storm.
	r.log.Info("dropping every agent's connection at once", "agents", n-1)
	stormStart := time.Now()
	dropped, err := sc.drop(ctx)
	if err != nil {
		return nil, err
	}
	if dropped != n-1 {
		return nil, fmt.Errorf("storm: the simulator dropped %d connections, want %d", dropped, n-1)
	}
	peakRSS, peakG := int64(0), 0
	lastScrape := time.Time{}
	err = waitAgents(ctx, stormTimeout, "registered again after the storm", func() (bool, error) {
		if kb, err := gp.rssKB(); err == nil {
			peakRSS = max(peakRSS, kb)
		}
		// /metrics lists every agent: sampling it costs the gateway,
		// so twice a second at most.
		if time.Since(lastScrape) >= 500*time.Millisecond {
			lastScrape = time.Now()
			if m, err := gm.scrape(ctx); err == nil {
				peakG = max(peakG, int(m.goroutines))
			}
		}
		st, err := sc.status(ctx)
		return err == nil && st.Reconnected == dropped, nil
	})
	if err != nil {
		return nil, err
	}
	res.StormRecoverS = round(time.Since(stormStart).Seconds(), 2)
	if err := gm.waitServices(ctx, n); err != nil {
		return nil, err
	}
	after0, err := gm.scrape(ctx)
	if err != nil {
		return nil, err
	}
	peakG = max(peakG, int(after0.goroutines))
	if kb, err := gp.rssKB(); err == nil {
		peakRSS = max(peakRSS, kb)
	}
	res.StormPeakRSSMiB = round(float64(peakRSS)/1024, 1)
	res.StormPeakGoroutines = peakG
	res.StormDeferred = int(after0.deferred - before0.deferred)
	if after0.witnessSessions != before0.witnessSessions {
		return nil, fmt.Errorf("storm: the witness agent, never dropped, was reconnected (%v sessions, was %v)", after0.witnessSessions, before0.witnessSessions)
	}
	if err := checkAlive(ctx, []net.Conn{witness}); err != nil {
		return nil, fmt.Errorf("storm: the client connection through the witness agent: %w", err)
	}
	r.log.Info("measured", "path", "agents", "agents", n, "gateway_bytes_per_agent", res.GatewayBytesPerAgent,
		"register_per_s", res.RegisterPerS, "storm_recover_s", res.StormRecoverS,
		"heartbeat_cpu_ms_per_s_per_1k", res.HeartbeatCPUMsPerSPer1k)
	return res, nil
}

// waitAgents polls done every agentsPoll until it reports true, ctx ends or
// timeout passes (then the error says what was awaited).
func waitAgents(ctx context.Context, timeout time.Duration, what string, done func() (bool, error)) error {
	ctx, cancel := context.WithTimeoutCause(ctx, timeout, fmt.Errorf("agents not all %s within %v", what, timeout))
	defer cancel()
	t := time.NewTicker(agentsPoll)
	defer t.Stop()
	for {
		ok, err := done()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-t.C:
		}
	}
}

// simClient talks to the simulator's control API.
type simClient struct {
	addr   string
	client *http.Client
}

func (s *simClient) status(ctx context.Context) (simStatus, error) {
	var st simStatus
	err := s.do(ctx, http.MethodGet, simStatusPath, &st)
	return st, err
}

func (s *simClient) drop(ctx context.Context) (int, error) {
	var d simDrop
	err := s.do(ctx, http.MethodPost, simDropPath, &d)
	return d.Dropped, err
}

func (s *simClient) do(ctx context.Context, method, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://"+s.addr+path, nil)
	if err != nil {
		return err
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return fmt.Errorf("simulator: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("simulator: %s: HTTP %d", path, resp.StatusCode)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// gatewayMetrics reads the agents case's gateway through its admin API.
type gatewayMetrics struct {
	addr, token string
	client      *http.Client
}

// gatewaySample is what the agents case reads from /metrics.
type gatewaySample struct {
	tcpServices, goroutines, deferred, witnessSessions float64
}

func (g *gatewayMetrics) get(ctx context.Context, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+g.addr+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+g.token)
	resp, err := g.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("gateway admin API: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("gateway admin API: %s: HTTP %d", path, resp.StatusCode)
	}
	return resp, nil
}

// scrape reads the figures the case needs from the text exposition.
func (g *gatewayMetrics) scrape(ctx context.Context) (gatewaySample, error) {
	var s gatewaySample
	resp, err := g.get(ctx, "/metrics")
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	want := map[string]*float64{
		`portway_gateway_services{protocol="tcp"}`: &s.tcpServices,
		"go_goroutines": &s.goroutines,
		"portway_gateway_handshakes_deferred_total":                          &s.deferred,
		`portway_gateway_agent_sessions_total{agent="` + witnessAgent + `"}`: &s.witnessSessions,
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if p := want[name]; ok && p != nil {
			*p, _ = strconv.ParseFloat(val, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return s, fmt.Errorf("gateway metrics: %w", err)
	}
	return s, nil
}

// waitServices waits until the gateway has n TCP services open.
func (g *gatewayMetrics) waitServices(ctx context.Context, n int) error {
	return waitAgents(ctx, startupTimeout, "served by the gateway", func() (bool, error) {
		s, err := g.scrape(ctx)
		return err == nil && int(s.tcpServices) == n, nil
	})
}

// endpoint returns the public endpoint of agent's service id.
func (g *gatewayMetrics) endpoint(ctx context.Context, agent, id string) (string, error) {
	resp, err := g.get(ctx, adminapi.ServicesPath)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var list []adminapi.ServiceInfo
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&list); err != nil {
		return "", fmt.Errorf("gateway admin API: %w", err)
	}
	for _, s := range list {
		if s.Agent == agent && s.ID == id {
			return s.Endpoint, nil
		}
	}
	return "", errors.New("gateway admin API: no service " + id + " of agent " + agent)
}
