package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/gateway"
	"github.com/portway/portway/internal/quickstart"
	"github.com/portway/portway/internal/tunnel"
)

func (a *app) upCmd() *cobra.Command {
	var expose []string
	var proto, portRange, adminListen string
	var noEcho bool
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Quick start: a gateway, an agent and an echo backend in one process on loopback",
		Long: `up runs a gateway and an agent in one process on 127.0.0.1, connected
through a real WebSocket tunnel, and exposes a built-in TCP echo server
plus every --expose you give. It prints the public endpoints with
ready-to-paste client commands and runs until Ctrl-C.`,
		Example: `  portway up
  portway up --expose redis=tcp://127.0.0.1:6379 --expose dns=udp://127.0.0.1:53`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := a.logger()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			var services []config.StaticService
			if !noEcho {
				echo, err := quickstart.StartEcho(ctx, "127.0.0.1:0")
				if err != nil {
					return err
				}
				// Known by port 7, the echo protocol's: public port 10007.
				services = append(services, config.StaticService{Name: "echo", Protocol: "tcp", Port: 7, Backend: echo.String()})
			}
			for _, e := range expose {
				s, err := parseExpose(e)
				if err != nil {
					return err
				}
				services = append(services, s)
			}
			if len(services) == 0 {
				return fmt.Errorf("nothing to expose: drop --no-echo or add --expose")
			}
			return a.runUp(ctx, log, services, proto, portRange, adminListen)
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&expose, "expose", nil, "also expose NAME=tcp://HOST:PORT or NAME=udp://HOST:PORT (repeatable)")
	f.StringVar(&proto, "protocol", "auto", "tunnel protocol: auto, yamux or json")
	f.StringVar(&portRange, "port-range", "10000-19999", "public ports to allocate")
	f.StringVar(&adminListen, "admin-listen", "127.0.0.1:0", "admin API address, for portway status")
	f.BoolVar(&noEcho, "no-echo", false, "do not start the built-in echo backend")
	return cmd
}

func (a *app) runUp(ctx context.Context, log *slog.Logger, services []config.StaticService, proto, portRange, adminListen string) error {
	token := randomToken()
	adminToken := randomToken()
	gcfg := config.DefaultGateway()
	gcfg.Listen = "127.0.0.1:0"
	gcfg.PublicHost = "127.0.0.1"
	gcfg.BindAddress = "127.0.0.1"
	gcfg.PortRange = portRange
	gcfg.StateFile = ""
	gcfg.Insecure = true
	gcfg.Agents = []config.AgentIdentity{{Name: "local", Token: token}}
	gcfg.Admin = config.Admin{Listen: adminListen, Token: adminToken}
	gw, err := gateway.New(gateway.Options{Config: gcfg, Logger: log.With("part", "gateway"), Version: a.version})
	if err != nil {
		return err
	}
	if err := gw.Start(ctx); err != nil {
		return err
	}
	defer gw.Close()

	acfg := config.DefaultAgent()
	acfg.Gateway = config.GatewayConn{URL: "ws://" + gw.TunnelAddr().String() + tunnel.Path, Token: token, Protocol: proto}
	acfg.Metrics.Listen = ""
	acfg.Services = services
	ready := make(chan []agent.Endpoint, 1)
	ag, err := agent.New(agent.Options{
		Config: acfg, Logger: log.With("part", "agent"), Version: a.version,
		OnEndpoints: func(eps []agent.Endpoint) {
			select {
			case ready <- eps:
			default:
			}
		},
	})
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- ag.Run(ctx) }()

	select {
	case eps := <-ready:
		a.printUp(eps, gw, adminToken)
	case <-time.After(15 * time.Second):
		return fmt.Errorf("the agent did not register within 15s; see the log above")
	case <-ctx.Done():
		return nil
	}
	<-ctx.Done()
	fmt.Fprintln(a.stdout, "\nshutting down")
	return <-done
}

func (a *app) printUp(eps []agent.Endpoint, gw *gateway.Gateway, adminToken string) {
	w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(a.stdout, "portway is up: gateway and agent on loopback, tunnel over a WebSocket.")
	fmt.Fprintln(a.stdout)
	fmt.Fprintln(w, "SERVICE\tPROTO\tBACKEND\tPUBLIC ENDPOINT\tTRY")
	for _, e := range eps {
		try := agent.ClientCommand(e.Service.Protocol, e.Service.Port, e.Address)
		if e.Service.ID == "echo" {
			host, port, _ := net.SplitHostPort(e.Address)
			// bash's /dev/tcp needs nothing installed, unlike nc.
			try = fmt.Sprintf("bash -c 'exec 3<>/dev/tcp/%s/%s; echo hello >&3; head -1 <&3'", host, port)
		}
		addr := e.Address
		if e.Error != "" {
			addr, try = "-", "not exposed: "+e.Error
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", e.Service.ID, e.Service.Protocol, e.Service.Backend, addr, try)
	}
	w.Flush()
	if ad := gw.AdminAddr(); ad != nil {
		fmt.Fprintf(a.stdout, "\nstatus: portway status --gateway http://%s --token %s\n", ad, adminToken)
	}
	fmt.Fprintln(a.stdout, "Press Ctrl-C to stop.")
}

func randomToken() string {
	b := make([]byte, 24)
	rand.Read(b)
	return strings.ToLower(hex.EncodeToString(b))
}
