package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/portway/portway/internal/adminapi"
)

func (a *app) statusCmd() *cobra.Command {
	var gwURL, token, output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a gateway's agents, services and endpoints (from its admin API)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if token == "" {
				token = a.getenv("PORTWAY_ADMIN_TOKEN")
			}
			if output != "table" && output != "json" {
				return fmt.Errorf("-o: %q is not table or json", output)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
			defer cancel()
			var agents []adminapi.AgentInfo
			var services []adminapi.ServiceInfo
			if err := adminGet(ctx, gwURL, adminapi.AgentsPath, token, &agents); err != nil {
				return err
			}
			if err := adminGet(ctx, gwURL, adminapi.ServicesPath, token, &services); err != nil {
				return err
			}
			// A gateway that is not a forwarding replica (or is older)
			// answers 404: there is no cluster to show.
			var ci *adminapi.ClusterInfo
			var c adminapi.ClusterInfo
			if err := adminGet(ctx, gwURL, adminapi.ClusterPath, token, &c); err == nil {
				ci = &c
			} else if !errors.Is(err, errNotFound) {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(a.stdout)
				enc.SetIndent("", "  ")
				out := map[string]any{"agents": agents, "services": services}
				if ci != nil {
					out["cluster"] = ci
				}
				return enc.Encode(out)
			}
			writeStatus(a.stdout, agents, services)
			if ci != nil {
				writeCluster(a.stdout, ci)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&gwURL, "gateway", "http://127.0.0.1:9000", "the gateway's admin URL (admin.listen)")
	f.StringVar(&token, "token", "", "admin token (default $PORTWAY_ADMIN_TOKEN)")
	f.StringVarP(&output, "output", "o", "table", "table or json")
	return cmd
}

func adminGet(ctx context.Context, base, path, token string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(base, "/")+path, nil)
	if err != nil {
		return fmt.Errorf("--gateway: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("admin API: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		err := fmt.Errorf("admin API %s: HTTP %d: %s", path, resp.StatusCode, strings.TrimSpace(string(body)))
		if resp.StatusCode == http.StatusNotFound {
			err = fmt.Errorf("%w: %w", errNotFound, err)
		}
		return err
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("admin API %s: %w", path, err)
	}
	return nil
}

func writeStatus(out io.Writer, agents []adminapi.AgentInfo, services []adminapi.ServiceInfo) {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "AGENT\tSTATE\tPROTOCOL\tREMOTE\tSINCE\tRTT\tSERVICES")
	for _, ag := range agents {
		state, since, rtt := "offline", "-", "-"
		if ag.Connected {
			state = "connected"
			since = ag.ConnectedSince.Local().Format(time.DateTime)
			rtt = fmt.Sprintf("%.1fms", ag.HeartbeatRTTMS)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\n", ag.Name, state, dash(ag.Protocol), dash(ag.Remote), since, rtt, ag.Services)
	}
	fmt.Fprintln(w)
	writeInstances(w, agents)
	// SERVICE PORT is the port the service is known by (5432); the public
	// endpoint carries the port clients connect to (15432).
	fmt.Fprintln(w, "AGENT\tSERVICE\tPROTO\tSERVICE PORT\tPUBLIC ENDPOINT\tMODE\tACTIVE\tIN\tOUT")
	for _, s := range services {
		in, outv := humanBytes(s.BytesIn), humanBytes(s.BytesOut)
		if s.Protocol == "udp" {
			in, outv = fmt.Sprintf("%.0f pkt", s.PacketsIn), fmt.Sprintf("%.0f pkt", s.PacketsOut)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\t%d\t%s\t%s\n", s.Agent, s.ID, s.Protocol, s.Port, s.Endpoint, s.Mode, s.Active, in, outv)
	}
	writeAccess(w, services)
	w.Flush()
}

// writeAccess lists the services with client-address or access settings
// (or refusals): PROXY protocol mode, allow and deny lists, per-source
// limits, and how many sources were refused. Nothing when none has any.
func writeAccess(w io.Writer, services []adminapi.ServiceInfo) {
	header := false
	for _, s := range services {
		if !s.HasAccessSettings() {
			continue
		}
		if !header {
			fmt.Fprintln(w)
			fmt.Fprintln(w, "AGENT\tSERVICE\tPROTO\tPROXY PROTOCOL\tALLOW\tDENY\tPER SOURCE\tDENIED\tSOURCE LIMITED")
			header = true
		}
		per := "-"
		if s.MaxConnectionsPerSource > 0 || s.MaxConnectionRatePerSource > 0 {
			per = fmt.Sprintf("%d open, %g/s", s.MaxConnectionsPerSource, s.MaxConnectionRatePerSource)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n", s.Agent, s.ID, s.Protocol, dash(s.ProxyProtocol),
			dash(strings.Join(s.AllowCIDRs, ",")), dash(strings.Join(s.DenyCIDRs, ",")), per, s.Denied, s.SourceLimited)
	}
}

// writeInstances lists each agent's live instances (agent processes),
// when any agent has more than one: with one each, the agents table says
// it all.
func writeInstances(w io.Writer, agents []adminapi.AgentInfo) {
	several := false
	for _, ag := range agents {
		several = several || len(ag.Instances) > 1
	}
	if !several {
		return
	}
	fmt.Fprintln(w, "AGENT\tINSTANCE\tPROTOCOL\tREMOTE\tSINCE\tRTT\tSERVICES\tACTIVE")
	for _, ag := range agents {
		for _, in := range ag.Instances {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%.1fms\t%d\t%d\n", ag.Name, dash(in.ID), in.Protocol, in.Remote,
				in.ConnectedSince.Local().Format(time.DateTime), in.HeartbeatRTTMS, in.Services, in.Active)
		}
	}
	fmt.Fprintln(w)
}

// errNotFound marks an admin API answer of 404.
var errNotFound = errors.New("not found")

// writeCluster lists the replicas of a cluster, the agent sessions each
// holds, and how the answering replica serves each allocated port: from a
// local session of the agent, or forwarded to a replica holding one.
func writeCluster(out io.Writer, ci *adminapi.ClusterInfo) {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w)
	fmt.Fprintf(w, "REPLICA\tADVERTISE\tLINK\tAGENT SESSIONS\t(seen from %s)\n", ci.Replica)
	for _, r := range ci.Replicas {
		var sess []string
		for _, s := range r.Sessions {
			name := s.Agent
			if s.Instance != "" {
				name += "/" + s.Instance
			}
			sess = append(sess, name+" ("+s.Protocol+")")
		}
		link := dash(r.Link)
		if r.ID == ci.Replica {
			link = "self"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t\n", r.ID, dash(r.Advertise), link, dash(strings.Join(sess, ", ")))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "PORT\tAGENT\tSERVICE\tSTATE\tSERVED HERE\tAGENT ALSO ON")
	for _, p := range ci.Ports {
		state := "retained"
		if p.Live {
			state = "live"
		}
		fmt.Fprintf(w, "%s/%d\t%s\t%s\t%s\t%s\t%s\n", p.Protocol, p.Port, p.Agent, p.Service, state, dash(p.Served), dash(strings.Join(p.Via, ",")))
	}
	w.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func humanBytes(b float64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%.0f B", b)
	}
	div, exp := float64(unit), 0
	for n := b / unit; n >= unit; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", b/div, "KMGTPE"[exp])
}
