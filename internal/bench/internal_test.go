package bench

import (
	"context"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/testnet"
)

func TestParseStatCPU(t *testing.T) {
	// The command name may hold spaces and parentheses.
	stat := "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194304 133 0 0 0 250 75 0 0 20 0 9 0 718298 2990080 426 18446744073709551615\n"
	got, err := parseStatCPU([]byte(stat))
	if err != nil {
		t.Fatal(err)
	}
	if want := 3.25; got != want {
		t.Errorf("cpu = %v, want %v (utime 250 + stime 75 ticks)", got, want)
	}
	for _, bad := range []string{"", "42 (x) S 1 2", "42 (x) S 1 2 3 4 5 6 7 8 9 10 eleven 12"} {
		if _, err := parseStatCPU([]byte(bad)); err == nil {
			t.Errorf("parseStatCPU(%q) succeeded", bad)
		}
	}
}

func TestParseStatusKB(t *testing.T) {
	status := "Name:\tportway\nVmPeak:\t  900 kB\nVmHWM:\t    41234 kB\nVmRSS:\t    30000 kB\n"
	for field, want := range map[string]int64{"VmHWM": 41234, "VmRSS": 30000} {
		got, err := parseStatusKB([]byte(status), field)
		if err != nil || got != want {
			t.Errorf("%s = %d, %v; want %d", field, got, err, want)
		}
	}
	if _, err := parseStatusKB([]byte(status), "VmSwap"); err == nil {
		t.Error("missing field: no error")
	}
}

func TestUsageOfThisProcess(t *testing.T) {
	self := []proc{proc(os.Getpid())}
	u, err := beginUsage(self)
	if err != nil {
		t.Fatal(err)
	}
	ballast := make([]byte, 32<<20)
	for i := range ballast {
		ballast[i] = 1 // touch every page, so it is resident
	}
	use, err := u.end()
	if err != nil {
		t.Fatal(err)
	}
	if use.cpu < 0 || use.peakKB[0] < 32<<10 || use.peakPrivateKB[0] < 32<<10 {
		t.Errorf("cpu %v s, peak %d KiB, private %d KiB; want cpu >= 0 and peaks of at least the 32 MiB touched",
			use.cpu, use.peakKB[0], use.peakPrivateKB[0])
	}
	_ = ballast[len(ballast)-1]
}

func TestMedianAndPercentile(t *testing.T) {
	if got := median([]float64{3, 1, 2}); got != 2 {
		t.Errorf("median odd = %v", got)
	}
	if got := median([]float64{4, 1, 3, 2}); got != 2.5 {
		t.Errorf("median even = %v", got)
	}
	var d []time.Duration
	for i := 1; i <= 100; i++ {
		d = append(d, time.Duration(i))
	}
	if p50, p99 := percentile(d, 0.5), percentile(d, 0.99); p50 != 50 || p99 != 99 {
		t.Errorf("p50 %v p99 %v, want 50 and 99", p50, p99)
	}
	if got := percentile(d[:1], 0.99); got != 1 {
		t.Errorf("p99 of one sample = %v", got)
	}
}

func TestParsePaths(t *testing.T) {
	got, err := ParsePaths([]string{"json,direct", " Yamux ", "wss"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []Path{Direct, Yamux, WSS, JSON}; !equalPaths(got, want) {
		t.Errorf("got %v, want %v (run order)", got, want)
	}
	if all, _ := ParsePaths(nil); !equalPaths(all, Paths()) {
		t.Errorf("no --only: %v", all)
	}
	if _, err := ParsePaths([]string{"yamux,smux"}); err == nil || !strings.Contains(err.Error(), "smux") {
		t.Errorf("unknown path: err = %v", err)
	}
}

func equalPaths(a, b []Path) bool {
	return strings.Join(pathStrings(a), ",") == strings.Join(pathStrings(b), ",")
}

func pathStrings(ps []Path) []string {
	var out []string
	for _, p := range ps {
		out = append(out, string(p))
	}
	return out
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/251)
	}
	return b
}

func TestRelayCarriesDataAndHalfClose(t *testing.T) {
	echo, err := startEcho()
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	relay, err := startRelay(echo.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	if err := testnet.EchoRoundTrip(relay.Addr(), pattern(3<<20+17)); err != nil {
		t.Fatal(err)
	}
}

func TestDelayStageKeepsOrderAndHalfClose(t *testing.T) {
	echo, err := startEcho()
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	delay, err := startDelay(echo.Addr(), time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer delay.Close()
	// Larger than all the stage's buffers together would be with short
	// reads, so buffers must circulate.
	if err := testnet.EchoRoundTrip(delay.Addr(), pattern(8<<20+3)); err != nil {
		t.Fatal(err)
	}
}

// TestDelayStageDelays checks the stage holds data for its delay in each
// direction: a round trip through it takes at least twice the delay. That
// is what the stage is for, not a speed assertion.
func TestDelayStageDelays(t *testing.T) {
	echo, err := startEcho()
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	const delay = 10 * time.Millisecond
	stage, err := startDelay(echo.Addr(), delay)
	if err != nil {
		t.Fatal(err)
	}
	defer stage.Close()
	c, err := net.DialTimeout("tcp", stage.Addr(), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := []byte{1}
	for range 3 {
		start := time.Now()
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, msg); err != nil {
			t.Fatal(err)
		}
		if rtt := time.Since(start); rtt < 2*delay {
			t.Fatalf("round trip took %v, less than the 2×%v the stage must add", rtt, delay)
		}
	}
}

func TestServerCloseEndsConnections(t *testing.T) {
	echo, err := startEcho()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	conns, err := openIdle(ctx, echo.Addr(), 20, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll(conns)
	if n := echo.active.Load(); n != 20 {
		t.Errorf("%d connections counted, want 20", n)
	}
	echo.Close() // must not hang on the open connections
	if err := echo.waitIdle(ctx, time.Second); err != nil {
		t.Error(err)
	}
}

func TestWriteTable(t *testing.T) {
	samples := map[Path][]Figures{
		Direct: {{Stream1Gbps: 10, Stream8Gbps: 10, RRPerS: 20000, RRP50us: 10, RRP99us: 20, ConnPerS: 4000}},
		Relay:  {{Stream1Gbps: 5, Stream8Gbps: 6, RRPerS: 10000, RRP50us: 20, RRP99us: 40, ConnPerS: 2000}},
		Yamux: {
			{Stream1Gbps: 3, Stream8Gbps: 3, RRPerS: 8000, RRP50us: 50, RRP99us: 90, ConnPerS: 1000, GatewayPeakRSSMiB: 12, AgentPeakRSSMiB: 10, CPUSecPerGB: 1.5},
			{Stream1Gbps: 4, Stream8Gbps: 4, RRPerS: 9000, RRP50us: 60, RRP99us: 99, ConnPerS: 1200, GatewayPeakRSSMiB: 14, AgentPeakRSSMiB: 11, CPUSecPerGB: 1.7},
		},
	}
	rep := newReport(samples, []float64{1.1, 1.3}, &Idle{BytesPerConn: 9000, GatewayBytesPerConn: 4000, AgentBytesPerConn: 5000, Conns: 10000})
	if got := rep.Paths[Yamux].Stream1Gbps; got != 3.5 {
		t.Errorf("median of two runs = %v, want 3.5", got)
	}
	if got := rep.Spread["yamux"]["conn_per_s"]; got != [2]float64{1000, 1200} {
		t.Errorf("spread = %v", got)
	}
	if _, ok := rep.Spread["direct"]["cpu_s_per_gb"]; ok {
		t.Error("direct has a CPU figure")
	}
	var b strings.Builder
	if err := rep.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	// Compare with the column padding collapsed to one space.
	flat := strings.Join(strings.Fields(out), " ")
	for _, want := range []string{
		"throughput, 1 stream (Gbit/s) direct 10.00 10.00–10.00 2.00 1.00",
		"yamux 3.50 3.00–4.00 0.70 0.35",
		"round trip p99 (µs) direct 20 20–20 0.50 1.00",
		"gateway peak RSS, 8 streams (MiB) yamux 13.0 12.0–14.0 - -",
		"throughput at 20 ms RTT, 1 stream (Gbit/s) yamux 1.20 1.10–1.30",
		"gateway 4000 B + agent 5000 B",
	} {
		if !strings.Contains(flat, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}
