package discovery

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwlisters "sigs.k8s.io/gateway-api/pkg/client/listers/apis/v1"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
)

// These tests run compute on listers filled by hand: the same code path as
// on informer caches, without an API server. The scenarios against a real
// kube-apiserver are in internal/cli's TestKubernetesEndToEnd and in
// TestWithAPIServer here.

const label = "pipeops.io/managed"

func newIndexer() cache.Indexer {
	return cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
}

// testWorld builds a world holding objs (Gateways, TCPRoutes, UDPRoutes at
// v1, Services, EndpointSlices, Namespaces, ReferenceGrants).
func testWorld(t *testing.T, objs ...runtime.Object) *world {
	t.Helper()
	gws, svcs, slices, tcp, udp, nss, grants := newIndexer(), newIndexer(), newIndexer(), newIndexer(), newIndexer(), newIndexer(), newIndexer()
	for _, o := range objs {
		var err error
		switch o.(type) {
		case *corev1.Namespace:
			err = nss.Add(o)
		case *gwv1.ReferenceGrant:
			err = grants.Add(o)
		case *gwv1.Gateway:
			err = gws.Add(o)
		case *corev1.Service:
			err = svcs.Add(o)
		case *discoveryv1.EndpointSlice:
			err = slices.Add(o)
		case *gwv1.TCPRoute:
			err = tcp.Add(o)
		case *gwv1.UDPRoute:
			err = udp.Add(o)
		default:
			t.Fatalf("testWorld: unsupported %T", o)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	tcpLister, udpLister := gwlisters.NewTCPRouteLister(tcp), gwlisters.NewUDPRouteLister(udp)
	grantLister := gwlisters.NewReferenceGrantLister(grants)
	return &world{
		grants: &grantSource{list: func(ns string) ([]gwv1.ReferenceGrantSpec, error) {
			return grantSpecs(grantLister.ReferenceGrants(ns).List, func(g *gwv1.ReferenceGrant) gwv1.ReferenceGrantSpec { return g.Spec })
		}},
		gateways:   gwlisters.NewGatewayLister(gws),
		services:   corelisters.NewServiceLister(svcs),
		slices:     discoverylisters.NewEndpointSliceLister(slices),
		namespaces: corelisters.NewNamespaceLister(nss),
		routes: map[protocol.Kind]*routeSource{
			protocol.KindTCP: {kind: "TCPRoute", version: "v1", list: func() ([]route, error) {
				return listRoutes(tcpLister.List, "TCPRoute", "v1", specTCPv1)
			}},
			protocol.KindUDP: {kind: "UDPRoute", version: "v1", list: func() ([]route, error) {
				return listRoutes(udpLister.List, "UDPRoute", "v1", specUDPv1)
			}},
		},
	}
}

// defaultTunnels are the defaults, with tunnels.discovery.gateway_namespaces
// listing the namespaces where these tests keep managed Gateways.
func defaultTunnels() config.Tunnels {
	t := config.DefaultAgent().Tunnels
	t.Discovery.GatewayNamespaces = []string{"pipeops-system", "ns", "edge", "a", "b", "c", "team-a", "team-b"}
	return t
}

type listenerSpec struct {
	name  string
	port  int32
	proto gwv1.ProtocolType
}

func gateway(ns, name string, labels, annotations map[string]string, ls ...listenerSpec) *gwv1.Gateway {
	g := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels, Annotations: annotations}}
	for _, l := range ls {
		g.Spec.Listeners = append(g.Spec.Listeners, gwv1.Listener{Name: gwv1.SectionName(l.name), Port: gwv1.PortNumber(l.port), Protocol: l.proto})
	}
	return g
}

func managedGateway(ns, name string, ls ...listenerSpec) *gwv1.Gateway {
	return gateway(ns, name, map[string]string{label: "true"}, nil, ls...)
}

func tcpL(name string, port int32) listenerSpec {
	return listenerSpec{name, port, gwv1.TCPProtocolType}
}
func udpL(name string, port int32) listenerSpec {
	return listenerSpec{name, port, gwv1.UDPProtocolType}
}

func parent(gw, section string) gwv1.ParentReference {
	p := gwv1.ParentReference{Name: gwv1.ObjectName(gw)}
	if section != "" {
		s := gwv1.SectionName(section)
		p.SectionName = &s
	}
	return p
}

func backend(ns, name string, port int32) gwv1.BackendRef {
	b := gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name)}}
	if ns != "" {
		n := gwv1.Namespace(ns)
		b.Namespace = &n
	}
	if port != 0 {
		p := gwv1.PortNumber(port)
		b.Port = &p
	}
	return b
}

func tcpRoute(ns, name string, created time.Time, parents []gwv1.ParentReference, backends ...gwv1.BackendRef) *gwv1.TCPRoute {
	r := &gwv1.TCPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, CreationTimestamp: metav1.NewTime(created)}}
	r.Spec.ParentRefs = parents
	r.Spec.Rules = []gwv1.TCPRouteRule{{BackendRefs: backends}}
	return r
}

func udpRoute(ns, name string, parents []gwv1.ParentReference, backends ...gwv1.BackendRef) *gwv1.UDPRoute {
	r := &gwv1.UDPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	r.Spec.ParentRefs = parents
	r.Spec.Rules = []gwv1.UDPRouteRule{{BackendRefs: backends}}
	return r
}

// clusterIPService returns a Service selecting its namespace's Pods
// labelled app=name.
func clusterIPService(ns, name, ip string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{ClusterIP: ip, Ports: ports, Selector: map[string]string{"app": name}}}
}

func port(name string, p int32, proto corev1.Protocol) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: p, Protocol: proto}
}

func slice(ns, svc, name, portName string, p int32, proto corev1.Protocol, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   eps,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Port: &p, Protocol: &proto}},
	}
}

func endpoint(addr string, ready *bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: ready}}
}

func ptr[T any](v T) *T { return &v }

func mustCompute(t *testing.T, w *world, tun config.Tunnels) result {
	t.Helper()
	res, err := compute(w, tun)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// backends maps service id → "protocol backend mode".
func backends(res result) map[string]string {
	m := map[string]string{}
	for _, s := range res.services {
		m[s.ID] = s.Protocol.String() + " " + s.Backend + " " + string(s.Mode)
	}
	return m
}

// problems maps "reason object[ subject]" → message.
func problems(res result) map[string]string {
	m := map[string]string{}
	for _, p := range res.problems {
		k := p.reason + " " + p.obj.String()
		if p.subject != "" {
			k += " " + p.subject
		}
		m[k] = p.message
	}
	return m
}

func equalMaps(t *testing.T, what string, got, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s[%q] = %q, want %q", what, k, got[k], v)
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected %s[%q] = %q", what, k, v)
		}
	}
}

func hasKeys(t *testing.T, what string, got map[string]string, want ...string) {
	t.Helper()
	var keys []string
	for k := range got {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	slices.Sort(want)
	if !slices.Equal(keys, want) {
		t.Errorf("%s: got %q, want %q", what, keys, want)
	}
}

func TestPipeOpsQuickStart(t *testing.T) {
	// The PipeOps quick start: a labelled Gateway with three TCP listeners,
	// routes in its namespace with sectionName to Services in another.
	w := testWorld(t,
		managedGateway("pipeops-system", "tcp-gateway", tcpL("postgres", 5432), tcpL("redis", 6379), tcpL("ssh", 2222)),
		tcpRoute("pipeops-system", "postgres-route", time.Unix(1, 0), []gwv1.ParentReference{parent("tcp-gateway", "postgres")}, backend("databases", "postgres-service", 5432)),
		tcpRoute("pipeops-system", "redis-route", time.Unix(2, 0), []gwv1.ParentReference{parent("tcp-gateway", "redis")}, backend("databases", "redis-service", 6379)),
		clusterIPService("databases", "postgres-service", "10.96.0.10", port("pg", 5432, "")),
		clusterIPService("databases", "redis-service", "10.96.0.11", port("redis", 6379, corev1.ProtocolTCP)),
	)
	res := mustCompute(t, w, defaultTunnels())
	equalMaps(t, "services", backends(res), map[string]string{
		"pipeops-system/tcp-gateway/postgres": "tcp 10.96.0.10:5432 tunnel",
		"pipeops-system/tcp-gateway/redis":    "tcp 10.96.0.11:6379 tunnel",
	})
	hasKeys(t, "problems", problems(res), "NoRoute Gateway pipeops-system/tcp-gateway ssh")
	for _, s := range res.services {
		if s.Port != map[string]int{"pipeops-system/tcp-gateway/postgres": 5432, "pipeops-system/tcp-gateway/redis": 6379}[s.ID] {
			t.Errorf("%s: port %d is not the listener's", s.ID, s.Port)
		}
	}
}

func TestHeadlessServiceResolvesThroughEndpointSlices(t *testing.T) {
	gw := managedGateway("ns", "gw", tcpL("redis", 6379), udpL("dns", 53))
	headless := clusterIPService("db", "redis", corev1.ClusterIPNone, port("client", 6379, ""), port("metrics", 9121, ""))
	dnsSvc := clusterIPService("db", "dns", corev1.ClusterIPNone, port("dns-tcp", 53, corev1.ProtocolTCP), port("dns", 53, corev1.ProtocolUDP))
	objs := []runtime.Object{
		gw,
		tcpRoute("ns", "r", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "redis")}, backend("db", "redis", 6379)),
		udpRoute("ns", "d", []gwv1.ParentReference{parent("gw", "dns")}, backend("db", "dns", 53)),
		headless, dnsSvc,
		// The target port comes from the slice port with the Service
		// port's name; not-ready endpoints are skipped; the choice is the
		// smallest ready address, stable across recomputes.
		slice("db", "redis", "redis-metrics", "metrics", 9121, corev1.ProtocolTCP, endpoint("10.244.0.1", nil)),
		slice("db", "redis", "redis-a", "client", 16379, corev1.ProtocolTCP,
			endpoint("10.244.0.9", ptr(true)), endpoint("10.244.0.2", ptr(false))),
		slice("db", "redis", "redis-b", "client", 16379, corev1.ProtocolTCP, endpoint("10.244.0.5", nil)),
		slice("db", "dns", "dns-tcp", "dns-tcp", 5353, corev1.ProtocolTCP, endpoint("10.244.1.1", nil)),
		slice("db", "dns", "dns-udp", "dns", 5354, corev1.ProtocolUDP, endpoint("10.244.1.2", nil)),
		// Another Service's slice in the same namespace is not looked at.
		slice("db", "other", "other", "client", 1, corev1.ProtocolTCP, endpoint("10.0.0.1", nil)),
	}
	res := mustCompute(t, testWorld(t, objs...), defaultTunnels())
	equalMaps(t, "services", backends(res), map[string]string{
		"ns/gw/redis": "tcp 10.244.0.5:16379 tunnel",
		"ns/gw/dns":   "udp 10.244.1.2:5354 tunnel",
	})
	hasKeys(t, "problems", problems(res))

	// No ready endpoint: reported, not exposed; publishNotReadyAddresses
	// takes the not-ready ones.
	objs = []runtime.Object{gw, objs[1], headless,
		slice("db", "redis", "redis-a", "client", 16379, corev1.ProtocolTCP, endpoint("10.244.0.2", ptr(false)))}
	res = mustCompute(t, testWorld(t, objs...), defaultTunnels())
	hasKeys(t, "problems", problems(res), "NoReadyEndpoints TCPRoute ns/r redis", "NoRoute Gateway ns/gw dns")
	if len(res.services) != 0 {
		t.Errorf("exposed without a ready endpoint: %v", res.services)
	}
	publish := headless.DeepCopy()
	publish.Spec.PublishNotReadyAddresses = true
	objs[2] = publish
	res = mustCompute(t, testWorld(t, objs...), defaultTunnels())
	equalMaps(t, "services", backends(res), map[string]string{"ns/gw/redis": "tcp 10.244.0.2:16379 tunnel"})
}

func TestParentRefSelection(t *testing.T) {
	gw := managedGateway("edge", "gw", tcpL("a", 1001), tcpL("b", 1002), udpL("u", 1003), listenerSpec{"web", 80, gwv1.HTTPProtocolType})
	svc := clusterIPService("edge", "svc", "10.96.0.1", port("p", 80, ""))
	cases := []struct {
		name     string
		parent   gwv1.ParentReference
		services []string
		problems []string
	}{
		{"no sectionName: every TCP listener", parent("gw", ""), []string{"edge/gw/a", "edge/gw/b"}, nil},
		{"sectionName", parent("gw", "b"), []string{"edge/gw/b"}, []string{"NoRoute Gateway edge/gw a"}},
		{"port only", gwv1.ParentReference{Name: "gw", Port: ptr(gwv1.PortNumber(1001))}, []string{"edge/gw/a"}, []string{"NoRoute Gateway edge/gw b"}},
		{"explicit namespace", gwv1.ParentReference{Name: "gw", Namespace: ptr(gwv1.Namespace("edge"))}, []string{"edge/gw/a", "edge/gw/b"}, nil},
		{"sectionName of a UDP listener", parent("gw", "u"), nil, []string{"NoMatchingListener TCPRoute edge/r 0", "NoRoute Gateway edge/gw a", "NoRoute Gateway edge/gw b"}},
		{"a typo in sectionName", parent("gw", "typo"), nil, []string{"NoMatchingListener TCPRoute edge/r 0", "NoRoute Gateway edge/gw a", "NoRoute Gateway edge/gw b"}},
		{"another kind", gwv1.ParentReference{Name: "gw", Kind: ptr(gwv1.Kind("Service"))}, nil, []string{"NoRoute Gateway edge/gw a", "NoRoute Gateway edge/gw b"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w := testWorld(t, gw, svc, tcpRoute("edge", "r", time.Unix(1, 0), []gwv1.ParentReference{c.parent}, backend("", "svc", 80)))
			res := mustCompute(t, w, defaultTunnels())
			got := backends(res)
			var ids []string
			for id, b := range got {
				ids = append(ids, id)
				if b != "tcp 10.96.0.1:80 tunnel" {
					t.Errorf("%s: %s", id, b)
				}
			}
			slices.Sort(ids)
			if !slices.Equal(ids, c.services) {
				t.Errorf("services %q, want %q", ids, c.services)
			}
			want := append([]string{"NoRoute Gateway edge/gw u"}, c.problems...)
			hasKeys(t, "problems", problems(res), want...)
		})
	}
}

func TestAllowedRoutesAndConflicts(t *testing.T) {
	gw := managedGateway("edge", "gw", tcpL("same", 1), tcpL("all", 2), tcpL("kinds", 3))
	all := gwv1.NamespacesFromAll
	gw.Spec.Listeners[1].AllowedRoutes = &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &all}}
	gw.Spec.Listeners[2].AllowedRoutes = &gwv1.AllowedRoutes{Kinds: []gwv1.RouteGroupKind{{Kind: "UDPRoute"}}}
	other := func(section string) gwv1.ParentReference {
		p := parent("gw", section)
		p.Namespace = ptr(gwv1.Namespace("edge"))
		return p
	}
	w := testWorld(t, gw,
		clusterIPService("apps", "svc", "10.96.0.1", port("p", 80, "")),
		clusterIPService("edge", "svc", "10.96.0.2", port("p", 80, "")),
		// From another namespace: refused by Same, accepted by All.
		tcpRoute("apps", "cross", time.Unix(5, 0), []gwv1.ParentReference{other("same"), other("all")}, backend("", "svc", 80)),
		// Two routes for listener "all": the older one wins.
		tcpRoute("edge", "newer", time.Unix(9, 0), []gwv1.ParentReference{parent("gw", "all")}, backend("", "svc", 80)),
		tcpRoute("edge", "kinds", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "kinds")}, backend("", "svc", 80)),
	)
	res := mustCompute(t, w, defaultTunnels())
	equalMaps(t, "services", backends(res), map[string]string{"edge/gw/all": "tcp 10.96.0.1:80 tunnel"})
	hasKeys(t, "problems", problems(res),
		"RouteNotAllowed TCPRoute apps/cross same", "NoRoute Gateway edge/gw same",
		"RouteConflict TCPRoute edge/newer all",
		"RouteNotAllowed TCPRoute edge/kinds kinds", "NoRoute Gateway edge/gw kinds")
}

// allowedRoutes.namespaces.from: Selector admits routes from the namespaces
// whose labels match, the Gateway's own included only if it matches too.
func TestAllowedRoutesSelector(t *testing.T) {
	sel := gwv1.NamespacesFromSelector
	gw := managedGateway("edge", "gw", tcpL("db", 1), tcpL("own", 2), tcpL("none", 3), tcpL("bad", 4))
	gw.Spec.Listeners[0].AllowedRoutes = &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &sel,
		Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "db"}}}}
	gw.Spec.Listeners[1].AllowedRoutes = &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &sel,
		Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "db"}}}}
	gw.Spec.Listeners[2].AllowedRoutes = &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &sel}}
	gw.Spec.Listeners[3].AllowedRoutes = &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &sel,
		Selector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "team", Operator: "Near"}}}}}
	to := func(section string) gwv1.ParentReference {
		p := parent("gw", section)
		p.Namespace = ptr(gwv1.Namespace("edge"))
		return p
	}
	objs := []runtime.Object{gw,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "apps", Labels: map[string]string{"team": "db"}}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "web", Labels: map[string]string{"team": "web"}}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "edge"}},
		clusterIPService("apps", "svc", "10.96.0.1", port("p", 80, "")),
		clusterIPService("web", "svc", "10.96.0.2", port("p", 80, "")),
		clusterIPService("edge", "svc", "10.96.0.3", port("p", 80, "")),
		// A matching namespace: accepted, though an older route from a
		// namespace that does not match asks for the same listener.
		tcpRoute("apps", "db", time.Unix(5, 0), []gwv1.ParentReference{to("db"), to("none"), to("bad")}, backend("", "svc", 80)),
		tcpRoute("web", "db", time.Unix(1, 0), []gwv1.ParentReference{to("db")}, backend("", "svc", 80)),
		// The Gateway's own namespace, unlabelled: refused.
		tcpRoute("edge", "own", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "own")}, backend("", "svc", 80)),
	}
	res := mustCompute(t, testWorld(t, objs...), defaultTunnels())
	equalMaps(t, "services", backends(res), map[string]string{"edge/gw/db": "tcp 10.96.0.1:80 tunnel"})
	got := problems(res)
	hasKeys(t, "problems", got,
		"RouteNotAllowed TCPRoute web/db db", "RouteNotAllowed TCPRoute edge/own own", "NoRoute Gateway edge/gw own",
		"RouteNotAllowed TCPRoute apps/db none", "NoRoute Gateway edge/gw none",
		"RouteNotAllowed TCPRoute apps/db bad", "NoRoute Gateway edge/gw bad")
	for key, want := range map[string]string{
		"RouteNotAllowed TCPRoute web/db db":    "namespace web does not match allowedRoutes.namespaces.selector (team=db)",
		"RouteNotAllowed TCPRoute apps/db none": "no selector is given",
		"RouteNotAllowed TCPRoute apps/db bad":  "allowedRoutes.namespaces.selector is invalid",
	} {
		if !strings.Contains(got[key], want) {
			t.Errorf("problem %q says %q, want it to say %q", key, got[key], want)
		}
	}

	// Without read access to Namespaces, a Selector listener accepts no
	// route, and says why.
	w := testWorld(t, objs...)
	w.namespacesSynced = func() bool { return false }
	res = mustCompute(t, w, defaultTunnels())
	equalMaps(t, "services without Namespaces", backends(res), map[string]string{})
	if msg := problems(res)["RouteNotAllowed TCPRoute apps/db db"]; !strings.Contains(msg, "get, list and watch on namespaces") {
		t.Errorf("without Namespaces the route's problem says %q", msg)
	}
}

// A route outside the Gateway's namespace may use a Service of a third
// namespace only with a ReferenceGrant there; a route beside the Gateway
// needs none (the PipeOps examples rely on that).
func TestReferenceGrants(t *testing.T) {
	all := gwv1.NamespacesFromAll
	gw := managedGateway("edge", "gw", tcpL("a", 1), tcpL("b", 2), tcpL("c", 3), tcpL("d", 4))
	for i := range 3 {
		gw.Spec.Listeners[i].AllowedRoutes = &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &all}}
	}
	to := func(section string) []gwv1.ParentReference {
		p := parent("gw", section)
		p.Namespace = ptr(gwv1.Namespace("edge"))
		return []gwv1.ParentReference{p}
	}
	grant := func(name, fromKind, fromNS string, toName string) *gwv1.ReferenceGrant {
		g := &gwv1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: "db", Name: name}}
		g.Spec.From = []gwv1.ReferenceGrantFrom{{Group: gwv1.GroupName, Kind: gwv1.Kind(fromKind), Namespace: gwv1.Namespace(fromNS)}}
		g.Spec.To = []gwv1.ReferenceGrantTo{{Group: "", Kind: "Service"}}
		if toName != "" {
			g.Spec.To[0].Name = ptr(gwv1.ObjectName(toName))
		}
		return g
	}
	objs := []runtime.Object{gw,
		clusterIPService("db", "pg", "10.96.1.1", port("p", 5432, "")),
		clusterIPService("db", "other", "10.96.1.2", port("p", 5432, "")),
		grant("apps-all", "TCPRoute", "apps", ""),
		grant("apps2-pg-only", "TCPRoute", "apps2", "pg"),
		grant("web-udp-only", "UDPRoute", "web", ""),
		tcpRoute("apps", "granted", time.Unix(1, 0), to("a"), backend("db", "pg", 5432)),
		tcpRoute("apps2", "named", time.Unix(1, 0), to("b"), backend("db", "other", 5432)),
		tcpRoute("web", "kind", time.Unix(1, 0), to("c"), backend("db", "pg", 5432)),
		tcpRoute("edge", "beside", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "d")}, backend("db", "pg", 5432)),
	}
	res := mustCompute(t, testWorld(t, objs...), defaultTunnels())
	equalMaps(t, "services", backends(res), map[string]string{
		"edge/gw/a": "tcp 10.96.1.1:5432 tunnel",
		"edge/gw/d": "tcp 10.96.1.1:5432 tunnel",
	})
	hasKeys(t, "problems", problems(res), "RefNotPermitted TCPRoute apps2/named b", "RefNotPermitted TCPRoute web/kind c")
	if msg := problems(res)["RefNotPermitted TCPRoute web/kind c"]; !strings.Contains(msg, "no ReferenceGrant in db lets TCPRoutes of namespace web use it") {
		t.Errorf("the refusal says %q", msg)
	}

	// A cluster that serves no ReferenceGrant grants nothing.
	w := testWorld(t, objs...)
	w.grants = nil
	res = mustCompute(t, w, defaultTunnels())
	equalMaps(t, "services without ReferenceGrants", backends(res), map[string]string{"edge/gw/d": "tcp 10.96.1.1:5432 tunnel"})
}

func TestBackendProblems(t *testing.T) {
	gw := managedGateway("ns", "gw", tcpL("t", 1), udpL("u", 2))
	cases := []struct {
		name    string
		backend gwv1.BackendRef
		udp     bool
		svc     *corev1.Service
		want    string // backend, or the problem reason
	}{
		{"missing Service", backend("", "nope", 80), false, nil, reasonBackendNotFound},
		{"no port", backend("", "svc", 0), false, clusterIPService("ns", "svc", "10.96.0.1", port("p", 80, "")), reasonBackendPort},
		{"port not on the Service", backend("", "svc", 81), false, clusterIPService("ns", "svc", "10.96.0.1", port("p", 80, "")), reasonBackendPort},
		{"UDP listener, TCP-only Service", backend("", "svc", 53), true, clusterIPService("ns", "svc", "10.96.0.1", port("dns", 53, "")), reasonBackendPort},
		{"UDP listener, UDP port", backend("", "svc", 53), true, clusterIPService("ns", "svc", "10.96.0.1", port("dns", 53, corev1.ProtocolUDP)), "10.96.0.1:53"},
		{"IPv6 ClusterIP", backend("", "svc", 80), false, clusterIPService("ns", "svc", "fd00::1", port("p", 80, "")), "[fd00::1]:80"},
		{"ExternalName", backend("", "svc", 5432), false, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "svc"},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "db.example.internal"}}, "db.example.internal:5432"},
		{"not a Service", func() gwv1.BackendRef {
			b := backend("", "svc", 80)
			b.Kind = ptr(gwv1.Kind("Bucket"))
			b.Group = ptr(gwv1.Group("storage.example.com"))
			return b
		}(), false, clusterIPService("ns", "svc", "10.96.0.1", port("p", 80, "")), reasonUnsupportedBackend},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			objs := []runtime.Object{gw}
			if c.svc != nil {
				objs = append(objs, c.svc)
			}
			section := "t"
			if c.udp {
				section = "u"
				objs = append(objs, udpRoute("ns", "r", []gwv1.ParentReference{parent("gw", section)}, c.backend))
			} else {
				objs = append(objs, tcpRoute("ns", "r", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", section)}, c.backend))
			}
			res := mustCompute(t, testWorld(t, objs...), defaultTunnels())
			if strings.Contains(c.want, ":") {
				if len(res.services) != 1 || res.services[0].Backend != c.want {
					t.Fatalf("services %v, want backend %s", res.services, c.want)
				}
				return
			}
			if len(res.services) != 0 {
				t.Errorf("exposed: %v", res.services)
			}
			kind := "TCPRoute"
			if c.udp {
				kind = "UDPRoute"
			}
			if _, ok := problems(res)[c.want+" "+kind+" ns/r "+section]; !ok {
				t.Errorf("problems %v, want %s", problems(res), c.want)
			}
		})
	}
	// A route without backendRefs.
	res := mustCompute(t, testWorld(t, gw, tcpRoute("ns", "r", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "t")})), defaultTunnels())
	if _, ok := problems(res)["NoBackend TCPRoute ns/r t"]; !ok {
		t.Errorf("problems %v, want NoBackend", problems(res))
	}
}

func TestDiscoverySwitchesAndLabels(t *testing.T) {
	objs := []runtime.Object{
		gateway("a", "gw", map[string]string{label: "true", "udp-only": "true"}, nil, tcpL("t", 1), udpL("u", 2)),
		gateway("b", "gw", map[string]string{label: "false"}, nil, tcpL("t", 1)), // "false" is not "true"
		gateway("c", "gw", nil, nil, tcpL("t", 1)),
		clusterIPService("a", "svc", "10.96.0.1", port("t", 1, ""), port("u", 2, corev1.ProtocolUDP)),
		tcpRoute("a", "t", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "t")}, backend("", "svc", 1)),
		udpRoute("a", "u", []gwv1.ParentReference{parent("gw", "u")}, backend("", "svc", 2)),
		tcpRoute("b", "t", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "t")}, backend("", "svc", 1)),
	}
	ids := func(tun config.Tunnels) []string {
		var out []string
		for _, s := range mustCompute(t, testWorld(t, objs...), tun).services {
			out = append(out, s.Protocol.String()+":"+s.ID)
		}
		return out
	}
	if got := ids(defaultTunnels()); !slices.Equal(got, []string{"tcp:a/gw/t", "udp:a/gw/u"}) {
		t.Errorf("default: %q", got)
	}
	tun := defaultTunnels()
	tun.Discovery.TCP.Enabled = false
	if got := ids(tun); !slices.Equal(got, []string{"udp:a/gw/u"}) {
		t.Errorf("tcp disabled: %q", got)
	}
	tun = defaultTunnels()
	tun.Discovery.UDP.GatewayLabel = "udp-only"
	tun.Discovery.TCP.GatewayLabel = "tcp-only"
	if got := ids(tun); !slices.Equal(got, []string{"udp:a/gw/u"}) {
		t.Errorf("separate labels: %q", got)
	}
}

// A labelled Gateway is managed only in tunnels.discovery.gateway_namespaces
// and, when tunnels.discovery.gateway_classes is set, with one of those
// classes; elsewhere it is reported once and otherwise left alone.
func TestGatewayScope(t *testing.T) {
	tenant := managedGateway("tenant", "gw", tcpL("pg", 5432))
	other := managedGateway("pipeops-system", "other-class", tcpL("pg", 5433))
	other.Spec.GatewayClassName = "cilium"
	ours := managedGateway("pipeops-system", "gw", tcpL("pg", 5432))
	ours.Spec.GatewayClassName = "istio"
	objs := []runtime.Object{tenant, other, ours,
		gateway("elsewhere", "plain", nil, nil, tcpL("pg", 5432)), // not labelled: not reported
		clusterIPService("db", "pg", "10.96.0.10", port("pg", 5432, "")),
		// The tenant's route beside its own Gateway, to another namespace's
		// Service: what a managed Gateway there would have allowed.
		tcpRoute("tenant", "steal", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "pg")}, backend("db", "pg", 5432)),
		tcpRoute("pipeops-system", "pg", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "pg")}, backend("db", "pg", 5432)),
		tcpRoute("pipeops-system", "pg2", time.Unix(1, 0), []gwv1.ParentReference{parent("other-class", "pg")}, backend("db", "pg", 5432)),
	}
	tun := config.DefaultAgent().Tunnels
	tun.Discovery.GatewayNamespaces = []string{"pipeops-system"}
	res := mustCompute(t, testWorld(t, objs...), tun)
	equalMaps(t, "services", backends(res), map[string]string{
		"pipeops-system/gw/pg":          "tcp 10.96.0.10:5432 tunnel",
		"pipeops-system/other-class/pg": "tcp 10.96.0.10:5432 tunnel",
	})
	got := problems(res)
	hasKeys(t, "problems", got, "GatewayNotPermitted Gateway tenant/gw")
	if msg := got["GatewayNotPermitted Gateway tenant/gw"]; !strings.Contains(msg, "may only live in namespaces pipeops-system (tunnels.discovery.gateway_namespaces); ignored") {
		t.Errorf("the refusal says %q", msg)
	}

	tun.Discovery.GatewayClasses = []string{"istio", "envoy"}
	res = mustCompute(t, testWorld(t, objs...), tun)
	equalMaps(t, "services with gateway_classes", backends(res), map[string]string{"pipeops-system/gw/pg": "tcp 10.96.0.10:5432 tunnel"})
	got = problems(res)
	hasKeys(t, "problems with gateway_classes", got, "GatewayNotPermitted Gateway tenant/gw", "GatewayNotPermitted Gateway pipeops-system/other-class")
	if msg := got["GatewayNotPermitted Gateway pipeops-system/other-class"]; !strings.Contains(msg, `gatewayClassName "cilium" is not one of istio, envoy (tunnels.discovery.gateway_classes)`) {
		t.Errorf("the class refusal says %q", msg)
	}
	for _, l := range res.listeners {
		if l.gateway.namespace == "tenant" {
			t.Errorf("listener %s of the refused Gateway tenant/gw is exposed", l.listener)
		}
	}

	// No list at all manages nothing: New always fills it.
	tun.Discovery.GatewayNamespaces, tun.Discovery.GatewayClasses = nil, nil
	if res := mustCompute(t, testWorld(t, objs...), tun); len(res.services) != 0 {
		t.Errorf("with no gateway_namespaces: %v", backends(res))
	}
}

// A route that is not beside its Gateway may not reach, through a Service
// of a namespace it may use, what lies outside: an ExternalName Service
// counts as a reference to what it names, and other Services must resolve
// to Pods of their own namespace.
func TestBackendsLeavingTheirNamespace(t *testing.T) {
	all := gwv1.NamespacesFromAll
	gw := managedGateway("edge", "gw", tcpL("db", 5432))
	gw.Spec.Listeners[0].AllowedRoutes = &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &all}}
	toGW := []gwv1.ParentReference{parent("gw", "db")}
	toGW[0].Namespace = ptr(gwv1.Namespace("edge"))
	external := func(ns, name, target string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: target}}
	}
	grant := func(ns, fromNS, to string) *gwv1.ReferenceGrant {
		g := &gwv1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "g"}}
		g.Spec.From = []gwv1.ReferenceGrantFrom{{Group: gwv1.GroupName, Kind: "TCPRoute", Namespace: gwv1.Namespace(fromNS)}}
		g.Spec.To = []gwv1.ReferenceGrantTo{{Group: "", Kind: "Service", Name: ptr(gwv1.ObjectName(to))}}
		return g
	}
	// podSlice is a slice as the EndpointSlice controller writes it, its
	// endpoints Pods of podNS.
	podSlice := func(ns, svc, podNS, addr string, managed bool) *discoveryv1.EndpointSlice {
		e := endpoint(addr, nil)
		e.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: podNS, Name: "p"}
		s := slice(ns, svc, svc+"-x", "pg", 5432, corev1.ProtocolTCP, e)
		if managed {
			s.Labels[discoveryv1.LabelManagedBy] = managedByController
		}
		return s
	}
	pg := clusterIPService("db", "pg", "10.96.0.10", port("pg", 5432, ""))
	own := clusterIPService("apps", "pg", "10.96.0.20", port("pg", 5432, ""))
	noSelector := own.DeepCopy()
	noSelector.Spec.Selector = nil
	cases := []struct {
		name string
		objs []runtime.Object
		want string // the backend, or what the RefNotPermitted problem says
	}{
		{"ExternalName for an IP address", []runtime.Object{external("apps", "pg", "169.254.169.254")},
			`backend Service apps/pg is an ExternalName Service for "169.254.169.254", which no namespace owns; only routes in the Gateway's namespace edge may use it`},
		{"ExternalName for an outside host", []runtime.Object{external("apps", "pg", "kubernetes.default.svc.attacker.example")},
			`for "kubernetes.default.svc.attacker.example", which no namespace owns`},
		{"ExternalName for another namespace's Service", []runtime.Object{external("apps", "pg", "pg.db.svc.cluster.local"), pg},
			"is an ExternalName Service for Service db/pg, and no ReferenceGrant in db lets TCPRoutes of namespace apps use it"},
		{"... with a ReferenceGrant there", []runtime.Object{external("apps", "pg", "pg.db.svc.cluster.local."), pg, grant("db", "apps", "pg")},
			"pg.db.svc.cluster.local.:5432"},
		{"... granted for another Service", []runtime.Object{external("apps", "pg", "pg.db.svc"), pg, grant("db", "apps", "other")},
			"no ReferenceGrant in db lets TCPRoutes of namespace apps use it"},
		{"... that does not exist", []runtime.Object{external("apps", "pg", "pg.db.svc"), grant("db", "apps", "pg")},
			"is an ExternalName Service for Service db/pg, which does not exist"},
		{"... which is an ExternalName leading out", []runtime.Object{external("apps", "pg", "pg.db.svc"), external("db", "pg", "10.0.0.1"), grant("db", "apps", "pg")},
			`through the ExternalName Service db/pg for "10.0.0.1", which no namespace owns`},
		{"... which has no selector", []runtime.Object{external("apps", "pg", "pg.db.svc"), &corev1.Service{ObjectMeta: pg.ObjectMeta, Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10"}}, grant("db", "apps", "pg")},
			"leads to Service db/pg, which has no selector"},
		{"ExternalName loop", []runtime.Object{external("apps", "pg", "pg.apps.svc")},
			"leads through more than 4 ExternalName Services"},
		{"ExternalName for a Service of its own namespace", []runtime.Object{external("apps", "pg", "real.apps.svc"), clusterIPService("apps", "real", "10.96.0.30", port("pg", 5432, ""))},
			"real.apps.svc:5432"},
		{"no selector", []runtime.Object{noSelector, podSlice("apps", "pg", "apps", "10.244.0.1", true)},
			"has no selector, so its endpoints are written by hand"},
		{"an EndpointSlice written by hand", []runtime.Object{own, podSlice("apps", "pg", "apps", "10.244.0.1", false)},
			"has the EndpointSlice pg-x, not kept by the EndpointSlice controller"},
		{"an endpoint that is another namespace's Pod", []runtime.Object{own, podSlice("apps", "pg", "db", "10.244.0.1", true)},
			"has an endpoint 10.244.0.1 in EndpointSlice pg-x that is not a Pod of namespace apps"},
		{"Pods of its own namespace", []runtime.Object{own, podSlice("apps", "pg", "apps", "10.244.0.1", true)},
			"10.96.0.20:5432"},
		{"no endpoints yet", []runtime.Object{own}, "10.96.0.20:5432"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			objs := append([]runtime.Object{gw, tcpRoute("apps", "r", time.Unix(1, 0), toGW, backend("", "pg", 5432))}, c.objs...)
			res := mustCompute(t, testWorld(t, objs...), defaultTunnels())
			if strings.HasSuffix(c.want, ":5432") {
				equalMaps(t, "services", backends(res), map[string]string{"edge/gw/db": "tcp " + c.want + " tunnel"})
				hasKeys(t, "problems", problems(res))
				return
			}
			equalMaps(t, "services", backends(res), map[string]string{})
			got := problems(res)
			hasKeys(t, "problems", got, "RefNotPermitted TCPRoute apps/r db")
			if msg := got["RefNotPermitted TCPRoute apps/r db"]; !strings.Contains(msg, c.want) {
				t.Errorf("the refusal says %q, want it to say %q", msg, c.want)
			}
		})
	}

	// A route beside the Gateway keeps today's rule: any Service.
	res := mustCompute(t, testWorld(t, gw, external("edge", "pg", "169.254.169.254"),
		tcpRoute("edge", "r", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "db")}, backend("", "pg", 5432))), defaultTunnels())
	equalMaps(t, "services beside the Gateway", backends(res), map[string]string{"edge/gw/db": "tcp 169.254.169.254:5432 tunnel"})

	// The same holds for a backend in a third namespace reached with a
	// ReferenceGrant: the grant covers the Service, not where it leads.
	res = mustCompute(t, testWorld(t, gw, external("db", "meta", "169.254.169.254"), grant("db", "apps", "meta"),
		tcpRoute("apps", "r", time.Unix(1, 0), toGW, backend("db", "meta", 5432))), defaultTunnels())
	if msg := problems(res)["RefNotPermitted TCPRoute apps/r db"]; !strings.Contains(msg, `backend Service db/meta is an ExternalName Service for "169.254.169.254"`) {
		t.Errorf("a granted ExternalName in a third namespace: services %v, refusal %q", backends(res), msg)
	}

	// While ReferenceGrants cannot be read, an ExternalName for a cluster
	// Service is refused and says why.
	w := testWorld(t, gw, external("apps", "pg", "pg.db.svc"), pg, grant("db", "apps", "pg"),
		tcpRoute("apps", "r", time.Unix(1, 0), toGW, backend("", "pg", 5432)))
	w.grantsSynced = func() bool { return false }
	res = mustCompute(t, w, defaultTunnels())
	if msg := problems(res)["RefNotPermitted TCPRoute apps/r db"]; len(res.services) != 0 || !strings.Contains(msg, "get, list and watch on referencegrants") {
		t.Errorf("without ReferenceGrants: services %v, refusal %q", backends(res), msg)
	}
}

func TestClusterServiceName(t *testing.T) {
	for in, want := range map[string]string{
		"pg.db.svc":                    "db/pg",
		"PG.DB.svc.cluster.local.":     "db/pg",
		"pg.db.svc.cluster.local":      "db/pg",
		"pg.db.svc.example.com":        "",
		"pg.db":                        "",
		"pg.db.svc.cluster.local.evil": "",
		"169.254.169.254":              "",
		"-pg.db.svc":                   "",
		"pg.d_b.svc":                   "",
		"":                             "",
	} {
		name, ns, ok := clusterServiceName(in)
		got := ""
		if ok {
			got = ns + "/" + name
		}
		if got != want {
			t.Errorf("clusterServiceName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestSameGatewayNameInTwoNamespaces(t *testing.T) {
	w := testWorld(t,
		managedGateway("team-a", "edge", tcpL("redis", 6379)),
		managedGateway("team-b", "edge", tcpL("redis", 6379)),
		clusterIPService("team-a", "redis", "10.96.0.1", port("r", 6379, "")),
		clusterIPService("team-b", "redis", "10.96.0.2", port("r", 6379, "")),
		tcpRoute("team-a", "r", time.Unix(1, 0), []gwv1.ParentReference{parent("edge", "")}, backend("", "redis", 6379)),
		tcpRoute("team-b", "r", time.Unix(1, 0), []gwv1.ParentReference{parent("edge", "")}, backend("", "redis", 6379)),
	)
	equalMaps(t, "services", backends(mustCompute(t, w, defaultTunnels())), map[string]string{
		"team-a/edge/redis": "tcp 10.96.0.1:6379 tunnel",
		"team-b/edge/redis": "tcp 10.96.0.2:6379 tunnel",
	})
}

func TestRoutingMode(t *testing.T) {
	ipAddr := ptr(gwv1.IPAddressType)
	host := ptr(gwv1.HostnameAddressType)
	lbService := func(name, gw string, typ corev1.ServiceType, ips ...string) *corev1.Service {
		s := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{LabelGatewayName: gw}},
			Spec: corev1.ServiceSpec{Type: typ}}
		for _, ip := range ips {
			s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: ip})
		}
		return s
	}
	cases := []struct {
		name       string
		annotation string // "" none
		status     []gwv1.GatewayStatusAddress
		services   []*corev1.Service
		force      bool
		dual       bool
		wantMode   Mode
		wantPublic string
		wantProb   string
	}{
		{name: "nothing: tunnel", wantMode: ModeTunnel},
		{name: "private status address", status: []gwv1.GatewayStatusAddress{{Type: ipAddr, Value: "10.1.2.3"}}, wantMode: ModeTunnel},
		{name: "CGNAT status address", status: []gwv1.GatewayStatusAddress{{Value: "100.64.1.1"}}, wantMode: ModeTunnel},
		{name: "hostname is not evidence", status: []gwv1.GatewayStatusAddress{{Type: host, Value: "gw.example.com"}}, wantMode: ModeTunnel},
		{name: "public status address", status: []gwv1.GatewayStatusAddress{{Type: ipAddr, Value: "10.0.0.1"}, {Value: "203.0.113.5"}},
			wantMode: ModeDirect, wantPublic: "203.0.113.5"},
		{name: "public status address, dual enabled", status: []gwv1.GatewayStatusAddress{{Value: "203.0.113.5"}}, dual: true,
			wantMode: ModeDual, wantPublic: "203.0.113.5"},
		{name: "public address, forced tunnel", status: []gwv1.GatewayStatusAddress{{Value: "203.0.113.5"}}, force: true, dual: true,
			wantMode: ModeTunnel, wantPublic: "203.0.113.5"},
		{name: "LoadBalancer Service of the Gateway", services: []*corev1.Service{
			lbService("a", "gw", corev1.ServiceTypeLoadBalancer, "192.168.1.1", "198.51.100.9")}, wantMode: ModeDirect, wantPublic: "198.51.100.9"},
		{name: "LoadBalancer Service of another Gateway", services: []*corev1.Service{
			lbService("a", "other", corev1.ServiceTypeLoadBalancer, "198.51.100.9")}, wantMode: ModeTunnel},
		{name: "ClusterIP Service of the Gateway", services: []*corev1.Service{
			lbService("a", "gw", corev1.ServiceTypeClusterIP, "198.51.100.9")}, wantMode: ModeTunnel},
		{name: "annotation wins over force", annotation: "dual", force: true, status: []gwv1.GatewayStatusAddress{{Value: "203.0.113.5"}},
			wantMode: ModeDual, wantPublic: "203.0.113.5"},
		{name: "annotation tunnel wins over a public address", annotation: " Tunnel ", status: []gwv1.GatewayStatusAddress{{Value: "203.0.113.5"}},
			wantMode: ModeTunnel, wantPublic: "203.0.113.5"},
		{name: "annotation direct without a public address", annotation: "direct", wantMode: ModeDirect, wantProb: reasonNoPublicAddress},
		{name: "invalid annotation ignored", annotation: "sideways", status: []gwv1.GatewayStatusAddress{{Value: "203.0.113.5"}},
			wantMode: ModeDirect, wantPublic: "203.0.113.5", wantProb: reasonInvalidAnnotation},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			g := managedGateway("ns", "gw")
			if c.annotation != "" {
				g.Annotations = map[string]string{AnnotationRoutingMode: c.annotation}
			}
			g.Status.Addresses = c.status
			objs := []runtime.Object{g}
			for _, s := range c.services {
				objs = append(objs, s)
			}
			w := testWorld(t, objs...)
			mode, public, probs := routingMode(g, refOf("Gateway", "gateway.networking.k8s.io/v1", g), w.services,
				config.Routing{ForceTunnelMode: c.force, DualModeEnabled: c.dual})
			if mode != c.wantMode || public != c.wantPublic {
				t.Errorf("mode %s, public %q; want %s, %q", mode, public, c.wantMode, c.wantPublic)
			}
			var reasons []string
			for _, p := range probs {
				reasons = append(reasons, p.reason)
			}
			if (c.wantProb == "" && len(reasons) > 0) || (c.wantProb != "" && !slices.Equal(reasons, []string{c.wantProb})) {
				t.Errorf("problems %q, want %q", reasons, c.wantProb)
			}
		})
	}
}

func TestIsPublic(t *testing.T) {
	for addr, want := range map[string]bool{
		"203.0.113.10": true, "8.8.8.8": true, "2001:db8::1": true, "::ffff:8.8.8.8": true,
		"10.1.2.3": false, "172.16.0.1": false, "192.168.1.1": false, "127.0.0.1": false, "169.254.1.1": false,
		"100.64.0.1": false, "100.127.255.255": false, "0.0.0.0": false, "224.0.0.1": false,
		"::1": false, "fe80::1": false, "fd00::1": false, "::": false,
	} {
		if got := isPublic(netip.MustParseAddr(addr)); got != want {
			t.Errorf("isPublic(%s) = %v, want %v", addr, got, want)
		}
	}
}

func TestIdleTimeoutAnnotation(t *testing.T) {
	for v, want := range map[string]time.Duration{"10m": 10 * time.Minute, " 90s ": 90 * time.Second, "100ms": 100 * time.Millisecond,
		"banana": 0, "10": 0, "0s": 0, "-1m": 0, "50ms": 0} {
		g := gateway("ns", "gw", nil, map[string]string{AnnotationIdleTimeout: v})
		got, prob := idleTimeout(g, refOf("Gateway", "gateway.networking.k8s.io/v1", g))
		if got != want || (want == 0) != (prob != nil) {
			t.Errorf("idle-timeout %q: %v, problem %v; want %v", v, got, prob, want)
		}
	}
	// The override reaches every service of the Gateway.
	g := managedGateway("ns", "gw", tcpL("t", 1))
	g.Annotations = map[string]string{AnnotationIdleTimeout: "2m"}
	res := mustCompute(t, testWorld(t, g, clusterIPService("ns", "svc", "10.96.0.1", port("p", 1, "")),
		tcpRoute("ns", "r", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "")}, backend("", "svc", 1))), defaultTunnels())
	if len(res.services) != 1 || res.services[0].IdleTimeout != 2*time.Minute {
		t.Errorf("services %v, want idle timeout 2m", res.services)
	}
}

func TestDesiredAnnotations(t *testing.T) {
	gwRef := objectRef{kind: "Gateway", namespace: "ns", name: "gw"}
	rRef := objectRef{kind: "TCPRoute", namespace: "ns", name: "r"}
	uRef := objectRef{kind: "UDPRoute", namespace: "ns", name: "u"}
	ls := []listenerResult{
		{gateway: gwRef, listener: "redis", route: rRef, service: Service{ID: "ns/gw/redis", Protocol: protocol.KindTCP, Mode: ModeDual}, direct: "203.0.113.1:6379"},
		{gateway: gwRef, listener: "dns", route: uRef, service: Service{ID: "ns/gw/dns", Protocol: protocol.KindUDP, Mode: ModeTunnel}},
		{gateway: gwRef, listener: "pg", route: rRef, service: Service{ID: "ns/gw/pg", Protocol: protocol.KindTCP, Mode: ModeDirect}, directErr: "no public address"},
		{gateway: gwRef, listener: "pending", route: rRef, service: Service{ID: "ns/gw/pending", Protocol: protocol.KindTCP, Mode: ModeTunnel}},
	}
	eps := map[protocol.ServiceKey]Endpoint{
		{ID: "ns/gw/redis", Kind: protocol.KindTCP}: {ID: "ns/gw/redis", Protocol: protocol.KindTCP, Address: "gw.example.com:16379"},
		{ID: "ns/gw/dns", Kind: protocol.KindUDP}:   {ID: "ns/gw/dns", Protocol: protocol.KindUDP, Error: "port range exhausted"},
		{ID: "ns/gw/pg", Kind: protocol.KindTCP}:    {ID: "ns/gw/pg", Protocol: protocol.KindTCP, Address: "stale:1"}, // direct: never shown
	}
	gw, routes := desiredAnnotations(ls, eps)
	b, _ := json.Marshal(gw[gwRef.key()])
	want := `{"dns":[{"mode":"tunnel","protocol":"udp","error":"port range exhausted"}],` +
		`"pg":[{"mode":"direct","protocol":"tcp","error":"no public address"}],` +
		`"redis":[{"mode":"tunnel","protocol":"tcp","endpoint":"gw.example.com:16379"},{"mode":"direct","protocol":"tcp","endpoint":"203.0.113.1:6379"}]}`
	if string(b) != want {
		t.Errorf("Gateway annotation\n got %s\nwant %s", b, want)
	}
	if got := strings.Join(routes[rRef.key()], ","); got != "gw.example.com:16379,203.0.113.1:6379" {
		t.Errorf("TCPRoute annotation %q", got)
	}
	if got, ok := routes[uRef.key()]; ok {
		t.Errorf("UDPRoute annotation %q for a refused service", got)
	}
}

func TestOnlyOwnAnnotationsChanged(t *testing.T) {
	base := managedGateway("ns", "gw", tcpL("t", 1))
	base.ResourceVersion = "1"
	base.Annotations = map[string]string{"keep": "x"}
	change := func(f func(g *gwv1.Gateway)) *gwv1.Gateway {
		g := base.DeepCopy()
		g.ResourceVersion = "2"
		f(g)
		return g
	}
	cases := map[string]struct {
		new  *gwv1.Gateway
		want bool
	}{
		"our annotation added":    {change(func(g *gwv1.Gateway) { g.Annotations[AnnotationEndpoints] = "{}" }), true},
		"resource version only":   {change(func(*gwv1.Gateway) {}), true},
		"another annotation":      {change(func(g *gwv1.Gateway) { g.Annotations[AnnotationRoutingMode] = "dual" }), false},
		"label removed":           {change(func(g *gwv1.Gateway) { delete(g.Labels, label) }), false},
		"listener added":          {change(func(g *gwv1.Gateway) { g.Spec.Listeners = append(g.Spec.Listeners, g.Spec.Listeners[0]) }), false},
		"status address assigned": {change(func(g *gwv1.Gateway) { g.Status.Addresses = []gwv1.GatewayStatusAddress{{Value: "203.0.113.1"}} }), false},
	}
	for name, c := range cases {
		if got := onlyOwnAnnotationsChanged(base, c.new); got != c.want {
			t.Errorf("%s: %v, want %v", name, got, c.want)
		}
	}
	if base.ResourceVersion != "1" || len(base.Annotations) != 1 {
		t.Errorf("the cached object was modified: %+v", base.ObjectMeta)
	}
}
