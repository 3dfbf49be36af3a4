package bench_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/bench"
	"github.com/portway/portway/internal/cli"
)

// childEnv makes this test binary act as the portway binary: the bench
// re-executes os.Executable() to run the gateway and the agent, which in a
// test is the test binary. "1" runs portway; "crash-agent" runs it too, but
// an agent exits abruptly after crashAfter. (No PORTWAY_ prefix: the bench
// strips those from its children's environment.)
const childEnv = "BENCH_TEST_AS_PORTWAY"

const crashAfter = time.Second

func TestMain(m *testing.M) {
	mode := os.Getenv(childEnv)
	if mode == "" {
		os.Exit(m.Run())
	}
	if mode == "crash-agent" && len(os.Args) > 1 && os.Args[1] == "agent" {
		time.AfterFunc(crashAfter, func() {
			fmt.Fprintln(os.Stderr, "simulated agent crash")
			os.Exit(3)
		})
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], "bench-test", os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// TestBenchJSON runs `portway bench --json` with tiny durations over all
// six paths, the 20 ms RTT case and a few idle connections, as a user
// would, and checks the shape of the object and that every figure is
// positive. It asserts nothing about speed.
func TestBenchJSON(t *testing.T) {
	t.Setenv(childEnv, "1")
	idle := "300"
	if testing.Short() {
		idle = "100"
	}
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := []string{"bench", "--json", "--runs", "1", "--duration", "100ms", "--idle-conns", idle, "--skip-agents", "--log-level", "warn"}
	if code := cli.Main(ctx, args, "test", &stdout, &stderr); code != 0 {
		t.Fatalf("portway bench exited %d\nstderr:\n%s", code, stderr.String())
	}

	var got struct {
		Paths   map[string]map[string]float64 `json:"paths"`
		RTT20ms map[string]float64            `json:"rtt20ms"`
		Idle10k map[string]float64            `json:"idle10k"`
	}
	dec := json.NewDecoder(&stdout)
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("output is not one JSON object: %v\n%s", err, stdout.String())
	}
	if dec.More() {
		t.Fatalf("output holds more than one JSON value")
	}
	common := []string{"stream1_gbps", "stream8_gbps", "rr_per_s", "rr_p50_us", "rr_p99_us", "conn_per_s"}
	tunnelOnly := []string{"gateway_peak_rss_mib", "agent_peak_rss_mib", "gateway_peak_private_mib", "agent_peak_private_mib", "cpu_s_per_gb", "cpu_us_per_rt"}
	for _, path := range []string{"direct", "relay", "relay-process", "yamux", "wss", "json"} {
		f, ok := got.Paths[path]
		if !ok {
			t.Errorf("paths.%s missing", path)
			continue
		}
		want := common
		if path == "yamux" || path == "wss" || path == "json" {
			want = append(append([]string(nil), common...), tunnelOnly...)
		} else {
			for _, k := range tunnelOnly {
				if _, ok := f[k]; ok {
					t.Errorf("paths.%s.%s present: only tunnel paths have gateway and agent figures", path, k)
				}
			}
		}
		for _, k := range want {
			if v, ok := f[k]; !ok || !(v > 0) || math.IsInf(v, 0) {
				t.Errorf("paths.%s.%s = %v (present: %v), want a positive finite number", path, k, v, ok)
			}
		}
		// Private memory is part of RSS at every moment, so its peak
		// cannot exceed the RSS peak.
		for _, side := range []string{"gateway", "agent"} {
			if priv, rss := f[side+"_peak_private_mib"], f[side+"_peak_rss_mib"]; priv > rss {
				t.Errorf("paths.%s: %s peak private memory %.1f MiB above its peak RSS %.1f MiB", path, side, priv, rss)
			}
		}
	}
	if v := got.RTT20ms["yamux_stream1_gbps"]; !(v > 0) {
		t.Errorf("rtt20ms.yamux_stream1_gbps = %v, want a positive number", v)
	}
	if v := got.Idle10k["bytes_per_conn"]; !(v > 0) {
		t.Errorf("idle10k.bytes_per_conn = %v, want a positive number", v)
	}
	if t.Failed() {
		t.Logf("output:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	}
}

// TestBenchAgentsStorm runs the many-agents case at a small scale, as a
// user would with `portway bench --only agents`: 300 simulated agents
// (real agent code, in a child process) register with a real gateway
// process, then all but one are dropped at once and must all register
// again, through the gateway's admission control, while the one left
// connected and a client connection through it are untouched (the bench
// fails otherwise). It asserts nothing about speed beyond a hang guard.
func TestBenchAgentsStorm(t *testing.T) {
	t.Setenv(childEnv, "1")
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := []string{"bench", "--only", "agents", "--agents", "300", "--json", "--duration", "100ms", "--log-level", "warn"}
	if code := cli.Main(ctx, args, "test", &stdout, &stderr); code != 0 {
		t.Fatalf("portway bench exited %d\nstderr:\n%s", code, stderr.String())
	}
	var got struct {
		Agents map[string]any `json:"agents10k"`
		Notes  []string       `json:"notes"`
	}
	if err := json.NewDecoder(&stdout).Decode(&got); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, stdout.String())
	}
	if n, _ := got.Agents["agents"].(float64); n != 300 && len(got.Notes) == 0 {
		t.Errorf("agents10k.agents = %v without a note saying why not 300", got.Agents["agents"])
	}
	for _, k := range []string{"gateway_bytes_per_agent", "gateway_rss_mib", "register_per_s", "storm_recover_s",
		"storm_peak_rss_mib", "storm_peak_goroutines", "heartbeat_cpu_ms_per_s_per_1k"} {
		if v, ok := got.Agents[k].(float64); !ok || !(v > 0) {
			t.Errorf("agents10k.%s = %v, want a positive number", k, got.Agents[k])
		}
	}
	if v, ok := got.Agents["storm_deferred"].(float64); !ok || v < 0 {
		t.Errorf("agents10k.storm_deferred = %v", got.Agents["storm_deferred"])
	}
	if t.Failed() {
		t.Logf("output:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	}
}

// TestChildDeathFailsTheBench kills the agent in the middle of a
// measurement: the bench must fail at once with the agent's log, and leave
// no process and no file behind.
func TestChildDeathFailsTheBench(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	marker := "BENCH_TEST_MARKER=" + rand.Text()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = bench.Run(ctx, bench.Options{
		Runs: 1, Duration: 5 * time.Second, Paths: []bench.Path{bench.Yamux}, SkipRTT: true, SkipIdle: true, SkipAgents: true,
		Exec: bench.Exec{Path: exe, Env: []string{childEnv + "=crash-agent", marker}},
	})
	if err == nil {
		t.Fatal("bench succeeded although its agent died")
	}
	for _, want := range []string{"agent ended unexpectedly", "exit status 3", "simulated agent crash"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	checkCleanedUp(t, tmp, marker)
}

// TestInterruptCleansUp cancels the bench in the middle of a run, as
// Ctrl-C does: it must return promptly and leave nothing behind.
func TestInterruptCleansUp(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	marker := "BENCH_TEST_MARKER=" + rand.Text()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(1500*time.Millisecond, cancel)
	_, err = bench.Run(ctx, bench.Options{
		Runs: 1, Duration: 10 * time.Second, Paths: []bench.Path{bench.Yamux}, SkipRTT: true, SkipIdle: true, SkipAgents: true,
		Exec: bench.Exec{Path: exe, Env: []string{childEnv + "=1", marker}},
	})
	if err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Fatalf("err = %v, want the interruption", err)
	}
	checkCleanedUp(t, tmp, marker)
}

// checkCleanedUp fails unless the bench's temporary directory is gone and
// no process carries marker in its environment.
func checkCleanedUp(t *testing.T, tmp, marker string) {
	t.Helper()
	if left, _ := filepath.Glob(filepath.Join(tmp, "*")); len(left) > 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
	pids, _ := filepath.Glob("/proc/[0-9]*/environ")
	for _, p := range pids {
		env, err := os.ReadFile(p)
		if err == nil && bytes.Contains(env, []byte(marker)) {
			t.Errorf("child process left running: %s", filepath.Dir(p))
		}
	}
}
