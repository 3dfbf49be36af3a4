package deploytest

import (
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/k8stest"
)

// gatewayKustomize is the kustomize base for several gateway replicas.
const gatewayKustomize = "../../deploy/gateway"

// TestGatewayKustomize reads deploy/gateway as kubectl apply -k would and
// checks that its parts fit together: gateway.yaml is valid as `portway
// gateway` parses it with the Deployment's environment (the cluster: block
// with the pod IP as advertise address and the tokens from the Secret),
// its etcd endpoints are the members etcd.yaml runs, the public Service
// lists exactly port_range and keeps not-ready replicas reachable, the
// agent endpoint Service does not, the probes are the gateway's
// /healthz and /readyz, and the PodDisruptionBudgets select the pods.
func TestGatewayKustomize(t *testing.T) {
	objs := k8stest.Kustomization(t, gatewayKustomize)
	dep := find(t, objs, "Deployment", 1)[0]
	pod, ctr := podOf(t, dep, "gateway")
	secret := dataOf(t, objs, "Secret", "portway-gateway")

	// The container's environment as the kubelet gives it, with a pod IP.
	const podIP = "10.1.2.3"
	env := map[string]string{}
	envs, _, _ := unstructured.NestedSlice(ctr, "env")
	for _, e := range envs {
		e := e.(obj)
		name, _ := e["name"].(string)
		if v, ok := e["value"].(string); ok {
			env[name] = strings.ReplaceAll(v, "$(POD_IP)", podIP)
			continue
		}
		if p, _, _ := unstructured.NestedString(e, "valueFrom", "fieldRef", "fieldPath"); p == "status.podIP" {
			env[name] = podIP
			continue
		}
		ref, _, _ := unstructured.NestedMap(e, "valueFrom", "secretKeyRef")
		if ref["name"] != "portway-gateway" {
			t.Errorf("env %s: from %v, want the Secret portway-gateway", name, ref)
			continue
		}
		v, ok := secret[ref["key"].(string)]
		if !ok {
			t.Errorf("env %s: the Secret has no key %v", name, ref["key"])
		}
		env[name] = v
	}
	if env["POD_IP"] != podIP {
		t.Errorf("POD_IP is not the pod's status.podIP: %q", env["POD_IP"])
	}

	// The files the pod sees, under root (the TLS Secret, not made here,
	// as placeholders).
	root := t.TempDir()
	raw, err := os.ReadFile(materialize(t, objs, pod, ctr, root))
	if err != nil {
		t.Fatal(err)
	}
	data := strings.ReplaceAll(string(raw), "/etc/portway/", root+"/etc/portway/")
	cfg, err := config.ParseGateway([]byte(data), func(k string) string { return env[k] })
	if err != nil {
		t.Fatalf("gateway.yaml with the Deployment's environment: %v", err)
	}
	if cfg.Cluster == nil {
		t.Fatal("gateway.yaml has no cluster: block")
	}
	_, listenPort, _ := net.SplitHostPort(cfg.Listen)
	if want := net.JoinHostPort(podIP, listenPort); cfg.Cluster.Advertise != want {
		t.Errorf("cluster.advertise %q, want %q (the pod IP and the tunnel port)", cfg.Cluster.Advertise, want)
	}
	if cfg.Cluster.Token == "" || cfg.Admin.Token == "" {
		t.Error("the cluster or admin token does not come from the Secret")
	}
	for _, a := range cfg.Agents {
		if a.Token == "" && a.TokenSHA256 == "" {
			t.Errorf("agent %s has no token (PORTWAY_AGENT_TOKEN_%s from the Secret)", a.Name, strings.ToUpper(a.Name))
		}
	}
	ports, _, _ := unstructured.NestedSlice(ctr, "ports")
	named := map[string]int64{}
	for _, p := range ports {
		named[p.(obj)["name"].(string)] = p.(obj)["containerPort"].(int64)
	}
	if strconv.FormatInt(named["tunnel"], 10) != listenPort {
		t.Errorf("containerPort tunnel %d, gateway.yaml listens on %s", named["tunnel"], listenPort)
	}
	if _, adminPort, _ := net.SplitHostPort(cfg.Admin.Listen); strconv.FormatInt(named["admin"], 10) != adminPort {
		t.Errorf("containerPort admin %d, admin.listen %s", named["admin"], cfg.Admin.Listen)
	}
	for probe, path := range map[string]string{"livenessProbe": "/healthz", "readinessProbe": "/readyz"} {
		if p, _, _ := unstructured.NestedString(ctr, probe, "httpGet", "path"); p != path {
			t.Errorf("%s path %q, want %q", probe, p, path)
		}
		if p, _, _ := unstructured.NestedString(ctr, probe, "httpGet", "port"); p != "admin" {
			t.Errorf("%s port %q, want admin", probe, p)
		}
	}
	checkLockedDown(t, pod, ctr)
	if n, _, _ := unstructured.NestedInt64(dep.Object, "spec", "replicas"); n < 2 {
		t.Errorf("%d replicas", n)
	}

	// etcd: the endpoints are the StatefulSet's members.
	sts := find(t, objs, "StatefulSet", 1)[0]
	n, _, _ := unstructured.NestedInt64(sts.Object, "spec", "replicas")
	svcName, _, _ := unstructured.NestedString(sts.Object, "spec", "serviceName")
	var members []string
	for i := range n {
		members = append(members, fmt.Sprintf("http://%s-%d.%s:2379", sts.GetName(), i, svcName))
	}
	if !slices.Equal(cfg.Cluster.Etcd.Endpoints, members) {
		t.Errorf("cluster.etcd.endpoints %v, etcd.yaml runs %v", cfg.Cluster.Etcd.Endpoints, members)
	}
	ctrs, _, _ := unstructured.NestedSlice(sts.Object, "spec", "template", "spec", "containers")
	var cmd []string
	for _, c := range ctrs {
		for _, a := range c.(obj)["command"].([]any) {
			cmd = append(cmd, a.(string))
		}
	}
	joined := strings.Join(cmd, " ")
	for i := range n {
		peer := fmt.Sprintf("%s-%d=http://%s-%d.%s:2380", sts.GetName(), i, sts.GetName(), i, svcName)
		if !strings.Contains(joined, peer) {
			t.Errorf("etcd's --initial-cluster lacks %s", peer)
		}
	}

	// Services.
	lo, hi, err := config.ParsePortRange(cfg.PortRange)
	if err != nil {
		t.Fatal(err)
	}
	podLabels, _, _ := unstructured.NestedStringMap(dep.Object, "spec", "template", "metadata", "labels")
	selects := func(kind string, o *unstructured.Unstructured, path ...string) {
		t.Helper()
		sel, _, _ := unstructured.NestedStringMap(o.Object, path...)
		if len(sel) == 0 {
			t.Errorf("%s %s selects nothing", kind, o.GetName())
		}
		for k, v := range sel {
			if podLabels[k] != v {
				t.Errorf("%s %s selects %s=%s, the gateway pods have %q", kind, o.GetName(), k, v, podLabels[k])
			}
		}
	}
	svcs := map[string]*unstructured.Unstructured{}
	for _, s := range find(t, objs, "Service", 4) {
		svcs[s.GetName()] = s
	}
	for _, name := range []string{"portway-gateway", "portway-gateway-public", "portway-gateway-admin"} {
		s := svcs[name]
		if s == nil {
			t.Fatalf("no Service %s", name)
		}
		selects("Service", s, "spec", "selector")
		pnr, _, _ := unstructured.NestedBool(s.Object, "spec", "publishNotReadyAddresses")
		if want := name == "portway-gateway-public"; pnr != want {
			t.Errorf("Service %s publishNotReadyAddresses %v, want %v", name, pnr, want)
		}
	}
	var listed []int
	sp, _, _ := unstructured.NestedSlice(svcs["portway-gateway-public"].Object, "spec", "ports")
	for _, p := range sp {
		port := int(p.(obj)["port"].(int64))
		if tp, ok := p.(obj)["targetPort"].(int64); !ok || int(tp) != port {
			t.Errorf("public port %d goes to targetPort %v, want the same port", port, p.(obj)["targetPort"])
		}
		listed = append(listed, port)
	}
	slices.Sort(listed)
	var want []int
	for p := lo; p <= hi; p++ {
		want = append(want, p)
	}
	if !slices.Equal(listed, want) {
		t.Errorf("the public Service lists %v, port_range %s is %v", listed, cfg.PortRange, want)
	}
	if tp, _, _ := unstructured.NestedSlice(svcs["portway-gateway"].Object, "spec", "ports"); len(tp) != 1 || tp[0].(obj)["targetPort"] != "tunnel" {
		t.Errorf("the agent endpoint Service's ports: %v", tp)
	}

	for _, pdb := range find(t, objs, "PodDisruptionBudget", 2) {
		if pdb.GetName() == "portway-gateway" {
			selects("PodDisruptionBudget", pdb, "spec", "selector", "matchLabels")
		}
	}
}

// TestGatewayKustomizeDryRun sends every object of deploy/gateway to a
// real kube-apiserver as a server-side apply with dryRun=All.
func TestGatewayKustomizeDryRun(t *testing.T) {
	if !k8stest.Isolate(t) {
		return
	}
	env := k8stest.Start(t)
	ap := k8stest.NewApplier(t, env.Config)
	objs := k8stest.Kustomization(t, gatewayKustomize)
	for _, o := range objs {
		if o.GetKind() == "Namespace" {
			ap.Apply(t, o, false) // namespaced dry runs need it for real
		}
	}
	for _, o := range objs {
		if o.GetNamespace() == "" && o.GetKind() != "Namespace" {
			t.Errorf("%s %s has no namespace", o.GetKind(), o.GetName())
		}
		ap.Apply(t, o, true)
	}
	t.Logf("%d objects pass the dry run", len(objs))
}
