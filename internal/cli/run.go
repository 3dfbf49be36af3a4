package cli

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/gateway"
	"github.com/portway/portway/internal/store"
)

func (a *app) gatewayCmd() *cobra.Command {
	var path string
	var listen, publicHost, portRange, bind, stateFile, adminListen string
	var insecure bool
	var watch time.Duration
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "Run the gateway: accept agents and serve their services on public ports",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := a.logger()
			if err != nil {
				return err
			}
			f := cmd.Flags()
			// load reads the file and applies the flags: at start and
			// again on every reload, so flags keep winning.
			// Flags override the file before it is validated, so that a
			// flag can supply what the file lacks (--insecure for no tls:).
			flags := func(cfg *config.GatewayFile) {
				setString(f.Changed("listen"), &cfg.Listen, listen)
				setString(f.Changed("public-host"), &cfg.PublicHost, publicHost)
				setString(f.Changed("port-range"), &cfg.PortRange, portRange)
				setString(f.Changed("bind-address"), &cfg.BindAddress, bind)
				setString(f.Changed("state-file"), &cfg.StateFile, stateFile)
				setString(f.Changed("admin-listen"), &cfg.Admin.Listen, adminListen)
				if f.Changed("insecure") {
					cfg.Insecure = insecure
				}
			}
			load := func() (*config.GatewayFile, error) {
				if path != "" {
					return config.LoadGatewayWith(path, a.getenv, flags)
				}
				cfg := config.DefaultGateway()
				flags(cfg)
				if err := cfg.Validate(); err != nil {
					return nil, err
				}
				return cfg, nil
			}
			cfg, err := load()
			if err != nil {
				return err
			}
			if cfg.StateFile != "" && cfg.Cluster == nil { // with a cluster: block, etcd holds them
				// A gateway that cannot persist its allocations would lose
				// "same port after restart" silently: refuse to start.
				if err := (&store.File{Path: cfg.StateFile}).CheckWritable(); err != nil {
					return fmt.Errorf("state_file: %s: %w (make the directory writable by this user, e.g. StateDirectory= in a systemd unit, or set state_file)", cfg.StateFile, err)
				}
			}
			a.applyLogLevel(cfg.LogLevel, f.Changed("log-level"))
			if len(cfg.AllAgents()) == 0 {
				log.Warn("no agents configured: every tunnel connection will be refused")
			}
			reg := registry()
			gw, err := gateway.New(gateway.Options{Config: cfg, Logger: log, Registry: reg, Gatherer: reg, Version: a.version})
			if err != nil {
				return err
			}
			if err := gw.Start(cmd.Context()); err != nil {
				return err
			}
			defer gw.Close()
			cur := cfg
			files := func() []string {
				var out []string
				if path != "" {
					out = append(out, path)
				}
				if cur.TLS != nil {
					out = append(out, cur.TLS.CertFile, cur.TLS.KeyFile)
				}
				if cur.AgentsFile != "" {
					out = append(out, cur.AgentsFile)
				}
				return out
			}
			reloadLoop(cmd.Context(), log, watch, files, func(reason string) {
				next, err := load()
				if err == nil {
					_, err = gw.Reload(next)
				}
				if err != nil {
					log.Error("reload failed; configuration unchanged", "trigger", reason, "err", oneLine(err))
					return
				}
				cur = next
				a.applyLogLevel(next.LogLevel, f.Changed("log-level"))
				log.Info("reload done", "trigger", reason)
			})
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&path, "config", "", "gateway.yaml")
	f.StringVar(&listen, "listen", "", "where agents connect (listen)")
	f.StringVar(&publicHost, "public-host", "", "host printed in endpoints (public_host)")
	f.StringVar(&portRange, "port-range", "", "public ports to allocate, low-high (port_range)")
	f.StringVar(&bind, "bind-address", "", "where public listeners bind (bind_address)")
	f.StringVar(&stateFile, "state-file", "", "persisted port allocations (state_file)")
	f.StringVar(&adminListen, "admin-listen", "", "admin API address (admin.listen)")
	f.BoolVar(&insecure, "insecure", false, "allow plain ws:// without TLS (insecure)")
	f.DurationVar(&watch, "watch-interval", defaultWatchInterval, "how often to check the config and TLS files for a change to reload (0: only on SIGHUP)")
	return cmd
}

func setString(changed bool, dst *string, v string) {
	if changed {
		*dst = v
	}
}

func (a *app) agentCmd() *cobra.Command {
	var path, gwURL, token, proto, metricsListen string
	var expose []string
	var insecure, exitOnAuth bool
	var watch time.Duration
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the agent: connect out to the gateway and expose services",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := a.logger()
			if err != nil {
				return err
			}
			f := cmd.Flags()
			// load reads the file and applies the flags: at start and
			// again on every reload.
			var exposed []config.StaticService
			for _, e := range expose {
				s, err := parseExpose(e)
				if err != nil {
					return err
				}
				exposed = append(exposed, s)
			}
			// Flags override the file before it is validated, so that a
			// flag can supply what the file lacks (--token).
			flags := func(cfg *config.AgentFile) {
				setString(f.Changed("gateway-url"), &cfg.Gateway.URL, gwURL)
				setString(f.Changed("token"), &cfg.Gateway.Token, token)
				setString(f.Changed("protocol"), &cfg.Gateway.Protocol, proto)
				setString(f.Changed("metrics-listen"), &cfg.Metrics.Listen, metricsListen)
				if f.Changed("insecure") {
					cfg.Gateway.Insecure = insecure
				}
				cfg.Services = append(cfg.Services, exposed...)
			}
			load := func() (*config.AgentFile, error) {
				if path != "" {
					return config.LoadAgentWith(path, a.getenv, flags)
				}
				cfg := config.DefaultAgent()
				cfg.ApplyEnv(a.getenv)
				flags(cfg)
				if err := cfg.Validate(); err != nil {
					return nil, err
				}
				return cfg, nil
			}
			cfg, err := load()
			if err != nil {
				return err
			}
			a.applyLogLevel(cfg.LogLevel, f.Changed("log-level"))
			reg := registry()
			// The reload loop ends with the agent: cancel, then wait.
			var wg sync.WaitGroup
			defer wg.Wait()
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			start := cfg
			onAgent := func(ag *agent.Agent) {
				files := func() []string {
					if path == "" {
						return nil
					}
					return []string{path}
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					reloadLoop(ctx, log, watch, files, func(reason string) {
						next, err := load()
						if err != nil {
							log.Error("reload failed; configuration unchanged", "trigger", reason, "err", oneLine(err))
							return
						}
						if keys := agentRestartKeys(start, next); len(keys) > 0 {
							log.Warn("configuration changes that need a restart were ignored", "keys", keys)
						}
						ag.SetStatic(next.Services)
						a.applyLogLevel(next.LogLevel, f.Changed("log-level"))
						log.Info("reload done", "trigger", reason, "services", len(next.Services))
					})
				}()
			}
			return runAgentWith(ctx, agent.Options{Config: cfg, Logger: log, Registry: reg, Gatherer: reg, Version: a.version, ExitOnAuthFailure: exitOnAuth}, a.getenv, onAgent)
		},
	}
	f := cmd.Flags()
	f.StringVar(&path, "config", "", "agent.yaml")
	f.StringVar(&gwURL, "gateway-url", "", "gateway tunnel URL, wss://host:port/v1/tunnel (gateway.url)")
	f.StringVar(&token, "token", "", "agent token (gateway.token; prefer PORTWAY_GATEWAY_TOKEN)")
	f.StringVar(&proto, "protocol", "", "auto, yamux or json (gateway.protocol)")
	f.StringVar(&metricsListen, "metrics-listen", "", "metrics/health address (metrics.listen)")
	f.BoolVar(&insecure, "insecure", false, "allow plain ws:// to a gateway other than loopback, token in clear (gateway.insecure)")
	f.StringArrayVar(&expose, "expose", nil, "expose a service: NAME=tcp://HOST:PORT or NAME=udp://HOST:PORT (repeatable)")
	f.BoolVar(&exitOnAuth, "exit-on-auth-failure", false, fmt.Sprintf("exit with status %d when the gateway rejects the token, instead of retrying", agent.AuthExitCode))
	f.DurationVar(&watch, "watch-interval", defaultWatchInterval, "how often to check the config file for a change to reload (0: only on SIGHUP)")
	return cmd
}

// parseExpose parses NAME=tcp://HOST:PORT into a static service. The
// backend's port is the port the service is known by.
func parseExpose(s string) (config.StaticService, error) {
	name, target, ok := strings.Cut(s, "=")
	if !ok || name == "" {
		return config.StaticService{}, fmt.Errorf("--expose %q: want NAME=tcp://HOST:PORT", s)
	}
	u, err := url.Parse(target)
	if err != nil || (u.Scheme != "tcp" && u.Scheme != "udp") || u.Host == "" {
		return config.StaticService{}, fmt.Errorf("--expose %q: want NAME=tcp://HOST:PORT or NAME=udp://HOST:PORT", s)
	}
	_, p, err := net.SplitHostPort(u.Host)
	port, perr := strconv.Atoi(p)
	if err != nil || perr != nil || port < 1 || port > 65535 {
		return config.StaticService{}, fmt.Errorf("--expose %q: %q is not HOST:PORT", s, u.Host)
	}
	return config.StaticService{Name: name, Protocol: u.Scheme, Port: port, Backend: u.Host}, nil
}

// agentRestartKeys lists the agent's config sections that changed but
// apply only at start: the connection to the gateway, the metrics server,
// Kubernetes discovery and the tunnels: limits.
func agentRestartKeys(old, cur *config.AgentFile) []string {
	var keys []string
	for _, c := range []struct {
		key      string
		old, cur any
	}{
		{"gateway", old.Gateway, cur.Gateway},
		{"metrics", old.Metrics, cur.Metrics},
		{"kubernetes", old.Kubernetes, cur.Kubernetes},
		{"tunnels", old.Tunnels, cur.Tunnels},
	} {
		if !reflect.DeepEqual(c.old, c.cur) {
			keys = append(keys, c.key)
		}
	}
	return keys
}
