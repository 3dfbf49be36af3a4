// Package bench measures portway on loopback against the direct path and
// a plain one-hop relay, in one run: throughput on one and on eight
// streams, round trips, connection setup, and the memory and CPU of a real
// gateway and agent, which run as child processes so that each one's RSS and
// CPU time can be read from /proc. `portway bench` is its command line;
// docs/benchmarks.md explains how to read the figures.
package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Path is one way from the bench's clients to its backends.
type Path string

// The paths, in the order each run measures them.
const (
	// Direct connects straight to the backend.
	Direct Path = "direct"
	// Relay goes through one plain userspace TCP relay: the reference for
	// what a userspace hop costs.
	Relay Path = "relay"
	// RelayProcess is the same relay running as a process of its own, as
	// real relays do: it shows what crossing into another process costs,
	// which the in-process relay does not pay and the tunnel pays twice.
	RelayProcess Path = "relay-process"
	// Yamux goes client → gateway public port → tunnel (yamux mode) →
	// agent → backend.
	Yamux Path = "yamux"
	// WSS is the yamux path with the tunnel's WebSocket over TLS (wss://),
	// as real deployments run it, with a certificate made for the run.
	WSS Path = "wss"
	// JSON is the same with the tunnel in JSON mode.
	JSON Path = "json"
	// Forwarded goes client → a gateway replica without the agent's
	// session → cluster link → the replica with it → tunnel (yamux) →
	// agent → backend. It needs an etcd binary (forwarded.go); without
	// one it is skipped with a note.
	Forwarded Path = "forwarded"
)

// Paths returns every path, in the order each run measures them.
func Paths() []Path { return []Path{Direct, Relay, RelayProcess, Yamux, WSS, JSON, Forwarded} }

func (p Path) tunnel() bool { return p == Yamux || p == WSS || p == JSON }

// ParsePaths parses --only values, each a path name or a comma-separated
// list of them. No values means every path. The result is in run order.
func ParsePaths(vals []string) ([]Path, error) {
	if len(vals) == 0 {
		return Paths(), nil
	}
	want := map[Path]bool{}
	for _, v := range vals {
		for name := range strings.SplitSeq(v, ",") {
			p := Path(strings.ToLower(strings.TrimSpace(name)))
			if !p.valid() {
				return nil, fmt.Errorf("--only: %q is not one of direct, relay, relay-process, yamux, wss, json, forwarded", name)
			}
			want[p] = true
		}
	}
	var out []Path
	for _, p := range Paths() {
		if want[p] {
			out = append(out, p)
		}
	}
	return out, nil
}

func (p Path) valid() bool {
	for _, q := range Paths() {
		if p == q {
			return true
		}
	}
	return false
}

// Defaults. With these the whole bench takes under three minutes on a
// 2-core machine (docs/benchmarks.md has the measured time).
const (
	DefaultRuns      = 3
	DefaultDuration  = 2 * time.Second
	DefaultIdleConns = 10000
)

// Fixed shape of the measurements.
const (
	// streams is the concurrency of the multi-stream throughput figure.
	streams = 8
	// connWorkers open connections concurrently in the setup-rate figure,
	// so it measures the path rather than one client's round trip.
	connWorkers = 4
	// idleWorkers open the idle connections.
	idleWorkers = 8
	// maxWarmup precedes each throughput window: connection setup and
	// window growth are not what it measures.
	maxWarmup = 300 * time.Millisecond
	// rttDelay is added each way by the delay stage: 20 ms round trip.
	rttDelay = 10 * time.Millisecond
	// maxRTTWarmup lets the yamux window grow to the link before
	// measuring.
	maxRTTWarmup = time.Second
	// maxIdleSettle lets the children finish allocating and parking
	// before their RSS is read.
	maxIdleSettle = time.Second
	// fdReserve is the descriptors kept aside for everything but the idle
	// connections.
	fdReserve = 256
)

// Options configure Run.
type Options struct {
	// Runs is how many times each path is measured; the report gives the
	// median and the spread. 0 means DefaultRuns.
	Runs int
	// Duration is each measurement's window. 0 means DefaultDuration.
	Duration time.Duration
	// Paths restricts the paths measured; nil means all. The 20 ms RTT and
	// idle connection cases need Yamux.
	Paths []Path
	// SkipRTT and SkipIdle leave out the 20 ms RTT and the idle
	// connections cases.
	SkipRTT, SkipIdle bool
	// IdleConns is how many idle connections to hold. 0 means
	// DefaultIdleConns.
	IdleConns int
	// SkipAgents leaves out the many-agents case; AgentsOnly runs it
	// alone (Paths and the other cases are then ignored). Agents is how
	// many agents it simulates (0: DefaultAgents), AgentsProtocol their
	// tunnel mode ("": yamux).
	SkipAgents, AgentsOnly bool
	Agents                 int
	AgentsProtocol         string
	// Exec runs the gateway and agent children. Required.
	Exec Exec
	// Logger receives progress. nil discards it.
	Logger *slog.Logger
}

func (o *Options) normalize() error {
	if o.Runs == 0 {
		o.Runs = DefaultRuns
	}
	if o.Duration == 0 {
		o.Duration = DefaultDuration
	}
	if o.IdleConns == 0 {
		o.IdleConns = DefaultIdleConns
	}
	if o.Agents == 0 {
		o.Agents = DefaultAgents
	}
	if o.AgentsProtocol == "" {
		o.AgentsProtocol = string(Yamux)
	}
	if o.AgentsOnly {
		o.Paths, o.SkipRTT, o.SkipIdle, o.SkipAgents = []Path{}, true, true, false
	}
	if o.Paths == nil {
		o.Paths = Paths()
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	var errs []error
	if o.Runs < 1 || o.Runs > 100 {
		errs = append(errs, fmt.Errorf("--runs: %d is outside 1-100", o.Runs))
	}
	if o.Duration < 10*time.Millisecond || o.Duration > 10*time.Minute {
		errs = append(errs, fmt.Errorf("--duration: %v is outside 10ms-10m", o.Duration))
	}
	if o.IdleConns < 1 || o.IdleConns > 1<<20 {
		errs = append(errs, fmt.Errorf("--idle-conns: %d is outside 1-%d", o.IdleConns, 1<<20))
	}
	if o.Agents < 2 || o.Agents > 1<<20 {
		errs = append(errs, fmt.Errorf("--agents: %d is outside 2-%d", o.Agents, 1<<20))
	}
	if o.AgentsProtocol != string(Yamux) && o.AgentsProtocol != string(JSON) {
		errs = append(errs, fmt.Errorf("--agents-protocol: %q is neither yamux nor json", o.AgentsProtocol))
	}
	if len(o.Paths) == 0 && !o.AgentsOnly {
		errs = append(errs, errors.New("no path to measure"))
	}
	for _, p := range o.Paths {
		if !p.valid() {
			errs = append(errs, fmt.Errorf("unknown path %q", p))
		}
	}
	if o.Exec.Path == "" && (o.has(Yamux) || o.has(WSS) || o.has(JSON) || o.has(Forwarded) || !o.SkipAgents) {
		errs = append(errs, errors.New("no portway binary to run the gateway and agent"))
	}
	return errors.Join(errs...)
}

func (o *Options) has(p Path) bool {
	for _, q := range o.Paths {
		if q == p {
			return true
		}
	}
	return false
}

// runner holds what one Run shares between its measurements.
type runner struct {
	opts Options
	log  *slog.Logger
	// warmup, rttWarmup and idleSettle are the max* waits, shortened for
	// short measurements so that a quick run (a test) stays quick.
	warmup, rttWarmup, idleSettle time.Duration
	dir                           string // configs and child logs
	sink                          *sink
	echo                          *tcpServer
	// relaySink and relayEcho are the reference relay in front of sink
	// and echo; nil when the relay path is not measured.
	relaySink, relayEcho *tcpServer
	// tls is the wss path's certificate, made once for the run; nil when
	// that path is not measured.
	tls *benchCert
}

// Run measures every selected path Runs times, alternating paths within a
// run so that drift hits all of them equally, then the 20 ms RTT case and
// the idle connections. Every child process and temporary file is gone
// when it returns, whether it succeeded, failed or ctx ended.
func Run(ctx context.Context, o Options) (*Report, error) {
	if err := o.normalize(); err != nil {
		return nil, err
	}
	started := time.Now()
	r := &runner{
		opts: o, log: o.Logger,
		warmup:     min(maxWarmup, o.Duration/4),
		rttWarmup:  min(maxRTTWarmup, o.Duration/2),
		idleSettle: min(maxIdleSettle, o.Duration/2),
	}
	var notes []string
	if o.has(Forwarded) && etcdBinary() == "" {
		note := "forwarded path skipped: it needs an etcd binary ($KUBEBUILDER_ASSETS/etcd, or etcd on PATH)"
		r.log.Warn(note)
		notes = append(notes, note)
		o.Paths = slices.DeleteFunc(slices.Clone(o.Paths), func(p Path) bool { return p == Forwarded })
		r.opts.Paths = o.Paths
		if len(o.Paths) == 0 {
			return nil, errors.New("bench: " + note)
		}
	}
	if o.has(Yamux) && !o.SkipIdle {
		n, note, err := raiseNoFile(o.IdleConns)
		if err != nil {
			return nil, err
		}
		if note != "" {
			r.log.Warn(note)
			notes = append(notes, note)
		}
		r.opts.IdleConns = n
	}
	if !o.SkipAgents {
		// The gateway holds each agent's WebSocket and its service's
		// listener.
		n, note, err := raiseNoFile(agentFDsEach * o.Agents)
		if err != nil {
			return nil, err
		}
		if note != "" {
			note = fmt.Sprintf("agents case: the RLIMIT_NOFILE hard limit (not raisable) holds %d agents, not %d: the gateway needs %d descriptors per agent (its WebSocket and its service's listener)",
				n/agentFDsEach, o.Agents, agentFDsEach)
			r.log.Warn(note)
			notes = append(notes, note)
		}
		r.opts.Agents = n / agentFDsEach
	}
	dir, err := os.MkdirTemp("", "portway-bench-")
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	defer os.RemoveAll(dir)
	r.dir = dir
	if o.has(WSS) {
		if r.tls, err = newBenchCert(dir); err != nil {
			return nil, err
		}
	}
	if err := r.startBackends(); err != nil {
		return nil, err
	}
	defer r.closeBackends()

	samples := map[Path][]Figures{}
	var rtt []float64
	for run := 1; run <= o.Runs; run++ {
		for _, p := range o.Paths {
			f, err := r.measurePath(ctx, p, run)
			if err != nil {
				return nil, r.failure(ctx, fmt.Errorf("run %d, %s: %w", run, p, err))
			}
			samples[p] = append(samples[p], f)
		}
		if o.has(Yamux) && !o.SkipRTT {
			g, err := r.measureRTT(ctx, run)
			if err != nil {
				return nil, r.failure(ctx, fmt.Errorf("run %d, yamux at 20 ms RTT: %w", run, err))
			}
			rtt = append(rtt, g)
		}
	}
	var idle *Idle
	if o.has(Yamux) && !o.SkipIdle {
		if idle, err = r.measureIdle(ctx); err != nil {
			return nil, r.failure(ctx, fmt.Errorf("idle connections: %w", err))
		}
	}
	var agents *Agents
	if !o.SkipAgents {
		if agents, err = r.measureAgents(ctx, r.opts.Agents, o.AgentsProtocol); err != nil {
			return nil, r.failure(ctx, fmt.Errorf("agents: %w", err))
		}
	}
	rep := newReport(samples, rtt, idle)
	rep.Agents10k = agents
	rep.Runs, rep.DurationS = o.Runs, o.Duration.Seconds()
	rep.Started = started.UTC().Truncate(time.Second)
	rep.WallS = time.Since(started).Round(100 * time.Millisecond).Seconds()
	rep.Platform = fmt.Sprintf("%s/%s, %d CPUs, %s", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.Version())
	rep.Notes = notes
	return rep, nil
}

// failure prefers the interruption to what it caused.
func (r *runner) failure(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("bench interrupted: %w", context.Cause(ctx))
	}
	return err
}

func (r *runner) startBackends() (err error) {
	defer func() {
		if err != nil {
			r.closeBackends()
		}
	}()
	if r.sink, err = startSink(); err != nil {
		return err
	}
	if r.echo, err = startEcho(); err != nil {
		return err
	}
	if r.opts.has(Relay) {
		if r.relaySink, err = startRelay(r.sink.Addr()); err != nil {
			return fmt.Errorf("relay: %w", err)
		}
		if r.relayEcho, err = startRelay(r.echo.Addr()); err != nil {
			return fmt.Errorf("relay: %w", err)
		}
	}
	return nil
}

func (r *runner) closeBackends() {
	for _, s := range []*tcpServer{r.relaySink, r.relayEcho, r.echo} {
		if s != nil {
			s.Close()
		}
	}
	if r.sink != nil {
		r.sink.Close()
	}
}

// target is where a path's clients connect for the sink and the echo
// server.
type target struct{ sink, echo string }

// measurePath measures every figure of one path once. A tunnel path gets a
// fresh gateway and agent, so no run inherits another's heap.
func (r *runner) measurePath(ctx context.Context, p Path, run int) (_ Figures, err error) {
	tg := target{sink: r.sink.Addr(), echo: r.echo.Addr()}
	var procs []proc
	switch p {
	case Relay:
		tg = target{sink: r.relaySink.Addr(), echo: r.relayEcho.Addr()}
	case RelayProcess:
		pctx, cancel := context.WithCancelCause(ctx)
		defer cancel(nil)
		c, rtg, rerr := startRelayProcess(pctx, r.opts.Exec, r.dir, fmt.Sprintf("relay-run%d", run), r.sink.Addr(), r.echo.Addr(),
			func(c *child) { cancel(c.exitErr()) })
		if rerr != nil {
			return Figures{}, rerr
		}
		defer c.stop()
		tg = rtg
		ctx = pctx
	case Forwarded:
		t, terr := startForwarded(ctx, r.opts.Exec, r.dir, fmt.Sprintf("%s-run%d", p, run), r.sink.Addr(), r.echo.Addr())
		if terr != nil {
			return Figures{}, terr
		}
		defer t.close()
		defer func() { err = t.explain(err) }()
		// No process figures: three processes share the work.
		tg = target{sink: t.sink, echo: t.echo}
		ctx = t.ctx
	case Yamux, WSS, JSON:
		spec := tunnelSpec{
			name: fmt.Sprintf("%s-run%d", p, run), protocol: string(p),
			sink: r.sink.Addr(), echo: r.echo.Addr(),
		}
		if p == WSS {
			spec.protocol, spec.tls = string(Yamux), r.tls
		}
		t, terr := startTunnel(ctx, r.opts.Exec, r.dir, spec)
		if terr != nil {
			return Figures{}, terr
		}
		defer t.close()
		defer func() { err = t.explain(err) }()
		tg = target{sink: t.sink, echo: t.echo}
		procs = t.procs()
		ctx = t.ctx
	}
	f, err := r.measure(ctx, tg, procs)
	if err != nil {
		return Figures{}, err
	}
	r.log.Info("measured", "run", run, "path", p,
		"stream1_gbps", round(f.Stream1Gbps, 2), "stream8_gbps", round(f.Stream8Gbps, 2),
		"rr_per_s", round(f.RRPerS, 0), "rr_p99_us", round(f.RRP99us, 0), "conn_per_s", round(f.ConnPerS, 0),
		"cpu_s_per_gb", round(f.CPUSecPerGB, 2), "cpu_us_per_rt", round(f.CPUusPerRT, 1))
	return f, nil
}

// measure runs the four measurements of a path. procs are the gateway and
// the agent for a tunnel path, none otherwise.
func (r *runner) measure(ctx context.Context, tg target, procs []proc) (Figures, error) {
	d := r.opts.Duration
	var f Figures
	s1, err := throughput(ctx, tg.sink, 1, r.warmup, d, r.sink, procs)
	if err != nil {
		return f, fmt.Errorf("1-stream throughput: %w", err)
	}
	s8, err := throughput(ctx, tg.sink, streams, r.warmup, d, r.sink, procs)
	if err != nil {
		return f, fmt.Errorf("%d-stream throughput: %w", streams, err)
	}
	rr, err := roundTrips(ctx, tg.echo, d, procs)
	if err != nil {
		return f, fmt.Errorf("round trips: %w", err)
	}
	cr, err := connRate(ctx, tg.echo, connWorkers, d)
	if err != nil {
		return f, fmt.Errorf("connection rate: %w", err)
	}
	if err := r.echo.waitIdle(ctx, opTimeout); err != nil {
		return f, fmt.Errorf("connection rate: %w", err)
	}
	f = Figures{
		Stream1Gbps: s1.gbps(), Stream8Gbps: s8.gbps(),
		RRPerS: rr.perSecond(), RRP50us: micros(rr.p50), RRP99us: micros(rr.p99),
		ConnPerS: cr,
	}
	if len(procs) == 2 {
		f.GatewayPeakRSSMiB = float64(s8.peakKB[0]) / 1024
		f.AgentPeakRSSMiB = float64(s8.peakKB[1]) / 1024
		f.GatewayPeakPrivateMiB = float64(s8.peakPrivateKB[0]) / 1024
		f.AgentPeakPrivateMiB = float64(s8.peakPrivateKB[1]) / 1024
		if gb := float64(s1.bytes+s8.bytes) / 1e9; gb > 0 {
			f.CPUSecPerGB = (s1.cpu + s8.cpu) / gb
		}
		if rr.n > 0 {
			f.CPUusPerRT = rr.cpu * 1e6 / float64(rr.n)
		}
	}
	return f, nil
}

// measureRTT measures one yamux stream through a delay stage that adds
// 20 ms of round-trip time in front of the tunnel's WebSocket.
func (r *runner) measureRTT(ctx context.Context, run int) (_ float64, err error) {
	t, err := startTunnel(ctx, r.opts.Exec, r.dir, tunnelSpec{
		name: fmt.Sprintf("rtt20ms-run%d", run), protocol: string(Yamux),
		sink: r.sink.Addr(), echo: r.echo.Addr(), delay: rttDelay,
	})
	if err != nil {
		return 0, err
	}
	defer t.close()
	res, err := throughput(t.ctx, t.sink, 1, r.rttWarmup, r.opts.Duration, r.sink, nil)
	if err != nil {
		return 0, t.explain(err)
	}
	r.log.Info("measured", "run", run, "path", "yamux at 20 ms RTT", "stream1_gbps", round(res.gbps(), 2))
	return res.gbps(), nil
}

// measureIdle holds IdleConns idle connections open through a fresh yamux
// gateway and agent, each after a completed 1-byte echo, and returns what
// they cost in RSS, gateway and agent together.
func (r *runner) measureIdle(ctx context.Context) (_ *Idle, err error) {
	n := r.opts.IdleConns
	// An echo server of its own, in a child process: a fresh port, so the
	// connections made by earlier measurements, now in TIME_WAIT, take
	// none of the ports the agent needs towards it; and a process of its
	// own, so the backend ends of the connections do not count against
	// this process's descriptor limit.
	ectx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	echo, echoAddr, err := startEchoProcess(ectx, r.opts.Exec, r.dir, "idle-echo", func(c *child) { cancel(c.exitErr()) })
	if err != nil {
		return nil, err
	}
	defer echo.stop()
	t, err := startTunnel(ectx, r.opts.Exec, r.dir, tunnelSpec{
		name: "idle", protocol: string(Yamux), sink: r.sink.Addr(), echo: echoAddr, maxConns: n + 64,
	})
	if err != nil {
		return nil, err
	}
	defer t.close()
	defer func() { err = t.explain(err) }()
	procs := t.procs()
	if err := sleepCtx(t.ctx, r.idleSettle); err != nil {
		return nil, err
	}
	before, err := rssAll(procs)
	if err != nil {
		return nil, err
	}
	r.log.Info("opening idle connections", "conns", n)
	conns, err := openIdle(t.ctx, t.echo, n, idleWorkers)
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)
	if err := sleepCtx(t.ctx, r.idleSettle); err != nil {
		return nil, err
	}
	after, err := rssAll(procs)
	if err != nil {
		return nil, err
	}
	if err := checkAlive(t.ctx, conns); err != nil {
		return nil, err
	}
	gw := float64(after[0]-before[0]) * 1024 / float64(n)
	ag := float64(after[1]-before[1]) * 1024 / float64(n)
	idle := &Idle{BytesPerConn: gw + ag, GatewayBytesPerConn: gw, AgentBytesPerConn: ag, Conns: n}
	r.log.Info("measured", "path", "yamux idle connections", "conns", n, "bytes_per_conn", round(idle.BytesPerConn, 0))
	return idle, nil
}

// checkAlive does one more exchange on a few of the idle connections,
// spread over the whole set: they must have been held, not dropped.
func checkAlive(ctx context.Context, conns []net.Conn) error {
	const probes = 10
	step := max(len(conns)/probes, 1)
	for i := 0; i < len(conns); i += step {
		c := conns[i]
		c.SetDeadline(time.Now().Add(opTimeout))
		stop := abortOnDone(ctx, c)
		msg := [1]byte{'y'}
		_, err := c.Write(msg[:])
		if err == nil {
			_, err = c.Read(msg[:])
		}
		stop()
		if err != nil {
			return ctxOr(ctx, fmt.Errorf("idle connection %d no longer answers: %w", i+1, err))
		}
	}
	return nil
}

func rssAll(procs []proc) ([]int64, error) {
	out := make([]int64, len(procs))
	for i, p := range procs {
		kb, err := p.rssKB()
		if err != nil {
			return nil, err
		}
		out[i] = kb
	}
	return out, nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
