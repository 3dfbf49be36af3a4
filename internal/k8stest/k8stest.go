// Package k8stest runs tests against a real kube-apiserver and etcd, started
// with controller-runtime's envtest from the binaries that
// scripts/k8s-test-env.sh builds (KUBEBUILDER_ASSETS names their folder), and
// isolates such tests in network, PID and mount namespaces of their own.
// It also sends objects as `kubectl apply --server-side` would (Applier)
// and reads manifests as kubectl and helm produce them (Decode,
// Kustomization).
//
// When KUBEBUILDER_ASSETS is not set, or the test does not run as root, the
// test is skipped, unless the environment variable CI is set: then it fails,
// so that CI cannot pass with these tests silently skipped.
//
// It is meant for tests only.
package k8stest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// isolatedEnv marks the re-run of a test inside its namespaces.
const isolatedEnv = "PORTWAY_K8STEST_ISOLATED"

// Isolate runs the calling top-level test again, in a child process inside
// new network, PID and mount namespaces (unshare --net --pid --mount-proc
// --fork --kill-child), and reports the child's result.
//
// In the parent it returns false once the child is done: the caller must
// return. In the child it brings up the namespace's loopback interface and
// returns true: the caller goes on with the test. Everything the test starts
// (apiserver, etcd, servers, gateway, agent) lives in those namespaces:
// traffic cannot leave the machine, and when the child ends, for whatever
// reason, the kernel kills every process left in its PID namespace.
func Isolate(t *testing.T) bool {
	t.Helper()
	if os.Getenv(isolatedEnv) == "1" {
		run(t, "ip", "link", "set", "lo", "up")
		return true
	}
	if strings.Contains(t.Name(), "/") {
		t.Fatalf("k8stest: Isolate must be called from a top-level test, not %s", t.Name())
	}
	assets(t)
	if os.Geteuid() != 0 {
		missing(t, "k8stest: creating network namespaces needs root")
	}
	unshare := lookPath(t, "unshare", "util-linux")
	lookPath(t, "ip", "iproute2")

	args := []string{"--net", "--pid", "--mount-proc", "--fork", "--kill-child", "--",
		os.Args[0], "-test.run=^" + regexp.QuoteMeta(t.Name()) + "$", "-test.v", "-test.count=1"}
	ctx := context.Background()
	if d, ok := t.Deadline(); ok {
		// Leave the parent time to report before go test's own timeout.
		d = d.Add(-15 * time.Second)
		args = append(args, "-test.timeout="+time.Until(d).Round(time.Second).String())
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.Add(5*time.Second))
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, unshare, args...)
	cmd.Env = append(os.Environ(), isolatedEnv+"=1")
	cmd.WaitDelay = 10 * time.Second
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	start := time.Now()
	err := cmd.Run()
	t.Logf("k8stest: isolated run of %s took %v; its output:\n%s", t.Name(), time.Since(start).Round(time.Millisecond), out.String())
	switch {
	case err != nil:
		t.Fatalf("k8stest: isolated run of %s failed: %v", t.Name(), err)
	case strings.Contains(out.String(), "--- SKIP: "+t.Name()+" "):
		t.Skipf("k8stest: %s skipped in its namespaces (see the log above)", t.Name())
	case !strings.Contains(out.String(), "--- PASS: "+t.Name()+" "):
		t.Fatalf("k8stest: the isolated run did not report %s as passed", t.Name())
	}
	return false
}

// AddAddress adds an address (CIDR notation, like "10.244.0.10/32") to the
// loopback interface. Only inside Isolate's namespaces: it would change the
// host's network otherwise.
func AddAddress(t testing.TB, cidr string) {
	t.Helper()
	if os.Getenv(isolatedEnv) != "1" {
		t.Fatalf("k8stest: AddAddress(%s) outside an isolated test", cidr)
	}
	run(t, "ip", "addr", "add", cidr, "dev", "lo")
}

// Env is a running kube-apiserver with etcd.
type Env struct {
	// Config is an admin client config (system:masters), asking for JSON,
	// which the Gateway API typed clients need.
	Config *rest.Config
	env    *envtest.Environment
}

// Start starts etcd and kube-apiserver from KUBEBUILDER_ASSETS, with no
// CRDs installed, and stops them when the test ends.
func Start(t testing.TB) *Env {
	t.Helper()
	dir := assets(t)
	env := &envtest.Environment{
		BinaryAssetsDirectory:    dir,
		ControlPlaneStartTimeout: 90 * time.Second,
		ControlPlaneStopTimeout:  30 * time.Second,
	}
	// The servers' output goes to files, shown when something fails.
	logDir := t.TempDir()
	apiLog := logFile(t, filepath.Join(logDir, "kube-apiserver.log"))
	etcdLog := logFile(t, filepath.Join(logDir, "etcd.log"))
	api := env.ControlPlane.GetAPIServer()
	api.Out, api.Err = apiLog, apiLog
	// In a network namespace without a default route the apiserver cannot
	// pick an address to advertise by itself.
	api.Configure().Set("advertise-address", "127.0.0.1")
	env.ControlPlane.Etcd = &envtest.Etcd{Out: etcdLog, Err: etcdLog}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("---- tail of kube-apiserver log ----\n%s", tail(apiLog.Name(), 40))
			t.Logf("---- tail of etcd log ----\n%s", tail(etcdLog.Name(), 20))
		}
	})
	begin := time.Now()
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("k8stest: starting kube-apiserver and etcd from %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("k8stest: stopping kube-apiserver and etcd: %v", err)
		}
	})
	t.Logf("k8stest: kube-apiserver up at %s in %v", cfg.Host, time.Since(begin).Round(time.Millisecond))
	cfg = rest.CopyConfig(cfg)
	// envtest's config asks for protobuf, which the Gateway API types do
	// not implement.
	cfg.ContentType = runtime.ContentTypeJSON
	cfg.AcceptContentTypes = runtime.ContentTypeJSON
	cfg.QPS, cfg.Burst = 100, 200
	return &Env{Config: cfg, env: env}
}

// Kubeconfig writes an admin kubeconfig for the apiserver to a temporary
// file and returns its path.
func (e *Env) Kubeconfig(t testing.TB) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(p, e.env.KubeConfig, 0o600); err != nil {
		t.Fatalf("k8stest: %v", err)
	}
	return p
}

// InstallGatewayAPI installs the Gateway API's experimental-channel CRDs
// (TCPRoute and UDPRoute included) from the sigs.k8s.io/gateway-api module
// this repository requires, and waits until they are served.
func (e *Env) InstallGatewayAPI(t testing.TB) {
	t.Helper()
	begin := time.Now()
	files := GatewayAPICRDs(t)
	if _, err := envtest.InstallCRDs(e.Config, envtest.CRDInstallOptions{Paths: files, ErrorIfPathMissing: true}); err != nil {
		t.Fatalf("k8stest: installing Gateway API CRDs: %v", err)
	}
	t.Logf("k8stest: %d Gateway API CRDs installed in %v", len(files), time.Since(begin).Round(time.Millisecond))
}

// GatewayAPICRDs lists the CRD files of the Gateway API's experimental
// channel: config/crd/experimental/gateway.networking.k8s.io_*.yaml of the
// module, less the files that hold no CRD (an admission policy).
func GatewayAPICRDs(t testing.TB) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/gateway-api").Output()
	if err != nil {
		t.Fatalf("k8stest: locating the sigs.k8s.io/gateway-api module: %v", err)
	}
	dir := filepath.Join(strings.TrimSpace(string(out)), "config", "crd", "experimental")
	matches, err := filepath.Glob(filepath.Join(dir, "gateway.networking.k8s.io_*.yaml"))
	if err != nil || len(matches) == 0 {
		t.Fatalf("k8stest: no Gateway API CRDs in %s (%v)", dir, err)
	}
	var files []string
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil {
			t.Fatalf("k8stest: %v", err)
		}
		if bytes.Contains(b, []byte("\nkind: CustomResourceDefinition\n")) {
			files = append(files, m)
		}
	}
	return files
}

// assets returns KUBEBUILDER_ASSETS after checking that it holds the
// binaries.
func assets(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	if dir == "" {
		missing(t, "k8stest: KUBEBUILDER_ASSETS is not set; run: export KUBEBUILDER_ASSETS=\"$(scripts/k8s-test-env.sh)\" (scripts/test.sh does this)")
	}
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if fi, err := os.Stat(filepath.Join(dir, b)); err != nil || fi.Mode().Perm()&0o111 == 0 {
			missing(t, fmt.Sprintf("k8stest: KUBEBUILDER_ASSETS=%s has no executable %s; run scripts/k8s-test-env.sh", dir, b))
		}
	}
	return dir
}

// missing fails (CI set) or skips the test.
func missing(t testing.TB, msg string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

func lookPath(t testing.TB, name, debianPackage string) string {
	t.Helper()
	for _, p := range []string{name, "/usr/sbin/" + name, "/sbin/" + name} {
		if abs, err := exec.LookPath(p); err == nil {
			return abs
		}
	}
	missing(t, fmt.Sprintf("k8stest: %s not found (Debian package %s; run scripts/install-test-deps.sh)", name, debianPackage))
	return ""
}

func logFile(t testing.TB, path string) *os.File {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatalf("k8stest: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, lookPath(t, name, "iproute2"), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("k8stest: %s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}
