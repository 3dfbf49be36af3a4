package deploytest

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/portway/portway/internal/k8stest"
)

// renderedEnv names the folder where the parent test leaves the rendered
// scenarios for its isolated re-run: that one runs in a network namespace
// of its own, where helm could not be built if it had to be.
const renderedEnv = "PORTWAY_DEPLOYTEST_RENDERED"

// helmEnv passes the path of the built helm to the isolated re-run.
const helmEnv = "PORTWAY_DEPLOYTEST_HELM"

// TestChartsDryRun renders both charts with every scenario's values and
// sends every object to a real kube-apiserver as a server-side apply with
// dryRun=All: the API server's own validation (schemas, field values,
// defaults) accepts each one. ServiceMonitors are the exception: their CRD
// (prometheus-operator's) is not installed here, so they are left out of
// the dry run; TestGatewayChart and TestAgentChart check that they select
// the metrics Service and its port.
func TestChartsDryRun(t *testing.T) {
	dir := os.Getenv(renderedEnv)
	if dir == "" {
		dir = t.TempDir()
		bin := helmBinary(t)
		t.Setenv(helmEnv, bin)
		for _, s := range scenarios() {
			out, err := helm(t, bin, templateArgs(t, s)...)
			if err != nil {
				t.Fatalf("%s: %v", s.name, err)
			}
			if err := os.WriteFile(filepath.Join(dir, s.name+".yaml"), []byte(out), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		t.Setenv(renderedEnv, dir)
	}
	if !k8stest.Isolate(t) {
		return
	}
	env := k8stest.Start(t)
	ap := k8stest.NewApplier(t, env.Config)
	skipped := 0
	for _, s := range scenarios() {
		b, err := os.ReadFile(filepath.Join(dir, s.name+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		// The namespace must exist for a namespaced dry run: that one is
		// created for real.
		ns := &unstructured.Unstructured{Object: obj{"apiVersion": "v1", "kind": "Namespace", "metadata": obj{"name": s.namespace}}}
		ap.Apply(t, ns, false)
		n := 0
		for _, o := range k8stest.Decode(t, s.name, string(b)) {
			if o.GetKind() == "ServiceMonitor" {
				skipped++
				continue
			}
			if o.GetNamespace() == "" && o.GetKind() != "ClusterRole" && o.GetKind() != "ClusterRoleBinding" {
				t.Errorf("%s: %s %s has no namespace: kubectl apply of helm template's output would put it in the current one", s.name, o.GetKind(), o.GetName())
			}
			ap.Apply(t, o, true)
			n++
		}
		t.Logf("%s: %d objects pass the dry run", s.name, n)
	}
	if skipped == 0 {
		t.Error("no scenario rendered a ServiceMonitor")
	}

	t.Run("helm install keeps the admin token and prints how to use it", func(t *testing.T) {
		// A token from an earlier install: an upgrade must not replace it,
		// or every `portway status` user is locked out.
		const kept = "kept-admin-token-0123456789"
		secret := &unstructured.Unstructured{Object: obj{
			"apiVersion": "v1", "kind": "Secret",
			"metadata": obj{
				"name": "portway-gateway-admin", "namespace": "portway",
				// What helm marks its objects with: the Secret of an
				// earlier install of this release.
				"labels":      obj{"app.kubernetes.io/managed-by": "Helm"},
				"annotations": obj{"meta.helm.sh/release-name": "portway-gateway", "meta.helm.sh/release-namespace": "portway"},
			},
			"data": obj{"token": base64.StdEncoding.EncodeToString([]byte(kept))},
		}}
		ap.Apply(t, secret, false)
		out, err := helm(t, os.Getenv(helmEnv), "install", "portway-gateway", filepath.Join(chartsDir, gwChart),
			"--namespace", "portway", "--dry-run=server", "--kubeconfig", env.Kubeconfig(t))
		if err != nil {
			t.Fatal(err)
		}
		manifest, notes, ok := strings.Cut(out, "\nNOTES:\n")
		_, manifest, _ = strings.Cut(manifest, "\nMANIFEST:\n")
		if !ok || manifest == "" {
			t.Fatalf("helm install printed no manifest and notes:\n%s", out)
		}
		objs := k8stest.Decode(t, "helm install", manifest)
		if got := dataOf(t, objs, "Secret", "portway-gateway-admin")["token"]; got != kept {
			t.Errorf("the admin token was replaced on upgrade: %q", got)
		}
		for _, want := range []string{
			"wss://gateway.example.com:8443/v1/tunnel",
			"No public ports are listed in publicService.ports",
			"No agents are configured",
			"kubectl -n portway port-forward svc/portway-gateway-admin 9000",
			"get secret portway-gateway-admin -o jsonpath='{.data.token}'",
		} {
			if !strings.Contains(notes, want) {
				t.Errorf("NOTES lack %q:\n%s", want, notes)
			}
		}
	})
}
