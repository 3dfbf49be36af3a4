package deploytest

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/k8stest"
)

const (
	helmScript = "../../scripts/helm.sh"
	chartsDir  = "../../deploy/helm"
	gwChart    = "portway-gateway"
	agentChart = "portway-agent"
	// helmTimeout bounds one helm run; the first one builds helm.
	helmTimeout = 10 * time.Minute
)

// scenario is one set of values a chart is rendered with.
type scenario struct {
	name      string
	chart     string
	release   string
	namespace string
	values    map[string]any
}

// obj is shorthand for the values' nested maps.
type obj = map[string]any

// scenarios are the value sets every check runs over: the defaults, and
// every optional part switched on at least once.
func scenarios() []scenario {
	return []scenario{
		{name: "gateway-defaults", chart: gwChart, release: "portway-gateway", namespace: "portway"},
		{name: "gateway-full", chart: gwChart, release: "edge", namespace: "tunnels", values: obj{
			"image":   obj{"repository": "registry.test/portway", "tag": "1.2.3"},
			"gateway": obj{"publicHost": "gw.test", "portRange": "15000-16999", "logLevel": "debug"},
			"agents": []any{
				obj{"name": "prod-eu", "tokenSHA256": strings.Repeat("Ab", 32)},
				obj{"name": "staging.b", "existingSecret": "staging-token", "existingSecretKey": "tok"},
				obj{"name": "dev", "token": "dev-token-0123456789abcdef", "maxServices": 5},
			},
			"publicService": obj{"ports": []any{
				obj{"port": 15432, "protocol": "TCP"}, obj{"port": 16379},
				obj{"port": 15353, "protocol": "UDP"}, obj{"port": 15353, "protocol": "TCP"},
			}},
			"persistence":    obj{"storageClass": "fast", "size": "2Gi"},
			"networkPolicy":  obj{"enabled": true},
			"serviceMonitor": obj{"enabled": true},
			"config":         obj{"max_services": 50, "port_retention": "48h"},
			"admin":          obj{"existingSecret": "my-admin", "existingSecretKey": "admin-token"},
		}},
		{name: "gateway-ephemeral", chart: gwChart, release: "pw", namespace: "portway", values: obj{
			"gateway":             obj{"insecure": true},
			"tls":                 obj{"secretName": ""},
			"persistence":         obj{"enabled": false},
			"podDisruptionBudget": obj{"enabled": false},
			"agents":              []any{obj{"name": "a", "existingSecret": "a-token"}},
		}},
		{name: "gateway-cluster", chart: gwChart, release: "portway-gateway", namespace: "portway-ha", values: obj{
			"cluster": obj{
				"enabled": true, "replicas": 3, "port": 7946,
				"etcd": obj{
					"endpoints":      []any{"https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"},
					"prefix":         "/pw/",
					"tls":            obj{"secretName": "etcd-client"},
					"username":       "portway",
					"passwordSecret": obj{"name": "etcd-password"},
				},
				"tokenSecret": obj{"name": "cluster-token"},
			},
			"agents":         []any{obj{"name": "prod", "tokenSHA256": strings.Repeat("0f", 32)}},
			"publicService":  obj{"ports": []any{obj{"port": 10000}}},
			"networkPolicy":  obj{"enabled": true},
			"serviceMonitor": obj{"enabled": true},
		}},
		{name: "agent-defaults", chart: agentChart, release: "portway-agent", namespace: "pipeops-system"},
		{name: "agent-full", chart: agentChart, release: "edge", namespace: "tunnels", values: obj{
			"image":               obj{"repository": "registry.test/portway", "tag": "1.2.3"},
			"gateway":             obj{"url": "wss://gw.test:8443/v1/tunnel", "protocol": "yamux", "caSecret": obj{"name": "gw-ca"}, "serverName": "gw.internal"},
			"token":               obj{"value": "agent-token-0123456789abcdef"},
			"serviceAccount":      obj{"name": "tunnel-agent"},
			"metrics":             obj{"port": 9191},
			"serviceMonitor":      obj{"enabled": true},
			"networkPolicy":       obj{"enabled": true},
			"podDisruptionBudget": obj{"enabled": true},
			"replicaCount":        2,
		}},
		{name: "agent-replicas", chart: agentChart, release: "portway-agent", namespace: "pipeops-system", values: obj{
			"gateway": obj{"url": "", "urls": []any{"wss://gw-1.test:8443/v1/tunnel", "wss://gw-2.test:8443/v1/tunnel"}, "connections": 2},
		}},
	}
}

// helmBinary builds the pinned helm (scripts/helm.sh) if need be and
// returns its path.
func helmBinary(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), helmTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", helmScript, "--path")
	cmd.WaitDelay = 10 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("building helm (scripts/helm.sh): %v: %s", err, stderr.String())
	}
	bin := strings.TrimSpace(string(out))
	if fi, err := os.Stat(bin); err != nil || fi.Mode().Perm()&0o111 == 0 {
		t.Fatalf("scripts/helm.sh --path printed %q, not an executable (%v)", bin, err)
	}
	return bin
}

// helm runs helm and returns its standard output; a failure's error
// carries its standard error.
func helm(t *testing.T, bin string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.WaitDelay = 10 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("helm %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

// valuesFile writes values as a file for helm's -f (JSON is YAML).
func valuesFile(t *testing.T, values map[string]any) string {
	t.Helper()
	if values == nil {
		values = obj{}
	}
	b, err := json.Marshal(values)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "values.json")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// templateArgs are the arguments of `helm template` for a scenario.
func templateArgs(t *testing.T, s scenario) []string {
	return []string{"template", s.release, filepath.Join(chartsDir, s.chart), "--namespace", s.namespace, "-f", valuesFile(t, s.values)}
}

// render renders a scenario into its objects.
func render(t *testing.T, bin string, s scenario) []*unstructured.Unstructured {
	t.Helper()
	out, err := helm(t, bin, templateArgs(t, s)...)
	if err != nil {
		t.Fatalf("%s: %v", s.name, err)
	}
	return k8stest.Decode(t, s.name, out)
}

// find returns the objects of a kind, and fails when their number is not
// want (want < 0: any number).
func find(t *testing.T, objs []*unstructured.Unstructured, kind string, want int) []*unstructured.Unstructured {
	t.Helper()
	var out []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == kind {
			out = append(out, o)
		}
	}
	if want >= 0 && len(out) != want {
		t.Fatalf("%d %s rendered, want %d", len(out), kind, want)
	}
	return out
}

func named(t *testing.T, objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	t.Fatalf("no %s %q rendered", kind, name)
	return nil
}

// TestHelmLint runs `helm lint --strict` over both charts with every
// scenario's values.
func TestHelmLint(t *testing.T) {
	bin := helmBinary(t)
	for _, s := range scenarios() {
		out, err := helm(t, bin, "lint", "--strict", filepath.Join(chartsDir, s.chart), "--namespace", s.namespace, "-f", valuesFile(t, s.values))
		if err != nil {
			t.Errorf("%s: %v\n%s", s.name, err, out)
		}
	}
}

// TestChartsRefuseBadValues: a mistake in the values stops the rendering
// with a message that names the key.
func TestChartsRefuseBadValues(t *testing.T) {
	bin := helmBinary(t)
	gwAgents := func(a ...any) obj { return obj{"agents": a} }
	for _, c := range []struct {
		name, chart string
		values      map[string]any
		want        string
	}{
		{"sha256sum output pasted whole", gwChart, gwAgents(obj{"name": "a", "tokenSHA256": strings.Repeat("ab", 32) + "  -"}), "agents[0].tokenSHA256 must be 64 hex digits"},
		{"two token sources", gwChart, gwAgents(obj{"name": "a", "token": "0123456789abcdefgh", "existingSecret": "s"}), "agents[0] (a): set exactly one of"},
		{"no token source", gwChart, gwAgents(obj{"name": "a"}), "agents[0] (a): set exactly one of"},
		{"agent without a name", gwChart, gwAgents(obj{"tokenSHA256": strings.Repeat("ab", 32)}), "agents[0].name is required"},
		{"public port outside the range", gwChart, obj{"publicService": obj{"ports": []any{obj{"port": 5432}}}}, "publicService.ports[0].port 5432 is outside gateway.portRange"},
		{"public port listed twice", gwChart, obj{"publicService": obj{"ports": []any{obj{"port": 10001}, obj{"port": 10001, "protocol": "TCP"}}}}, "publicService.ports[1]: tcp-10001 listed twice"},
		{"public port protocol", gwChart, obj{"publicService": obj{"ports": []any{obj{"port": 10001, "protocol": "SCTP"}}}}, `publicService.ports[0].protocol "SCTP"`},
		{"no public host", gwChart, obj{"gateway": obj{"publicHost": ""}}, "gateway.publicHost is required"},
		{"port range", gwChart, obj{"gateway": obj{"portRange": "10000"}}, `gateway.portRange "10000"`},
		{"neither TLS nor insecure", gwChart, obj{"tls": obj{"secretName": ""}}, "tls.secretName is required"},
		{"cluster without etcd", gwChart, obj{"cluster": obj{"enabled": true}}, "cluster.etcd.endpoints is required"},
		{"agent without a gateway", agentChart, obj{"gateway": obj{"url": ""}}, "gateway.url is required"},
		{"agent without a token", agentChart, obj{"token": obj{"existingSecret": ""}}, "token.existingSecret"},
	} {
		s := scenario{name: c.name, chart: c.chart, release: "r", namespace: "n", values: c.values}
		_, err := helm(t, bin, templateArgs(t, s)...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: want an error containing %q, got %v", c.name, c.want, err)
		}
	}
}

// TestGatewayChart checks what the gateway chart renders: gateway.yaml is
// accepted by the gateway's own config validation with the files and
// environment the pod would have, the Services, probes and ports agree with
// it, and the pod runs locked down.
func TestGatewayChart(t *testing.T) {
	bin := helmBinary(t)
	for _, s := range scenarios() {
		if s.chart != gwChart {
			continue
		}
		t.Run(s.name, func(t *testing.T) {
			objs := render(t, bin, s)
			dep := find(t, objs, "Deployment", 1)[0]
			pod, ctr := podOf(t, dep, "gateway")
			checkLockedDown(t, pod, ctr)
			checkImage(t, s, ctr)
			cluster := nested[bool](s.values, "cluster", "enabled")

			root := t.TempDir()
			cfgPath := materialize(t, objs, pod, ctr, root)
			raw, err := os.ReadFile(cfgPath)
			if err != nil {
				t.Fatal(err)
			}
			// The pod's paths, moved under root.
			text := strings.ReplaceAll(string(raw), "/etc/portway/", root+"/etc/portway/")
			env := envOf(t, objs, ctr)
			if cluster {
				text = checkClusterBlock(t, s, text, root)
			}
			cfg, err := config.ParseGateway([]byte(text), func(k string) string { return env[k] })
			if err != nil {
				t.Fatalf("gateway.yaml is refused by the gateway's validation: %v\n%s", err, raw)
			}

			// Tokens: each agent's, from its source.
			agents := sliceOf(s.values, "agents")
			if len(cfg.Agents) != len(agents) {
				t.Fatalf("%d agents in gateway.yaml, want %d", len(cfg.Agents), len(agents))
			}
			for i, a := range agents {
				a := a.(obj)
				got := cfg.Agents[i]
				switch {
				case a["tokenSHA256"] != nil:
					if got.TokenSHA256 != strings.ToLower(a["tokenSHA256"].(string)) || got.Token != "" {
						t.Errorf("agent %s: token_sha256 %q, token %q", got.Name, got.TokenSHA256, got.Token)
					}
				case a["token"] != nil:
					if got.Token != a["token"] {
						t.Errorf("agent %s: the token from the chart's Secret did not reach the gateway (got %q)", got.Name, got.Token)
					}
				default:
					if !strings.HasPrefix(got.Token, "placeholder:"+a["existingSecret"].(string)+"/") {
						t.Errorf("agent %s: the token from Secret %v did not reach the gateway (got %q)", got.Name, a["existingSecret"], got.Token)
					}
				}
				if m, ok := a["maxServices"]; ok && got.MaxServices != int(m.(int)) {
					t.Errorf("agent %s: max_services %d, want %v", got.Name, got.MaxServices, m)
				}
			}
			if cfg.Admin.Token == "" {
				t.Error("no admin token reaches the gateway")
			}
			for k, v := range nestedMap(s.values, "config") {
				if !strings.Contains(string(raw), k+": ") {
					t.Errorf("config.%s=%v is not in gateway.yaml", k, v)
				}
			}

			// Ports: the config's listeners are the container's named ports,
			// the probes hit the admin listener.
			tunnelPort := portNumber(t, cfg.Listen)
			adminPort := portNumber(t, cfg.Admin.Listen)
			if p := containerPort(t, ctr, "tunnel"); p != tunnelPort {
				t.Errorf("container port tunnel=%d, gateway listens on %d", p, tunnelPort)
			}
			if p := containerPort(t, ctr, "admin"); p != adminPort {
				t.Errorf("container port admin=%d, admin listens on %d", p, adminPort)
			}
			checkProbes(t, ctr, "admin")
			svc := named(t, objs, "Service", dep.GetName())
			checkServicePorts(t, svc, ctr, map[string]int{"tunnel": tunnelPort})
			admin := named(t, objs, "Service", dep.GetName()+"-admin")
			checkServicePorts(t, admin, ctr, map[string]int{"admin": adminPort})

			// Public ports: the Service lists exactly the values' ports, and
			// each lies in the range the gateway allocates from.
			lo, hi := cfg.PortBounds()
			wantPublic := sliceOf(s.values, "publicService", "ports")
			publics := 0
			for _, o := range find(t, objs, "Service", -1) {
				if o.GetName() != dep.GetName()+"-public" {
					continue
				}
				publics++
				ports, _, _ := unstructured.NestedSlice(o.Object, "spec", "ports")
				if len(ports) != len(wantPublic) {
					t.Errorf("public Service has %d ports, want %d", len(ports), len(wantPublic))
				}
				for _, p := range ports {
					n := int(p.(obj)["port"].(int64))
					if n < lo || n > hi {
						t.Errorf("public port %d outside %d-%d", n, lo, hi)
					}
					if p.(obj)["targetPort"] != p.(obj)["port"] {
						t.Errorf("public port %v targets %v: the gateway listens on the port it allocated", p.(obj)["port"], p.(obj)["targetPort"])
					}
				}
				checkSelects(t, o, dep)
			}
			if want := min(len(wantPublic), 1); publics != want {
				t.Errorf("%d public Services, want %d", publics, want)
			}
			checkSelects(t, svc, dep)
			checkSelects(t, admin, dep)

			// State: one replica on a volume of its own, or replicas in etcd.
			replicas, _, _ := unstructured.NestedInt64(dep.Object, "spec", "replicas")
			strategy, _, _ := unstructured.NestedString(dep.Object, "spec", "strategy", "type")
			if cluster {
				if replicas != 3 || find(t, objs, "PersistentVolumeClaim", 0) != nil {
					t.Errorf("cluster: %d replicas, want 3 without a PersistentVolumeClaim", replicas)
				}
				// Kubernetes expands $(POD_IP) only from a variable defined
				// before.
				names := []string{}
				list, _, _ := unstructured.NestedSlice(ctr, "env")
				for _, e := range list {
					names = append(names, e.(obj)["name"].(string))
				}
				if i, j := slices.Index(names, "POD_IP"), slices.Index(names, "PORTWAY_CLUSTER_ADVERTISE"); i < 0 || j < i ||
					env["PORTWAY_CLUSTER_ADVERTISE"] != "$(POD_IP):7946" || containerPort(t, ctr, "cluster") != 7946 {
					t.Errorf("cluster: the advertised address is not the pod's: env %v", env)
				}
				if env["PORTWAY_CLUSTER_TOKEN"] != "placeholder:cluster-token/token" || env["PORTWAY_ETCD_PASSWORD"] != "placeholder:etcd-password/password" {
					t.Errorf("cluster: the cluster token and etcd password do not come from their Secrets: env %v", env)
				}
				// Replicas that lost etcd fail /readyz but keep serving
				// their ports: the public Service must keep them.
				for _, svc := range find(t, objs, "Service", -1) {
					pnr, _, _ := unstructured.NestedBool(svc.Object, "spec", "publishNotReadyAddresses")
					if public := strings.HasSuffix(svc.GetName(), "-public"); pnr != public {
						t.Errorf("cluster: Service %s publishNotReadyAddresses %v, want %v", svc.GetName(), pnr, public)
					}
				}
			} else {
				if replicas != 1 || strategy != "Recreate" {
					t.Errorf("%d replicas, strategy %q: want 1, Recreate (one state file)", replicas, strategy)
				}
				checkWritable(t, pod, ctr, filepath.Dir(cfg.StateFile))
				claims := find(t, objs, "PersistentVolumeClaim", -1)
				persistent := nested[bool](s.values, "persistence", "enabled") || nested[any](s.values, "persistence", "enabled") == nil
				if persistent != (len(claims) == 1) {
					t.Errorf("persistence %v, %d claims rendered", persistent, len(claims))
				}
				if persistent && volumeSource(t, pod, "state", "persistentVolumeClaim", "claimName") != claims[0].GetName() {
					t.Error("the state volume is not the rendered claim")
				}
			}

			checkOptional(t, s, objs, admin)
		})
	}
}

// checkClusterBlock checks the cluster: block rendered for the scale-out
// build. A build without cluster support refuses the key, so for such a
// build it is checked here and cut before the gateway's validation looks at
// the rest; a build with it validates the whole file.
func checkClusterBlock(t *testing.T, s scenario, text, root string) string {
	t.Helper()
	var m map[string]any
	if err := yaml.Unmarshal([]byte(text), &m); err != nil {
		t.Fatal(err)
	}
	if _, ok := m["state_file"]; ok {
		t.Error("cluster: gateway.yaml still names a state_file")
	}
	etcd := nestedMap(m, "cluster", "etcd")
	want := nestedMap(s.values, "cluster", "etcd")
	if !reflect.DeepEqual(etcd["endpoints"], want["endpoints"]) || etcd["prefix"] != want["prefix"] || etcd["username"] != want["username"] {
		t.Errorf("cluster.etcd in gateway.yaml = %v, want the values' %v", etcd, want)
	}
	tls, _ := etcd["tls"].(obj)
	for _, k := range []string{"ca_file", "cert_file", "key_file"} {
		f, _ := tls[k].(string)
		if _, err := os.Stat(f); err != nil || !strings.HasPrefix(f, root) {
			t.Errorf("cluster.etcd.tls.%s %q is not a file in the pod: %v", k, f, err)
		}
	}
	if clusterSupported() {
		return text
	}
	t.Logf("this build has no cluster: key in gateway.yaml; validating the rest")
	delete(m, "cluster")
	b, err := yaml.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// clusterSupported reports whether this build's gateway.yaml has a
// cluster: key.
func clusterSupported() bool {
	rt := reflect.TypeFor[config.GatewayFile]()
	for i := range rt.NumField() {
		if name, _, _ := strings.Cut(rt.Field(i).Tag.Get("json"), ","); name == "cluster" {
			return true
		}
	}
	return false
}

// checkOptional checks the parts the values switch on and off.
func checkOptional(t *testing.T, s scenario, objs []*unstructured.Unstructured, metricsSvc *unstructured.Unstructured) {
	t.Helper()
	wantPDB := nested[any](s.values, "podDisruptionBudget", "enabled") == nil && s.chart == gwChart || nested[bool](s.values, "podDisruptionBudget", "enabled")
	if pdbs := find(t, objs, "PodDisruptionBudget", -1); len(pdbs) != map[bool]int{true: 1}[wantPDB] {
		t.Errorf("%d PodDisruptionBudgets, want one: %v", len(pdbs), wantPDB)
	} else if wantPDB {
		if v, _, _ := unstructured.NestedFieldNoCopy(pdbs[0].Object, "spec", "maxUnavailable"); v != int64(1) {
			t.Errorf("PodDisruptionBudget maxUnavailable %v, want 1 (minAvailable would block drains of one replica)", v)
		}
		checkSelects(t, pdbs[0], find(t, objs, "Deployment", 1)[0])
	}
	if nested[bool](s.values, "networkPolicy", "enabled") {
		np := find(t, objs, "NetworkPolicy", 1)[0]
		checkSelects(t, np, find(t, objs, "Deployment", 1)[0])
	} else {
		find(t, objs, "NetworkPolicy", 0)
	}
	if !nested[bool](s.values, "serviceMonitor", "enabled") {
		find(t, objs, "ServiceMonitor", 0)
		return
	}
	sm := find(t, objs, "ServiceMonitor", 1)[0]
	if metricsSvc == nil {
		metricsSvc = named(t, objs, "Service", sm.GetName()+"-metrics")
	}
	// The ServiceMonitor selects exactly the metrics Service, by labels and
	// port name.
	sel, _, _ := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
	for _, svc := range find(t, objs, "Service", -1) {
		matches := true
		for k, v := range sel {
			if svc.GetLabels()[k] != v {
				matches = false
			}
		}
		if matches != (svc.GetName() == metricsSvc.GetName()) {
			t.Errorf("ServiceMonitor selector %v matches Service %s: %v", sel, svc.GetName(), matches)
		}
	}
	eps, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
	ports, _, _ := unstructured.NestedSlice(metricsSvc.Object, "spec", "ports")
	if len(eps) != 1 || len(ports) != 1 || eps[0].(obj)["port"] != ports[0].(obj)["name"] || eps[0].(obj)["path"] != "/metrics" {
		t.Errorf("ServiceMonitor endpoints %v do not scrape /metrics on Service port %v", eps, ports)
	}
}

// TestAgentChart checks what the agent chart renders with each scenario:
// agent.yaml is a valid config with discovery on and metrics on the probed
// port, the token and the CA reach the agent, and the pod runs locked down.
func TestAgentChart(t *testing.T) {
	bin := helmBinary(t)
	for _, s := range scenarios() {
		if s.chart != agentChart {
			continue
		}
		t.Run(s.name, func(t *testing.T) {
			objs := render(t, bin, s)
			dep := find(t, objs, "Deployment", 1)[0]
			pod, ctr := podOf(t, dep, "agent")
			checkLockedDown(t, pod, ctr)
			checkImage(t, s, ctr)
			root := t.TempDir()
			cfgPath := materialize(t, objs, pod, ctr, root)
			raw, err := os.ReadFile(cfgPath)
			if err != nil {
				t.Fatal(err)
			}
			text := strings.ReplaceAll(string(raw), "/etc/portway/", root+"/etc/portway/")
			env := envOf(t, objs, ctr)
			cfg, err := config.ParseAgent([]byte(text), func(k string) string { return env[k] })
			if err != nil {
				t.Fatalf("agent.yaml is refused by the agent's validation: %v\n%s", err, raw)
			}
			if !cfg.Kubernetes.Enabled || !cfg.Tunnels.Enabled {
				t.Errorf("discovery is off: %+v", cfg)
			}
			if want := nested[string](s.values, "token", "value"); want != "" && cfg.Gateway.Token != want {
				t.Errorf("the token from the chart's Secret did not reach the agent: %q", cfg.Gateway.Token)
			} else if want == "" && cfg.Gateway.Token != "placeholder:portway-agent-token/token" {
				t.Errorf("the token from Secret portway-agent-token did not reach the agent: %q", cfg.Gateway.Token)
			}
			if ca := nested[string](s.values, "gateway", "caSecret", "name"); ca != "" {
				if b, err := os.ReadFile(cfg.Gateway.CAFile); err != nil || string(b) != "placeholder:"+ca+"/ca.crt" {
					t.Errorf("gateway.ca_file %q does not hold Secret %s's ca.crt: %v", cfg.Gateway.CAFile, ca, err)
				}
			}
			if urls := nested[[]any](s.values, "gateway", "urls"); len(urls) > 0 {
				if fmt.Sprint(cfg.Gateway.URLs) != fmt.Sprint(urls) || cfg.Gateway.Connections != nested[int](s.values, "gateway", "connections") {
					t.Errorf("gateway.urls %v, connections %d: want the chart's %v and %v", cfg.Gateway.URLs, cfg.Gateway.Connections,
						urls, nested[int](s.values, "gateway", "connections"))
				}
			}
			metricsPort := portNumber(t, cfg.Metrics.Listen)
			if host, _, _ := strings.Cut(cfg.Metrics.Listen, ":"); host != "" {
				t.Errorf("metrics.listen %q: the probes and Prometheus reach the pod's address, not loopback", cfg.Metrics.Listen)
			}
			if p := containerPort(t, ctr, "metrics"); p != metricsPort {
				t.Errorf("container port metrics=%d, agent listens on %d", p, metricsPort)
			}
			checkProbes(t, ctr, "metrics")
			// Several replicas are instances side by side; each names
			// itself by its pod.
			replicas, _, _ := unstructured.NestedInt64(dep.Object, "spec", "replicas")
			if want := max(int64(nested[int](s.values, "replicaCount")), 1); replicas != want {
				t.Errorf("%d replicas, want %d", replicas, want)
			}
			podName := ""
			list, _, _ := unstructured.NestedSlice(ctr, "env")
			for _, e := range list {
				if e := e.(obj); e["name"] == "POD_NAME" {
					podName, _, _ = unstructured.NestedString(e, "valueFrom", "fieldRef", "fieldPath")
				}
			}
			if podName != "metadata.name" {
				t.Errorf("POD_NAME from %q, want the pod's name (the agent's instance id)", podName)
			}
			var metricsSvc *unstructured.Unstructured
			if nested[bool](s.values, "serviceMonitor", "enabled") {
				metricsSvc = named(t, objs, "Service", dep.GetName()+"-metrics")
				checkServicePorts(t, metricsSvc, ctr, map[string]int{"metrics": metricsPort})
				checkSelects(t, metricsSvc, dep)
			}
			checkOptional(t, s, objs, metricsSvc)

			// RBAC: the ServiceAccount the pod runs as is the one bound.
			sa, _, _ := unstructured.NestedString(pod, "serviceAccountName")
			named(t, objs, "ServiceAccount", sa)
			crb := find(t, objs, "ClusterRoleBinding", 1)[0]
			subjects, _, _ := unstructured.NestedSlice(crb.Object, "subjects")
			want := []any{obj{"kind": "ServiceAccount", "name": sa, "namespace": s.namespace}}
			if !reflect.DeepEqual(subjects, want) {
				t.Errorf("ClusterRoleBinding subjects %v, want %v", subjects, want)
			}
			role, _, _ := unstructured.NestedString(crb.Object, "roleRef", "name")
			named(t, objs, "ClusterRole", role)
		})
	}
}

// TestAgentChartMatchesKustomize keeps deploy/agent (kustomize) and the
// agent chart one source of truth: rendered with its defaults, as release
// portway-agent in pipeops-system, the chart grants exactly deploy/agent's
// RBAC (which the Kubernetes tests check with SubjectAccessReviews),
// configures the agent exactly as deploy/agent's agent.yaml does but for the
// gateway's URL, and runs the pod with the same security, probes,
// resources, arguments and rollout.
func TestAgentChartMatchesKustomize(t *testing.T) {
	var s scenario
	for _, c := range scenarios() {
		if c.name == "agent-defaults" {
			s = c
		}
	}
	chart := render(t, helmBinary(t), s)
	kust := k8stest.Kustomization(t, "../../deploy/agent")
	for _, kind := range []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment"} {
		c, k := find(t, chart, kind, 1)[0], find(t, kust, kind, 1)[0]
		if c.GetName() != k.GetName() || c.GetNamespace() != k.GetNamespace() {
			t.Errorf("%s: chart %s/%s, kustomize %s/%s", kind, c.GetNamespace(), c.GetName(), k.GetNamespace(), k.GetName())
		}
	}
	same := func(kind string, path ...string) {
		t.Helper()
		c, _, _ := unstructured.NestedFieldNoCopy(find(t, chart, kind, 1)[0].Object, path...)
		k, _, _ := unstructured.NestedFieldNoCopy(find(t, kust, kind, 1)[0].Object, path...)
		if c == nil || !reflect.DeepEqual(k8stest.Normalize(c), k8stest.Normalize(k)) {
			t.Errorf("%s %s differs:\nchart:     %v\nkustomize: %v", kind, strings.Join(path, "."), c, k)
		}
	}
	same("ClusterRole", "rules")
	same("ClusterRoleBinding", "roleRef")
	same("ClusterRoleBinding", "subjects")
	same("Deployment", "spec", "replicas")
	same("Deployment", "spec", "strategy")
	same("Deployment", "spec", "template", "spec", "securityContext")
	same("Deployment", "spec", "template", "spec", "serviceAccountName")
	for _, field := range []string{"securityContext", "livenessProbe", "readinessProbe", "resources", "ports"} {
		_, cc := podOf(t, find(t, chart, "Deployment", 1)[0], "agent")
		_, kc := podOf(t, find(t, kust, "Deployment", 1)[0], "agent")
		if !reflect.DeepEqual(k8stest.Normalize(cc[field]), k8stest.Normalize(kc[field])) {
			t.Errorf("container %s differs:\nchart:     %v\nkustomize: %v", field, cc[field], kc[field])
		}
	}
	_, cc := podOf(t, find(t, chart, "Deployment", 1)[0], "agent")
	_, kc := podOf(t, find(t, kust, "Deployment", 1)[0], "agent")
	if !reflect.DeepEqual(cc["args"], kc["args"]) || !reflect.DeepEqual(cc["env"], kc["env"]) {
		t.Errorf("container args/env differ:\nchart:     %v %v\nkustomize: %v %v", cc["args"], cc["env"], kc["args"], kc["env"])
	}

	parse := func(objs []*unstructured.Unstructured) *config.AgentFile {
		data, _, _ := unstructured.NestedString(find(t, objs, "ConfigMap", 1)[0].Object, "data", "agent.yaml")
		cfg, err := config.ParseAgent([]byte(data), func(k string) string {
			return map[string]string{"PORTWAY_GATEWAY_TOKEN": "from-the-secret-0123456789"}[k]
		})
		if err != nil {
			t.Fatalf("agent.yaml: %v", err)
		}
		cfg.Gateway.URL = ""
		return cfg
	}
	if c, k := parse(chart), parse(kust); !reflect.DeepEqual(c, k) {
		t.Errorf("agent.yaml differs (gateway.url aside):\nchart:     %+v\nkustomize: %+v", c, k)
	}
}

// podOf returns a Deployment's pod spec and its container called name.
func podOf(t *testing.T, dep *unstructured.Unstructured, name string) (pod, ctr map[string]any) {
	t.Helper()
	pod, _, _ = unstructured.NestedMap(dep.Object, "spec", "template", "spec")
	ctrs, _, _ := unstructured.NestedSlice(pod, "containers")
	for _, c := range ctrs {
		if c.(obj)["name"] == name {
			return pod, c.(obj)
		}
	}
	t.Fatalf("Deployment %s has no container %s", dep.GetName(), name)
	return nil, nil
}

// checkLockedDown: non-root, read-only root filesystem, no capabilities,
// no privilege escalation, the runtime's seccomp profile.
func checkLockedDown(t *testing.T, pod, ctr map[string]any) {
	t.Helper()
	if nonRoot, _, _ := unstructured.NestedBool(pod, "securityContext", "runAsNonRoot"); !nonRoot {
		t.Error("pod securityContext.runAsNonRoot is not true")
	}
	if uid, _, _ := unstructured.NestedInt64(pod, "securityContext", "runAsUser"); uid == 0 {
		t.Error("pod securityContext.runAsUser is 0 or unset")
	}
	if p, _, _ := unstructured.NestedString(pod, "securityContext", "seccompProfile", "type"); p != "RuntimeDefault" {
		t.Errorf("seccompProfile %q, want RuntimeDefault", p)
	}
	if ro, _, _ := unstructured.NestedBool(ctr, "securityContext", "readOnlyRootFilesystem"); !ro {
		t.Error("container securityContext.readOnlyRootFilesystem is not true")
	}
	if esc, ok, _ := unstructured.NestedBool(ctr, "securityContext", "allowPrivilegeEscalation"); !ok || esc {
		t.Error("container securityContext.allowPrivilegeEscalation is not false")
	}
	if drop, _, _ := unstructured.NestedStringSlice(ctr, "securityContext", "capabilities", "drop"); !slices.Equal(drop, []string{"ALL"}) {
		t.Errorf("capabilities.drop %v, want [ALL]", drop)
	}
	if add, _, _ := unstructured.NestedStringSlice(ctr, "securityContext", "capabilities", "add"); len(add) != 0 {
		t.Errorf("capabilities.add %v, want none", add)
	}
}

// checkImage: the values' image, or the repository at the chart's
// appVersion.
func checkImage(t *testing.T, s scenario, ctr map[string]any) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(chartsDir, s.chart, "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var chart struct {
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(b, &chart); err != nil || chart.AppVersion == "" {
		t.Fatalf("Chart.yaml has no appVersion (%v)", err)
	}
	repo, tag := "registry.example.com/portway", chart.AppVersion
	if r := nested[string](s.values, "image", "repository"); r != "" {
		repo = r
	}
	if v := nested[string](s.values, "image", "tag"); v != "" {
		tag = v
	}
	if ctr["image"] != repo+":"+tag {
		t.Errorf("image %v, want %s:%s", ctr["image"], repo, tag)
	}
}

// checkProbes: liveness on /healthz, readiness on /readyz, both on the
// named port.
func checkProbes(t *testing.T, ctr map[string]any, port string) {
	t.Helper()
	for probe, path := range map[string]string{"livenessProbe": "/healthz", "readinessProbe": "/readyz"} {
		p, _, _ := unstructured.NestedString(ctr, probe, "httpGet", "path")
		n, _, _ := unstructured.NestedFieldNoCopy(ctr, probe, "httpGet", "port")
		if p != path || n != port {
			t.Errorf("%s: GET %s on port %v, want %s on %s", probe, p, n, path, port)
		}
	}
}

// containerPort returns the number of the container's port called name.
func containerPort(t *testing.T, ctr map[string]any, name string) int {
	t.Helper()
	ports, _, _ := unstructured.NestedSlice(ctr, "ports")
	for _, p := range ports {
		if p.(obj)["name"] == name {
			return int(p.(obj)["containerPort"].(int64))
		}
	}
	t.Fatalf("container has no port %s", name)
	return 0
}

// checkServicePorts: each named Service port targets the container port of
// that name, which is the number the process listens on.
func checkServicePorts(t *testing.T, svc *unstructured.Unstructured, ctr map[string]any, want map[string]int) {
	t.Helper()
	ports, _, _ := unstructured.NestedSlice(svc.Object, "spec", "ports")
	if len(ports) != len(want) {
		t.Errorf("Service %s has %d ports, want %d", svc.GetName(), len(ports), len(want))
	}
	for _, p := range ports {
		p := p.(obj)
		name, _ := p["name"].(string)
		target := p["targetPort"]
		if s, ok := target.(string); ok {
			target = int64(containerPort(t, ctr, s))
		}
		if w, ok := want[name]; !ok || target != int64(w) {
			t.Errorf("Service %s port %s reaches container port %v, want %v", svc.GetName(), name, target, want[name])
		}
	}
}

// checkSelects: the object's selector picks the Deployment's pods.
func checkSelects(t *testing.T, o, dep *unstructured.Unstructured) {
	t.Helper()
	sel, _, _ := unstructured.NestedStringMap(o.Object, "spec", "selector")
	if m, ok, _ := unstructured.NestedStringMap(o.Object, "spec", "selector", "matchLabels"); ok {
		sel = m
	}
	if m, ok, _ := unstructured.NestedStringMap(o.Object, "spec", "podSelector", "matchLabels"); ok {
		sel = m
	}
	labels, _, _ := unstructured.NestedStringMap(dep.Object, "spec", "template", "metadata", "labels")
	if len(sel) == 0 {
		t.Errorf("%s %s selects nothing", o.GetKind(), o.GetName())
	}
	for k, v := range sel {
		if labels[k] != v {
			t.Errorf("%s %s selects %s=%s, which the pods do not carry (%v)", o.GetKind(), o.GetName(), k, v, labels)
		}
	}
}

// checkWritable: dir is on a writable volume (the root filesystem is
// read-only).
func checkWritable(t *testing.T, pod, ctr map[string]any, dir string) {
	t.Helper()
	mounts, _, _ := unstructured.NestedSlice(ctr, "volumeMounts")
	for _, m := range mounts {
		m := m.(obj)
		if m["mountPath"] == dir {
			if ro, _ := m["readOnly"].(bool); ro {
				t.Errorf("%s is mounted read-only", dir)
			}
			return
		}
	}
	t.Errorf("%s (the state file's directory) is on no volume: the root filesystem is read-only", dir)
}

// volumeSource returns a string field of the pod's volume called name.
func volumeSource(t *testing.T, pod map[string]any, name string, path ...string) string {
	t.Helper()
	vols, _, _ := unstructured.NestedSlice(pod, "volumes")
	for _, v := range vols {
		if v.(obj)["name"] == name {
			s, _, _ := unstructured.NestedString(v.(obj), path...)
			return s
		}
	}
	t.Fatalf("no volume %s", name)
	return ""
}

// materialize writes under root the files the container sees through its
// projected volumes: rendered ConfigMaps and Secrets with their data, a
// user's Secret (not rendered) with "placeholder:<secret>/<key>" per item.
// It returns the --config argument's path under root.
func materialize(t *testing.T, objs []*unstructured.Unstructured, pod, ctr map[string]any, root string) string {
	t.Helper()
	vols, _, _ := unstructured.NestedSlice(pod, "volumes")
	mounts, _, _ := unstructured.NestedSlice(ctr, "volumeMounts")
	mountOf := map[string]string{}
	for _, m := range mounts {
		mountOf[m.(obj)["name"].(string)] = m.(obj)["mountPath"].(string)
	}
	for _, v := range vols {
		v := v.(obj)
		dir, ok := mountOf[v["name"].(string)]
		if !ok {
			t.Errorf("volume %v is mounted nowhere", v["name"])
			continue
		}
		sources, ok, _ := unstructured.NestedSlice(v, "projected", "sources")
		if !ok {
			continue
		}
		for _, src := range sources {
			src := src.(obj)
			kind, ref := "ConfigMap", src["configMap"]
			if ref == nil {
				kind, ref = "Secret", src["secret"]
			}
			name := ref.(obj)["name"].(string)
			data := dataOf(t, objs, kind, name)
			items, _, _ := unstructured.NestedSlice(ref.(obj), "items")
			if items == nil {
				if data == nil {
					t.Fatalf("projected %s %s lists no items and is not rendered", kind, name)
				}
				for k := range data {
					items = append(items, obj{"key": k, "path": k})
				}
			}
			for _, it := range items {
				key, path := it.(obj)["key"].(string), it.(obj)["path"].(string)
				content := "placeholder:" + name + "/" + key
				if data != nil {
					c, ok := data[key]
					if !ok {
						t.Errorf("%s %s has no key %s", kind, name, key)
					}
					content = c
				}
				p := filepath.Join(root, dir, path)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	args, _, _ := unstructured.NestedStringSlice(ctr, "args")
	i := slices.Index(args, "--config")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("container args %v have no --config", args)
	}
	return filepath.Join(root, args[i+1])
}

// dataOf returns a rendered ConfigMap's or Secret's data (decoded), or nil
// when the chart does not render it.
func dataOf(t *testing.T, objs []*unstructured.Unstructured, kind, name string) map[string]string {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() != kind || o.GetName() != name {
			continue
		}
		out := map[string]string{}
		data, _, _ := unstructured.NestedStringMap(o.Object, "data")
		for k, v := range data {
			if kind == "Secret" {
				b, err := base64.StdEncoding.DecodeString(v)
				if err != nil {
					t.Fatalf("Secret %s key %s: %v", name, k, err)
				}
				v = string(b)
			}
			out[k] = v
		}
		sd, _, _ := unstructured.NestedStringMap(o.Object, "stringData")
		for k, v := range sd {
			out[k] = v
		}
		return out
	}
	return nil
}

// envOf returns the container's environment: literal values, a rendered
// Secret's value, "placeholder:<secret>/<key>" for a user's Secret.
func envOf(t *testing.T, objs []*unstructured.Unstructured, ctr map[string]any) map[string]string {
	t.Helper()
	env := map[string]string{}
	list, _, _ := unstructured.NestedSlice(ctr, "env")
	for _, e := range list {
		e := e.(obj)
		name := e["name"].(string)
		if _, dup := env[name]; dup {
			t.Errorf("env %s set twice", name)
		}
		if v, ok := e["value"].(string); ok {
			env[name] = v
			continue
		}
		if ref, ok, _ := unstructured.NestedStringMap(e, "valueFrom", "secretKeyRef"); ok {
			data := dataOf(t, objs, "Secret", ref["name"])
			if data == nil {
				env[name] = "placeholder:" + ref["name"] + "/" + ref["key"]
				continue
			}
			v, ok := data[ref["key"]]
			if !ok {
				t.Errorf("env %s: Secret %s has no key %s", name, ref["name"], ref["key"])
			}
			env[name] = v
			continue
		}
		if _, ok, _ := unstructured.NestedString(e, "valueFrom", "fieldRef", "fieldPath"); ok {
			env[name] = "10.244.0.10"
			continue
		}
		t.Errorf("env %s: no value this test knows", name)
	}
	return env
}

// portNumber returns the port of a ":port" or "host:port" listen address.
func portNumber(t *testing.T, listen string) int {
	t.Helper()
	_, p, ok := strings.Cut(listen, ":")
	var n int
	if _, err := fmt.Sscanf(p, "%d", &n); !ok || err != nil {
		t.Fatalf("listen address %q has no port", listen)
	}
	return n
}

// nested returns the value at path in values, or T's zero value.
func nested[T any](values map[string]any, path ...string) T {
	var zero T
	var cur any = values
	for _, p := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return zero
		}
		cur = m[p]
	}
	v, _ := cur.(T)
	return v
}

func nestedMap(values map[string]any, path ...string) map[string]any {
	return nested[map[string]any](values, path...)
}

func sliceOf(values map[string]any, path ...string) []any {
	return nested[[]any](values, path...)
}
