package bench_test

import (
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/bench"
)

// The forwarded path runs etcd, two gateway replicas and an agent holding
// a session to one of them, and measures through the other: every figure
// comes out positive, and nothing is left behind.
func TestBenchForwarded(t *testing.T) {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir == "" {
		if _, err := exec.LookPath("etcd"); err != nil {
			t.Skip("no etcd: export KUBEBUILDER_ASSETS=\"$(scripts/k8s-test-env.sh)\"")
		}
	}
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	marker := "BENCH_TEST_MARKER=" + rand.Text()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := bench.Run(ctx, bench.Options{
		Runs: 1, Duration: 200 * time.Millisecond, Paths: []bench.Path{bench.Forwarded}, SkipRTT: true, SkipIdle: true, SkipAgents: true,
		Exec: bench.Exec{Path: exe, Env: []string{childEnv + "=1", marker}},
	})
	if err != nil {
		t.Fatal(err)
	}
	f, ok := rep.Paths[bench.Forwarded]
	if !ok {
		t.Fatalf("no forwarded figures; notes %v", rep.Notes)
	}
	for name, v := range map[string]float64{"stream1_gbps": f.Stream1Gbps, "stream8_gbps": f.Stream8Gbps,
		"rr_per_s": f.RRPerS, "rr_p99_us": f.RRP99us, "conn_per_s": f.ConnPerS} {
		if !(v > 0) {
			t.Errorf("forwarded %s = %v, want a positive number", name, v)
		}
	}
	checkCleanedUp(t, tmp, marker)
}

// Without an etcd binary the forwarded path is skipped with a note saying
// what it needs; the other paths are measured.
func TestBenchForwardedSkippedWithoutEtcd(t *testing.T) {
	t.Setenv("KUBEBUILDER_ASSETS", "")
	t.Setenv("PATH", t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := bench.Run(ctx, bench.Options{
		Runs: 1, Duration: 50 * time.Millisecond, Paths: []bench.Path{bench.Direct, bench.Forwarded}, SkipRTT: true, SkipIdle: true, SkipAgents: true,
		Exec: bench.Exec{Path: filepath.Join(t.TempDir(), "unused")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := rep.Paths[bench.Forwarded]; ok {
		t.Error("forwarded measured without etcd")
	}
	if _, ok := rep.Paths[bench.Direct]; !ok {
		t.Error("direct not measured")
	}
	if len(rep.Notes) != 1 || !strings.Contains(rep.Notes[0], "forwarded path skipped") || !strings.Contains(rep.Notes[0], "etcd") {
		t.Errorf("notes %q, want one saying the forwarded path needs etcd", rep.Notes)
	}
}
