package bench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Figures are one path's results. In a Report they are medians over the
// runs. The memory and CPU figures are those of the gateway and the agent,
// so they exist for the tunnel paths only.
type Figures struct {
	// Stream1Gbps and Stream8Gbps are the rates at which the sink received
	// bulk data sent on one, and on eight concurrent, connections.
	Stream1Gbps float64 `json:"stream1_gbps"`
	Stream8Gbps float64 `json:"stream8_gbps"`
	// RRPerS is 1-byte request/response round trips per second on one
	// connection; RRP50us and RRP99us are their latency percentiles.
	RRPerS  float64 `json:"rr_per_s"`
	RRP50us float64 `json:"rr_p50_us"`
	RRP99us float64 `json:"rr_p99_us"`
	// ConnPerS is new connections per second (connect, 1-byte echo,
	// close) from four concurrent clients.
	ConnPerS float64 `json:"conn_per_s"`
	// GatewayPeakRSSMiB and AgentPeakRSSMiB are each process's peak
	// resident memory during the 8-stream measurement.
	GatewayPeakRSSMiB float64 `json:"gateway_peak_rss_mib,omitempty"`
	AgentPeakRSSMiB   float64 `json:"agent_peak_rss_mib,omitempty"`
	// GatewayPeakPrivateMiB and AgentPeakPrivateMiB are the same peaks of
	// private memory only (RssAnon): RSS without the executable's pages
	// mapped from its file, which the two processes share.
	GatewayPeakPrivateMiB float64 `json:"gateway_peak_private_mib,omitempty"`
	AgentPeakPrivateMiB   float64 `json:"agent_peak_private_mib,omitempty"`
	// CPUSecPerGB is the CPU time of gateway and agent together per 10⁹
	// bytes received by the sink, over both throughput measurements.
	CPUSecPerGB float64 `json:"cpu_s_per_gb,omitempty"`
	// CPUusPerRT is the CPU time of gateway and agent together, in µs,
	// per 1-byte round trip, over the round-trip measurement.
	CPUusPerRT float64 `json:"cpu_us_per_rt,omitempty"`
}

// RTT is the high-latency case.
type RTT struct {
	// Yamux1Gbps is one yamux stream's throughput with 20 ms of round-trip
	// time added in front of the tunnel's WebSocket (median over runs).
	Yamux1Gbps float64 `json:"yamux_stream1_gbps"`
}

// Idle is the memory-at-scale case.
type Idle struct {
	// BytesPerConn is the growth of gateway plus agent RSS per idle
	// tunneled connection; the two after it are each side's share.
	BytesPerConn        float64 `json:"bytes_per_conn"`
	GatewayBytesPerConn float64 `json:"gateway_bytes_per_conn"`
	AgentBytesPerConn   float64 `json:"agent_bytes_per_conn"`
	// Conns is how many connections were held (fewer than asked only when
	// RLIMIT_NOFILE did not allow more; Notes says so).
	Conns int `json:"conns"`
}

// Report is the result of Run, and the object `portway bench --json`
// prints.
type Report struct {
	Paths   map[Path]Figures `json:"paths"`
	RTT20ms *RTT             `json:"rtt20ms,omitempty"`
	Idle10k *Idle            `json:"idle10k,omitempty"`
	// Agents10k is the many-agents case.
	Agents10k *Agents `json:"agents10k,omitempty"`
	// Spread is each figure's minimum and maximum over the runs, by path
	// name (and "rtt20ms"), then by the figure's JSON key.
	Spread    map[string]map[string][2]float64 `json:"spread"`
	Runs      int                              `json:"runs"`
	DurationS float64                          `json:"duration_s"`
	Started   time.Time                        `json:"started"`
	WallS     float64                          `json:"wall_s"`
	Platform  string                           `json:"platform"`
	Notes     []string                         `json:"notes,omitempty"`
}

// figure describes one field of Figures for aggregation and the table.
type figure struct {
	key    string // JSON key
	label  string
	format string
	// digits is the precision kept in the report: measurement noise is
	// far above it.
	digits int
	// tunnel marks figures of the gateway and agent processes.
	tunnel bool
	field  func(*Figures) *float64
}

func figureList() []figure {
	return []figure{
		{"stream1_gbps", "throughput, 1 stream (Gbit/s)", "%.2f", 3, false, func(f *Figures) *float64 { return &f.Stream1Gbps }},
		{"stream8_gbps", "throughput, 8 streams (Gbit/s)", "%.2f", 3, false, func(f *Figures) *float64 { return &f.Stream8Gbps }},
		{"rr_per_s", "round trips/s, 1 conn, 1 byte", "%.0f", 0, false, func(f *Figures) *float64 { return &f.RRPerS }},
		{"rr_p50_us", "round trip p50 (µs)", "%.0f", 1, false, func(f *Figures) *float64 { return &f.RRP50us }},
		{"rr_p99_us", "round trip p99 (µs)", "%.0f", 1, false, func(f *Figures) *float64 { return &f.RRP99us }},
		{"conn_per_s", "new connections/s", "%.0f", 0, false, func(f *Figures) *float64 { return &f.ConnPerS }},
		{"gateway_peak_rss_mib", "gateway peak RSS, 8 streams (MiB)", "%.1f", 1, true, func(f *Figures) *float64 { return &f.GatewayPeakRSSMiB }},
		{"gateway_peak_private_mib", "gateway peak private, 8 streams (MiB)", "%.1f", 1, true, func(f *Figures) *float64 { return &f.GatewayPeakPrivateMiB }},
		{"agent_peak_rss_mib", "agent peak RSS, 8 streams (MiB)", "%.1f", 1, true, func(f *Figures) *float64 { return &f.AgentPeakRSSMiB }},
		{"agent_peak_private_mib", "agent peak private, 8 streams (MiB)", "%.1f", 1, true, func(f *Figures) *float64 { return &f.AgentPeakPrivateMiB }},
		{"cpu_s_per_gb", "gateway+agent CPU s per GB", "%.2f", 3, true, func(f *Figures) *float64 { return &f.CPUSecPerGB }},
		{"cpu_us_per_rt", "gateway+agent CPU µs per round trip", "%.1f", 1, true, func(f *Figures) *float64 { return &f.CPUusPerRT }},
	}
}

// newReport aggregates the samples of every run into medians and spreads.
func newReport(samples map[Path][]Figures, rtt []float64, idle *Idle) *Report {
	rep := &Report{Paths: map[Path]Figures{}, Spread: map[string]map[string][2]float64{}}
	for p, runs := range samples {
		var med Figures
		spread := map[string][2]float64{}
		for _, fg := range figureList() {
			if fg.tunnel && !p.tunnel() {
				continue
			}
			vals := make([]float64, len(runs))
			for i := range runs {
				vals[i] = *fg.field(&runs[i])
			}
			*fg.field(&med) = round(median(vals), fg.digits)
			spread[fg.key] = [2]float64{round(slices.Min(vals), fg.digits), round(slices.Max(vals), fg.digits)}
		}
		rep.Paths[p] = med
		rep.Spread[string(p)] = spread
	}
	if len(rtt) > 0 {
		rep.RTT20ms = &RTT{Yamux1Gbps: round(median(rtt), 3)}
		rep.Spread["rtt20ms"] = map[string][2]float64{"yamux_stream1_gbps": {round(slices.Min(rtt), 3), round(slices.Max(rtt), 3)}}
	}
	if idle != nil {
		rounded := *idle
		rounded.BytesPerConn = math.Round(idle.BytesPerConn)
		rounded.GatewayBytesPerConn = math.Round(idle.GatewayBytesPerConn)
		rounded.AgentBytesPerConn = math.Round(idle.AgentBytesPerConn)
		rep.Idle10k = &rounded
	}
	return rep
}

// median of vals (mean of the middle two for an even count).
func median(vals []float64) float64 {
	if len(vals) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(vals))
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

func round(v float64, digits int) float64 {
	p := math.Pow10(digits)
	return math.Round(v*p) / p
}

// WriteTable prints the report as a table: for each figure and path the
// median, the spread over the runs, and the median divided by the relay's
// and by the direct path's.
func (r *Report) WriteTable(w io.Writer) error {
	var b strings.Builder
	runs := "runs"
	if r.Runs == 1 {
		runs = "run"
	}
	fmt.Fprintf(&b, "portway bench: %d %s, %v per measurement, started %s, %v wall\n",
		r.Runs, runs, time.Duration(r.DurationS*float64(time.Second)), r.Started.Format("2006-01-02 15:04 MST"),
		time.Duration(r.WallS*float64(time.Second)))
	fmt.Fprintf(&b, "%s; medians (min–max over runs); ×relay and ×direct divide by those paths' medians\n\n", r.Platform)

	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FIGURE\tPATH\tMEDIAN\tMIN–MAX\t×RELAY\t×DIRECT")
	var paths []Path
	for _, p := range Paths() {
		if _, ok := r.Paths[p]; ok {
			paths = append(paths, p)
		}
	}
	for _, fg := range figureList() {
		label := fg.label
		for _, p := range paths {
			if fg.tunnel && !p.tunnel() {
				continue
			}
			f := r.Paths[p]
			v := *fg.field(&f)
			sp := r.Spread[string(p)][fg.key]
			rel, dir := "-", "-"
			if !fg.tunnel {
				rel, dir = r.ratio(fg, v, Relay), r.ratio(fg, v, Direct)
			}
			fmt.Fprintf(tw, "%s\t%s\t"+fg.format+"\t"+fg.format+"–"+fg.format+"\t%s\t%s\n", label, p, v, sp[0], sp[1], rel, dir)
			label = ""
		}
	}
	if r.RTT20ms != nil {
		sp := r.Spread["rtt20ms"]["yamux_stream1_gbps"]
		fmt.Fprintf(tw, "throughput at 20 ms RTT, 1 stream (Gbit/s)\tyamux\t%.2f\t%.2f–%.2f\t-\t-\n", r.RTT20ms.Yamux1Gbps, sp[0], sp[1])
	}
	if r.Idle10k != nil {
		fmt.Fprintf(tw, "idle connections: gateway+agent bytes/conn\tyamux\t%.0f\t-\t-\t-\n", r.Idle10k.BytesPerConn)
	}
	tw.Flush()
	if r.Idle10k != nil {
		fmt.Fprintf(&b, "\nidle connections: %d held through yamux, each after a 1-byte echo; RSS growth per connection: gateway %.0f B + agent %.0f B\n",
			r.Idle10k.Conns, r.Idle10k.GatewayBytesPerConn, r.Idle10k.AgentBytesPerConn)
	}
	if a := r.Agents10k; a != nil {
		fmt.Fprintf(&b, "\nagents: %d simulated %s agents, one TCP service each: gateway %.0f B per idle agent (RSS %.1f MiB), %.0f registered/s from cold,\n"+
			"  heartbeat CPU %.2f ms/s per 1,000 agents; storm (all but one dropped at once): every one registered again in %.2f s,\n"+
			"  gateway peak RSS %.1f MiB and %d goroutines, %d attempts deferred with 503\n",
			a.Agents, a.Protocol, a.GatewayBytesPerAgent, a.GatewayRSSMiB, a.RegisterPerS, a.HeartbeatCPUMsPerSPer1k,
			a.StormRecoverS, a.StormPeakRSSMiB, a.StormPeakGoroutines, a.StormDeferred)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "note: %s\n", n)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// ratio formats v divided by the median of the same figure on path base.
func (r *Report) ratio(fg figure, v float64, base Path) string {
	bf, ok := r.Paths[base]
	if !ok {
		return "-"
	}
	bv := *fg.field(&bf)
	if bv == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", v/bv)
}
