package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/tunnel"
)

// The agents case's simulator is a child process (`portway bench-agents`)
// that runs many real agents (internal/agent, so the real tunnel code,
// backoff and Retry-After handling) in one process, each with its own
// identity and one TCP service. The bench drives it over a small HTTP API
// on loopback:
//
//	GET  /status  simStatus
//	POST /drop    closes every agent's connection at once except the
//	              first agent's (the witness), and answers simDrop
const (
	simStatusPath = "/status"
	simDropPath   = "/drop"
	// simService is the one service every simulated agent exposes.
	simService = "svc"
)

// SimOptions configure ServeAgents.
type SimOptions struct {
	// URL is the gateway's tunnel endpoint.
	URL string
	// Tokens is a file of "name token" lines, one simulated agent each.
	Tokens string
	// Backend is the address every agent's service forwards to.
	Backend string
	// Control is where the simulator's HTTP API listens.
	Control string
	// StartWorkers bounds the agents connecting for the first time at
	// once: the initial registration is measured at this concurrency;
	// the storm is not bounded.
	StartWorkers int
	// Protocol is yamux or json.
	Protocol string
}

// simStatus is the simulator's progress.
type simStatus struct {
	Agents int `json:"agents"`
	// Started is how many agents have been started (first connection
	// attempted or done).
	Started int `json:"started"`
	// Ready is how many agents have a live session whose registration was
	// acknowledged.
	Ready int `json:"ready"`
	// Reconnected is how many agents dropped by the last /drop are ready
	// again on a newer connection.
	Reconnected int `json:"reconnected"`
	// Dropped is how many agents the last /drop disconnected.
	Dropped int `json:"dropped"`
	// Dials counts connection attempts to the gateway, all agents.
	Dials int64 `json:"dials"`
}

// simAgent is one simulated agent: a real agent.Agent whose connection to
// the gateway the simulator can close.
type simAgent struct {
	a *agent.Agent
	// gen counts the connections made; dropGen is gen at the last drop.
	gen     atomic.Int64
	dropGen atomic.Int64
	dropped atomic.Bool
	first   chan struct{} // closed at the first register_ack
	once    sync.Once

	mu   sync.Mutex
	conn net.Conn
}

// simulator holds the simulated agents.
type simulator struct {
	agents  []*simAgent
	started atomic.Int64
	dials   atomic.Int64
	dropMu  sync.Mutex
}

// ServeAgents runs the simulator until ctx ends.
func ServeAgents(ctx context.Context, o SimOptions) error {
	creds, err := readSimTokens(o.Tokens)
	if err != nil {
		return fmt.Errorf("bench-agents: %w", err)
	}
	// Ten thousand agents in one process is not how agents run: each
	// normally has a cluster to itself. Collecting less often keeps the
	// simulator's garbage collector from starving its agents of CPU (and
	// their heartbeats of time) on a small machine; memory is what it
	// trades, and the simulator's memory is not measured.
	debug.SetGCPercent(400)
	s := &simulator{}
	for _, c := range creds {
		sa, err := s.newAgent(o, c[0], c[1])
		if err != nil {
			return fmt.Errorf("bench-agents: agent %s: %w", c[0], err)
		}
		s.agents = append(s.agents, sa)
	}
	ln, err := net.Listen("tcp", o.Control)
	if err != nil {
		return fmt.Errorf("bench-agents: control: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc(simStatusPath, func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(s.status())
	})
	mux.HandleFunc(simDropPath, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		json.NewEncoder(w).Encode(simDrop{Dropped: s.drop()})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	defer srv.Close()

	var wg sync.WaitGroup
	defer wg.Wait()
	// The first connections, StartWorkers at a time: a worker starts an
	// agent and waits for its first register_ack before the next.
	jobs := make(chan *simAgent)
	for range max(o.StartWorkers, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sa := range jobs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					sa.a.Run(ctx)
				}()
				s.started.Add(1)
				select {
				case <-sa.first:
				case <-ctx.Done():
				}
			}
		}()
	}
	for _, sa := range s.agents {
		select {
		case jobs <- sa:
		case <-ctx.Done():
		}
	}
	close(jobs)
	<-ctx.Done()
	return nil
}

func (s *simulator) newAgent(o SimOptions, name, token string) (*simAgent, error) {
	sa := &simAgent{first: make(chan struct{})}
	cfg := config.DefaultAgent()
	cfg.Gateway = config.GatewayConn{URL: o.URL, Token: token, Protocol: o.Protocol}
	cfg.Metrics.Listen = ""
	cfg.Services = []config.StaticService{staticService(simService, o.Backend)}
	a, err := agent.New(agent.Options{
		Config: cfg,
		Logger: slog.New(slog.DiscardHandler),
		// Metrics are created but registered nowhere: nobody scrapes a
		// simulated agent, and a registry each is weight.
		Registry: discardRegisterer{},
		OnEndpoints: func([]agent.Endpoint) {
			sa.once.Do(func() { close(sa.first) })
		},
		NetDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			s.dials.Add(1)
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			sa.mu.Lock()
			sa.conn = c
			sa.mu.Unlock()
			sa.gen.Add(1)
			return c, nil
		},
	})
	if err != nil {
		return nil, err
	}
	sa.a = a
	_ = name // the gateway knows the agent by its token
	return sa, nil
}

// discardRegisterer registers nothing.
type discardRegisterer struct{}

func (discardRegisterer) Register(prometheus.Collector) error  { return nil }
func (discardRegisterer) MustRegister(...prometheus.Collector) {}
func (discardRegisterer) Unregister(prometheus.Collector) bool { return true }

// simDrop is /drop's answer.
type simDrop struct {
	Dropped int `json:"dropped"`
}

// drop closes every agent's connection but the first agent's, all at once:
// the connections are collected first and closed back to back.
func (s *simulator) drop() int {
	s.dropMu.Lock()
	defer s.dropMu.Unlock()
	var conns []net.Conn
	for i, sa := range s.agents {
		if i == 0 {
			continue // the witness stays connected
		}
		sa.mu.Lock()
		c := sa.conn
		sa.conn = nil
		sa.mu.Unlock()
		sa.dropped.Store(c != nil)
		sa.dropGen.Store(sa.gen.Load())
		if c != nil {
			conns = append(conns, c)
		}
	}
	for _, c := range conns {
		c.Close()
	}
	return len(conns)
}

func (s *simulator) status() simStatus {
	st := simStatus{Agents: len(s.agents), Started: int(s.started.Load()), Dials: s.dials.Load()}
	for _, sa := range s.agents {
		ready := sa.a.Ready()
		if ready {
			st.Ready++
		}
		if sa.dropped.Load() {
			st.Dropped++
			if ready && sa.gen.Load() > sa.dropGen.Load() {
				st.Reconnected++
			}
		}
	}
	return st
}

// readSimTokens reads "name token" lines.
func readSimTokens(path string) ([][2]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out [][2]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, tok, ok := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		if !ok {
			continue
		}
		out = append(out, [2]string{name, tok})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, errors.New("no agents in " + path)
	}
	return out, nil
}

// simURL is the gateway's tunnel URL for the simulator.
func simURL(tunnelAddr string) string { return "ws://" + tunnelAddr + tunnel.Path }
