package discovery_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	authv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/discovery"
	"github.com/portway/portway/internal/k8stest"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testwait"
)

const (
	deployDir = "../../deploy/agent"
	agentSA   = "system:serviceaccount:pipeops-system:portway-agent"
)

// TestWithAPIServer checks, against a real kube-apiserver, that the deploy
// manifests are valid, that their RBAC is least privilege, and that
// discovery works with exactly that RBAC: it runs as the agent's
// ServiceAccount (impersonated).
func TestWithAPIServer(t *testing.T) {
	if !k8stest.Isolate(t) {
		return
	}
	env := k8stest.Start(t)
	env.InstallGatewayAPI(t)
	kube, err := kubernetes.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	gw, err := gwclient.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("deploy manifests pass a server-side dry run", func(t *testing.T) {
		objs := k8stest.Kustomization(t, deployDir)
		kinds := map[string]int{}
		for _, o := range objs {
			kinds[o.GetKind()]++
		}
		for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Secret", "Deployment"} {
			if kinds[k] != 1 {
				t.Errorf("deploy/agent has %d %s, want 1", kinds[k], k)
			}
		}
		// The namespace must exist for the namespaced dry runs, and the
		// RBAC for the subtests below: those are applied for real.
		for _, o := range objs {
			real := slices.Contains([]string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}, o.GetKind())
			k8stest.NewApplier(t, env.Config).Apply(t, o, !real)
		}
	})

	t.Run("the ConfigMap's agent.yaml is a valid config with discovery on", func(t *testing.T) {
		var cm *unstructured.Unstructured
		for _, o := range k8stest.Kustomization(t, deployDir) {
			if o.GetKind() == "ConfigMap" {
				cm = o
			}
		}
		if cm == nil {
			t.Fatal("no ConfigMap")
		}
		data, _, _ := unstructured.NestedString(cm.Object, "data", "agent.yaml")
		cfg, err := config.ParseAgent([]byte(data), func(k string) string {
			return map[string]string{"PORTWAY_GATEWAY_TOKEN": "from-the-secret"}[k]
		})
		if err != nil {
			t.Fatalf("agent.yaml: %v", err)
		}
		if !cfg.Kubernetes.Enabled || !cfg.Tunnels.Enabled || cfg.Metrics.Listen != ":9090" ||
			cfg.Tunnels.Discovery.TCP.GatewayLabel != "pipeops.io/managed" || cfg.Tunnels.Discovery.UDP.GatewayLabel != "pipeops.io/managed" {
			t.Errorf("agent.yaml does not turn discovery on as the PipeOps agent does: %+v", cfg)
		}
	})

	t.Run("the Deployment gives the agent its namespace", func(t *testing.T) {
		for _, o := range k8stest.Kustomization(t, deployDir) {
			if o.GetKind() != "Deployment" {
				continue
			}
			containers, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
			for _, c := range containers {
				env, _, _ := unstructured.NestedSlice(c.(map[string]any), "env")
				for _, e := range env {
					path, _, _ := unstructured.NestedString(e.(map[string]any), "valueFrom", "fieldRef", "fieldPath")
					if e.(map[string]any)["name"] == "POD_NAMESPACE" && path == "metadata.namespace" {
						return
					}
				}
			}
		}
		t.Error("no container of the Deployment sets POD_NAMESPACE from metadata.namespace")
	})

	t.Run("the ClusterRole grants what discovery needs and nothing more", func(t *testing.T) {
		type attr struct{ verb, group, resource string }
		allowed := []attr{}
		for _, r := range []string{"gateways", "tcproutes", "udproutes"} {
			for _, v := range []string{"get", "list", "watch", "patch"} {
				allowed = append(allowed, attr{v, gwv1.GroupName, r})
			}
		}
		for _, v := range []string{"get", "list", "watch"} {
			allowed = append(allowed, attr{v, "", "services"}, attr{v, "discovery.k8s.io", "endpointslices"}, attr{v, "", "namespaces"},
				attr{v, gwv1.GroupName, "referencegrants"})
		}
		allowed = append(allowed, attr{"create", "events.k8s.io", "events"})
		denied := []attr{
			{"update", gwv1.GroupName, "gateways"}, {"create", gwv1.GroupName, "gateways"}, {"delete", gwv1.GroupName, "tcproutes"},
			{"patch", gwv1.GroupName, "httproutes"}, {"update", gwv1.GroupName, "gateways/status"},
			{"patch", "", "services"}, {"get", "", "secrets"}, {"list", "", "configmaps"}, {"list", "", "pods"},
			{"patch", "", "namespaces"}, {"patch", gwv1.GroupName, "referencegrants"}, {"create", "", "events"}, {"delete", "events.k8s.io", "events"},
		}
		check := func(a attr, want bool) {
			res, sub := a.resource, ""
			if r, s, ok := strings.Cut(a.resource, "/"); ok {
				res, sub = r, s
			}
			sar := &authv1.SubjectAccessReview{Spec: authv1.SubjectAccessReviewSpec{
				User:   agentSA,
				Groups: []string{"system:serviceaccounts", "system:serviceaccounts:pipeops-system", "system:authenticated"},
				ResourceAttributes: &authv1.ResourceAttributes{
					Namespace: "databases", Verb: a.verb, Group: a.group, Resource: res, Subresource: sub,
				},
			}}
			out, err := kube.AuthorizationV1().SubjectAccessReviews().Create(ctx(t), sar, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if out.Status.Allowed != want {
				t.Errorf("%s %s.%s: allowed=%v, want %v", a.verb, a.resource, a.group, out.Status.Allowed, want)
			}
		}
		for _, a := range allowed {
			check(a, true)
		}
		for _, a := range denied {
			check(a, false)
		}
	})

	t.Run("discovery works as the agent's ServiceAccount", func(t *testing.T) {
		testDiscoveryAsServiceAccount(t, env, kube, gw)
	})
}

func testDiscoveryAsServiceAccount(t *testing.T, env *k8stest.Env, kube kubernetes.Interface, gw gwclient.Interface) {
	for _, ns := range []string{"apps", "databases"} {
		if _, err := kube.CoreV1().Namespaces().Create(ctx(t), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// Left over from an earlier run, or a Gateway unlabelled while the
	// agent was down: stale annotations are removed at start.
	stale := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "retired", Annotations: map[string]string{discovery.AnnotationEndpoints: `{"x":[]}`}},
		Spec:       gwv1.GatewaySpec{GatewayClassName: "istio", Listeners: []gwv1.Listener{{Name: "x", Port: 1, Protocol: gwv1.TCPProtocolType}}},
	}
	if _, err := gw.GatewayV1().Gateways("apps").Create(ctx(t), stale, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Services("databases").Create(ctx(t), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "databases", Name: "redis"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 6379}}, Selector: map[string]string{"app": "redis"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	g := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "edge", Labels: map[string]string{"pipeops.io/managed": "true"}},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio", Listeners: []gwv1.Listener{
			{Name: "redis", Port: 6379, Protocol: gwv1.TCPProtocolType},
		}},
	}
	if _, err := gw.GatewayV1().Gateways("apps").Create(ctx(t), g, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	sa := rest.CopyConfig(env.Config)
	sa.Impersonate = rest.ImpersonationConfig{UserName: agentSA, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:pipeops-system"}}
	rec := &recorder{}
	reg := prometheus.NewRegistry()
	discovered := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "discovered"}, []string{"protocol"})
	syncs := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "syncs"}, []string{"result"})
	reg.MustRegister(discovered, syncs)
	logs := &testlog.Buffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("---- discovery log ----\n%s", logs.String())
		}
	})
	d, err := discovery.New(discovery.Options{
		Config:     sa,
		Tunnels:    config.DefaultAgent().Tunnels,
		Logger:     slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Publish:    rec.publish,
		Discovered: discovered,
		Syncs:      syncs,
		Instance:   "test",
		// As POD_NAMESPACE would give it: managed Gateways live in apps.
		Namespace: "apps",
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("Run did not return within 30s of its context ending")
		}
	})

	testwait.For(t, 30*time.Second, "the first (empty) publish", func() bool { return rec.calls() > 0 })
	testwait.For(t, 10*time.Second, "the stale annotation to be removed", func() bool {
		o, err := gw.GatewayV1().Gateways("apps").Get(ctx(t), "retired", metav1.GetOptions{})
		return err == nil && o.Annotations[discovery.AnnotationEndpoints] == ""
	})

	// A change reaches Publish promptly once stored (the apiserver's own
	// time to store it is not discovery's). The latency is logged; the
	// wait is only a hang guard, since apiserver, etcd and the test share
	// the machine's cores.
	route := tcpRoute("apps", "redis", "edge", "databases", "redis", 6379)
	if _, err := gw.GatewayV1().TCPRoutes("apps").Create(ctx(t), route, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	stored := time.Now()
	testwait.For(t, 10*time.Second, "the route's service to be published", func() bool { return len(rec.last()) == 1 })
	latency := time.Since(stored)
	t.Logf("route stored → service published in %v", latency.Round(time.Millisecond))
	svc := rec.last()[0]
	if svc.ID != "apps/edge/redis" || svc.Protocol != protocol.KindTCP || svc.Port != 6379 || svc.Mode != discovery.ModeTunnel ||
		!strings.HasSuffix(svc.Backend, ":6379") || strings.HasPrefix(svc.Backend, ":") {
		t.Errorf("published %+v", svc)
	}
	if v := testmetrics.Value(t, reg, "discovered", map[string]string{"protocol": "tcp"}); v != 1 {
		t.Errorf("discovered{tcp} = %v, want 1", v)
	}

	// The gateway's answer is written back, as the ServiceAccount.
	d.SetEndpoints([]discovery.Endpoint{{ID: "apps/edge/redis", Protocol: protocol.KindTCP, Address: "gw.example.com:16379"}})
	var gwRV, routeRV string
	testwait.For(t, 10*time.Second, "the annotations", func() bool {
		g, err1 := gw.GatewayV1().Gateways("apps").Get(ctx(t), "edge", metav1.GetOptions{})
		r, err2 := gw.GatewayV1().TCPRoutes("apps").Get(ctx(t), "redis", metav1.GetOptions{})
		if err1 != nil || err2 != nil {
			return false
		}
		gwRV, routeRV = g.ResourceVersion, r.ResourceVersion
		return g.Annotations[discovery.AnnotationEndpoints] == `{"redis":[{"mode":"tunnel","protocol":"tcp","endpoint":"gw.example.com:16379"}]}` &&
			r.Annotations[discovery.AnnotationRouteEndpoint] == "gw.example.com:16379"
	})

	// No write loop: our own patches start no recompute and no further
	// patch, and neither does the agent acknowledging the same endpoints
	// again (it does on every register).
	time.Sleep(500 * time.Millisecond)
	before := testmetrics.Value(t, reg, "syncs", nil)
	time.Sleep(time.Second)
	after := testmetrics.Value(t, reg, "syncs", nil)
	if after != before {
		t.Errorf("%v recomputes while nothing changed", after-before)
	}
	d.SetEndpoints([]discovery.Endpoint{{ID: "apps/edge/redis", Protocol: protocol.KindTCP, Address: "gw.example.com:16379"}})
	time.Sleep(time.Second)
	g2, _ := gw.GatewayV1().Gateways("apps").Get(ctx(t), "edge", metav1.GetOptions{})
	r2, _ := gw.GatewayV1().TCPRoutes("apps").Get(ctx(t), "redis", metav1.GetOptions{})
	if g2.ResourceVersion != gwRV || r2.ResourceVersion != routeRV {
		t.Errorf("objects rewritten with nothing changed: Gateway %s→%s, TCPRoute %s→%s", gwRV, g2.ResourceVersion, routeRV, r2.ResourceVersion)
	}
	if publishes := rec.calls(); publishes != 2 {
		t.Errorf("Publish called %d times, want 2 (empty set, then the route)", publishes)
	}

	// A problem is recorded as an Event, by the ServiceAccount.
	broken := tcpRoute("apps", "broken", "edge", "databases", "nope", 1)
	broken.Spec.ParentRefs[0].SectionName = nil
	if _, err := gw.GatewayV1().TCPRoutes("apps").Create(ctx(t), broken, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "a RouteConflict Event on the newer route", func() bool {
		return hasEvent(t, kube, "apps", "broken", "RouteConflict")
	})

	// Deleting the route withdraws the service and the annotation.
	if err := gw.GatewayV1().TCPRoutes("apps").Delete(ctx(t), "redis", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "the service to be withdrawn", func() bool { return rec.calls() == 3 && len(rec.last()) == 0 })
	testwait.For(t, 10*time.Second, "the Gateway annotation to go", func() bool {
		g, err := gw.GatewayV1().Gateways("apps").Get(ctx(t), "edge", metav1.GetOptions{})
		_, has := g.Annotations[discovery.AnnotationEndpoints]
		return err == nil && !has
	})
	// A listener that admits routes from namespaces with a label follows
	// the namespace's labels as they change.
	shared := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "shared", Labels: map[string]string{"pipeops.io/managed": "true"}},
		Spec:       gwv1.GatewaySpec{GatewayClassName: "istio"},
	}
	for i, name := range []string{"redis", "cache"} {
		shared.Spec.Listeners = append(shared.Spec.Listeners, gwv1.Listener{
			Name: gwv1.SectionName(name), Port: gwv1.PortNumber(6380 + i), Protocol: gwv1.TCPProtocolType,
			AllowedRoutes: &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{
				From:     ptrTo(gwv1.NamespacesFromSelector),
				Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"portway-test/access": "true"}},
			}},
		})
	}
	if _, err := gw.GatewayV1().Gateways("apps").Create(ctx(t), shared, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cross := tcpRoute("databases", "redis", "shared", "databases", "redis", 6379)
	cross.Spec.ParentRefs[0].Namespace = ptrTo(gwv1.Namespace("apps"))
	if _, err := gw.GatewayV1().TCPRoutes("databases").Create(ctx(t), cross, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "a RouteNotAllowed Event on the route from an unlabelled namespace", func() bool {
		return hasEvent(t, kube, "databases", "redis", "RouteNotAllowed")
	})
	if n := len(rec.last()); n != 0 {
		t.Fatalf("%d services published for a route its listener does not admit", n)
	}
	setAccess := func(labels map[string]string) {
		t.Helper()
		ns, err := kube.CoreV1().Namespaces().Get(ctx(t), "databases", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ns.Labels = labels
		if _, err := kube.CoreV1().Namespaces().Update(ctx(t), ns, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setAccess(map[string]string{"portway-test/access": "true"})
	testwait.For(t, 10*time.Second, "the route to attach once its namespace has the label", func() bool {
		l := rec.last()
		return len(l) == 1 && l[0].ID == "apps/shared/redis"
	})
	setAccess(nil)
	testwait.For(t, 10*time.Second, "the service to be withdrawn once the label is gone", func() bool { return len(rec.last()) == 0 })

	// A route from outside the Gateway's namespace may use a Service of a
	// third namespace only while a ReferenceGrant there allows it.
	if _, err := kube.CoreV1().Namespaces().Create(ctx(t), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "cache"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Services("cache").Create(ctx(t), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "cache", Name: "redis"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 6379}}, Selector: map[string]string{"app": "redis"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	setAccess(map[string]string{"portway-test/access": "true"})
	third := tcpRoute("databases", "cache", "shared", "cache", "redis", 6379)
	third.Spec.ParentRefs[0].Namespace = ptrTo(gwv1.Namespace("apps"))
	third.Spec.ParentRefs[0].SectionName = ptrTo(gwv1.SectionName("cache"))
	if _, err := gw.GatewayV1().TCPRoutes("databases").Create(ctx(t), third, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "a RefNotPermitted Event on the route to another namespace's Service", func() bool {
		return hasEvent(t, kube, "databases", "cache", "RefNotPermitted")
	})
	published := func() []string {
		var ids []string
		for _, s := range rec.last() {
			ids = append(ids, s.ID)
		}
		slices.Sort(ids)
		return ids
	}
	testwait.For(t, 10*time.Second, "only the route to its own namespace's Service to be published", func() bool {
		return slices.Equal(published(), []string{"apps/shared/redis"})
	})
	rg := &gwv1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: "cache", Name: "from-databases"}}
	rg.Spec.From = []gwv1.ReferenceGrantFrom{{Group: gwv1.GroupName, Kind: "TCPRoute", Namespace: "databases"}}
	rg.Spec.To = []gwv1.ReferenceGrantTo{{Group: "", Kind: "Service", Name: ptrTo(gwv1.ObjectName("redis"))}}
	if _, err := gw.GatewayV1().ReferenceGrants("cache").Create(ctx(t), rg, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "the route to be published once a ReferenceGrant allows it", func() bool {
		return slices.Equal(published(), []string{"apps/shared/cache", "apps/shared/redis"})
	})
	if err := gw.GatewayV1().ReferenceGrants("cache").Delete(ctx(t), "from-databases", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "the route to be withdrawn once the ReferenceGrant is gone", func() bool {
		return slices.Equal(published(), []string{"apps/shared/redis"})
	})

	testTenantCannotReachFurther(t, kube, gw, rec, logs)

	for _, bad := range []string{"forbidden", "writing annotation failed", "recording Event failed", "cannot read Namespaces"} {
		if strings.Contains(logs.String(), bad) {
			t.Errorf("the log says %q", bad)
		}
	}
}

// testTenantCannotReachFurther continues testDiscoveryAsServiceAccount (apps
// is the agent's namespace; databases a tenant's, whose routes the Gateways
// in apps may admit): a tenant neither manages a Gateway of its own nor
// reaches, through a Service of its namespace, beyond what it may use.
func testTenantCannotReachFurther(t *testing.T, kube kubernetes.Interface, gw gwclient.Interface, rec *recorder, logs *testlog.Buffer) {
	published := func() []string {
		var ids []string
		for _, s := range rec.last() {
			ids = append(ids, s.ID+"="+s.Backend)
		}
		slices.Sort(ids)
		return ids
	}
	before := published()
	createSvc := func(s *corev1.Service) {
		t.Helper()
		if _, err := kube.CoreV1().Services(s.Namespace).Create(ctx(t), s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	createRoute := func(r *gwv1.TCPRoute) {
		t.Helper()
		if _, err := gw.GatewayV1().TCPRoutes(r.Namespace).Create(ctx(t), r, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// A labelled Gateway in the tenant's namespace is not managed: its
	// route to another namespace's Service is not published.
	own := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "databases", Name: "mine", Labels: map[string]string{"pipeops.io/managed": "true"}},
		Spec:       gwv1.GatewaySpec{GatewayClassName: "istio", Listeners: []gwv1.Listener{{Name: "redis", Port: 7000, Protocol: gwv1.TCPProtocolType}}},
	}
	if _, err := gw.GatewayV1().Gateways("databases").Create(ctx(t), own, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	createRoute(tcpRoute("databases", "steal", "mine", "cache", "redis", 6379))
	testwait.For(t, 10*time.Second, "a GatewayNotPermitted Event on the tenant's Gateway", func() bool {
		return hasEventOn(t, kube, "Gateway", "databases", "mine", "GatewayNotPermitted")
	})

	// An ExternalName Service of the tenant's namespace, behind a listener
	// of the agent's namespace that admits every namespace's routes.
	all := gwv1.NamespacesFromAll
	open := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "apps", Name: "open", Labels: map[string]string{"pipeops.io/managed": "true"}},
		Spec:       gwv1.GatewaySpec{GatewayClassName: "istio"},
	}
	for i, name := range []string{"redis", "hand"} {
		open.Spec.Listeners = append(open.Spec.Listeners, gwv1.Listener{
			Name: gwv1.SectionName(name), Port: gwv1.PortNumber(7100 + i), Protocol: gwv1.TCPProtocolType,
			AllowedRoutes: &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &all}},
		})
	}
	if _, err := gw.GatewayV1().Gateways("apps").Create(ctx(t), open, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	createSvc(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "databases", Name: "ext"},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "169.254.169.254"},
	})
	createSvc(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "cache", Name: "memcached"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 6379}}, Selector: map[string]string{"app": "memcached"}},
	})
	ext := tcpRoute("databases", "ext", "open", "databases", "ext", 6379)
	ext.Spec.ParentRefs[0].Namespace = ptrTo(gwv1.Namespace("apps"))
	createRoute(ext)
	testwait.For(t, 10*time.Second, "a RefNotPermitted Event on the route to an ExternalName Service", func() bool {
		return hasEvent(t, kube, "databases", "ext", "RefNotPermitted")
	})
	// Pointed at another namespace's Service, it needs a ReferenceGrant
	// there, as a backendRef to that Service would.
	svc, err := kube.CoreV1().Services("databases").Get(ctx(t), "ext", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc.Spec.ExternalName = "memcached.cache.svc.cluster.local"
	if _, err := kube.CoreV1().Services("databases").Update(ctx(t), svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "the refusal to name the Service the ExternalName points at", func() bool {
		return strings.Contains(logs.String(), "backend Service databases/ext is an ExternalName Service for Service cache/memcached, and no ReferenceGrant in cache lets TCPRoutes of namespace databases use it; not exposed")
	})
	rg := &gwv1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: "cache", Name: "ext-from-databases"}}
	rg.Spec.From = []gwv1.ReferenceGrantFrom{{Group: gwv1.GroupName, Kind: "TCPRoute", Namespace: "databases"}}
	rg.Spec.To = []gwv1.ReferenceGrantTo{{Group: "", Kind: "Service", Name: ptrTo(gwv1.ObjectName("memcached"))}}
	if _, err := gw.GatewayV1().ReferenceGrants("cache").Create(ctx(t), rg, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := append(slices.Clone(before), "apps/open/redis=memcached.cache.svc.cluster.local:6379")
	slices.Sort(want)
	testwait.For(t, 10*time.Second, "the ExternalName route to be published once a ReferenceGrant allows it", func() bool {
		return slices.Equal(published(), want)
	})
	if err := gw.GatewayV1().ReferenceGrants("cache").Delete(ctx(t), "ext-from-databases", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "the ExternalName route to be withdrawn once the ReferenceGrant is gone", func() bool {
		return slices.Equal(published(), before)
	})

	// A Service of the tenant's namespace with an EndpointSlice written by
	// hand, whose address is another namespace's Pod.
	createSvc(&corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "databases", Name: "hand"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 6379}}, Selector: map[string]string{"app": "hand"}},
	})
	hand := tcpRoute("databases", "hand", "open", "databases", "hand", 6379)
	hand.Spec.ParentRefs[0].Namespace = ptrTo(gwv1.Namespace("apps"))
	hand.Spec.ParentRefs[0].SectionName = ptrTo(gwv1.SectionName("hand"))
	createRoute(hand)
	testwait.For(t, 10*time.Second, "the route to a Service with no endpoints yet to be published", func() bool {
		return slices.ContainsFunc(published(), func(s string) bool { return strings.HasPrefix(s, "apps/open/hand=") })
	})
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "databases", Name: "hand-1", Labels: map[string]string{discoveryv1.LabelServiceName: "hand"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.9.9"},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "cache", Name: "redis-0"}}},
		Ports: []discoveryv1.EndpointPort{{Port: ptrTo(int32(6379))}},
	}
	if _, err := kube.DiscoveryV1().EndpointSlices("databases").Create(ctx(t), es, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "the route to be withdrawn once its Service has a hand-written EndpointSlice", func() bool {
		return slices.Equal(published(), before)
	})
	testwait.For(t, 10*time.Second, "a RefNotPermitted Event on that route", func() bool {
		return hasEvent(t, kube, "databases", "hand", "RefNotPermitted")
	})
	if n := strings.Count(logs.String(), "managed Gateways may only live in namespaces apps"); n != 1 {
		t.Errorf("the tenant's Gateway was reported %d times in the log, want once", n)
	}
}

func ptrTo[T any](v T) *T { return &v }

// hasEvent reports whether discovery (instance "test") recorded an Event
// with reason about the TCPRoute ns/name.
func hasEvent(t *testing.T, kube kubernetes.Interface, ns, name, reason string) bool {
	t.Helper()
	return hasEventOn(t, kube, "TCPRoute", ns, name, reason)
}

// hasEventOn is hasEvent for an object of any kind.
func hasEventOn(t *testing.T, kube kubernetes.Interface, kind, ns, name, reason string) bool {
	t.Helper()
	evs, err := kube.EventsV1().Events(ns).List(ctx(t), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs.Items {
		if e.Regarding.Name == name && e.Regarding.Kind == kind && e.Reason == reason && e.ReportingInstance == "test" {
			return true
		}
	}
	return false
}

// recorder keeps what Publish was given.
type recorder struct {
	mu   sync.Mutex
	sets [][]discovery.Service
}

func (r *recorder) publish(s []discovery.Service) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sets = append(r.sets, s)
}

func (r *recorder) calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sets)
}

func (r *recorder) last() []discovery.Service {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.sets) == 0 {
		return nil
	}
	return r.sets[len(r.sets)-1]
}

func tcpRoute(ns, name, gateway, backendNS, backend string, port int) *gwv1.TCPRoute {
	section := gwv1.SectionName("redis")
	bns := gwv1.Namespace(backendNS)
	p := gwv1.PortNumber(port)
	r := &gwv1.TCPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	r.Spec.ParentRefs = []gwv1.ParentReference{{Name: gwv1.ObjectName(gateway), SectionName: &section}}
	r.Spec.Rules = []gwv1.TCPRouteRule{{BackendRefs: []gwv1.BackendRef{{BackendObjectReference: gwv1.BackendObjectReference{
		Name: gwv1.ObjectName(backend), Namespace: &bns, Port: &p,
	}}}}}
	return r
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// TestRESTConfigPrecedence: kubernetes.kubeconfig, then KUBECONFIG, then
// the in-cluster service account.
func TestRESTConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	write := func(name, server string) string {
		p := filepath.Join(dir, name)
		kc := "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: " + server +
			"}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\nusers:\n- name: u\n  user: {token: t}\n"
		if err := os.WriteFile(p, []byte(kc), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	fromFile := write("file", "https://file.example:6443")
	fromEnv := write("env", "https://env.example:6443")
	env := func(k string) string { return map[string]string{"KUBECONFIG": fromEnv}[k] }
	noEnv := func(string) string { return "" }

	cfg, src, err := discovery.RESTConfig(fromFile, env)
	if err != nil || cfg.Host != "https://file.example:6443" || !strings.Contains(src, "kubernetes.kubeconfig") {
		t.Errorf("kubernetes.kubeconfig and KUBECONFIG: %v %q %v", cfg, src, err)
	}
	cfg, src, err = discovery.RESTConfig("", env)
	if err != nil || cfg.Host != "https://env.example:6443" || !strings.Contains(src, "KUBECONFIG") {
		t.Errorf("KUBECONFIG: %v %q %v", cfg, src, err)
	}
	if _, _, err := discovery.RESTConfig(filepath.Join(dir, "missing"), env); err == nil || !strings.Contains(err.Error(), "kubernetes.kubeconfig") {
		t.Errorf("a missing kubernetes.kubeconfig file: %v", err)
	}
	if os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		if _, _, err := discovery.RESTConfig("", noEnv); err == nil || !strings.Contains(err.Error(), "set kubernetes.kubeconfig or KUBECONFIG") {
			t.Errorf("outside a cluster, no kubeconfig: %v", err)
		}
	}
}

// TestAgentNamespace: POD_NAMESPACE, then the service account's namespace
// file, else an error naming the key to set.
func TestAgentNamespace(t *testing.T) {
	dir := t.TempDir()
	saFile := filepath.Join(dir, "namespace")
	env := func(k string) string { return map[string]string{"POD_NAMESPACE": "from-env"}[k] }
	noEnv := func(string) string { return "" }

	if err := os.WriteFile(saFile, []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if ns, src, err := discovery.AgentNamespaceFrom(env, saFile); ns != "from-env" || src != "POD_NAMESPACE" || err != nil {
		t.Errorf("POD_NAMESPACE and the file: %q %q %v", ns, src, err)
	}
	if ns, src, err := discovery.AgentNamespaceFrom(noEnv, saFile); ns != "from-file" || src != saFile || err != nil {
		t.Errorf("the file: %q %q %v", ns, src, err)
	}
	for _, f := range []string{filepath.Join(dir, "missing"), saFile} {
		if f == saFile {
			if err := os.WriteFile(saFile, []byte(" \n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, err := discovery.AgentNamespaceFrom(noEnv, f); err == nil || !strings.Contains(err.Error(), "tunnels.discovery.gateway_namespaces") ||
			!strings.Contains(err.Error(), "set POD_NAMESPACE") {
			t.Errorf("neither (%s): %v", f, err)
		}
	}
	if err := os.Chmod(saFile, 0); err == nil && os.Geteuid() != 0 {
		if _, _, err := discovery.AgentNamespaceFrom(noEnv, saFile); err == nil || !strings.Contains(err.Error(), "reading the agent's namespace") {
			t.Errorf("an unreadable file: %v", err)
		}
	}

	// New needs one or the other.
	o := discovery.Options{Config: &rest.Config{Host: "https://127.0.0.1:1"}, Publish: func([]discovery.Service) {}, Tunnels: config.DefaultAgent().Tunnels}
	if _, err := discovery.New(o); err == nil || !strings.Contains(err.Error(), "tunnels.discovery.gateway_namespaces is empty") {
		t.Errorf("New with neither gateway_namespaces nor the agent's namespace: %v", err)
	}
	o.Namespace = "pipeops-system"
	if _, err := discovery.New(o); err != nil {
		t.Errorf("New with the agent's namespace: %v", err)
	}
}
