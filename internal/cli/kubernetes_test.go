//go:build !nokubernetes

package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1alpha2 "sigs.k8s.io/gateway-api/apis/v1alpha2"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/discovery"
	"github.com/portway/portway/internal/gateway"
	"github.com/portway/portway/internal/k8stest"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testgateway"
	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testservers"
	"github.com/portway/portway/internal/testwait"
)

// Addresses inside the test's own network namespace: two pod-like addresses
// for the Redis servers behind headless Services, and a ClusterIP (inside
// the apiserver's default service range 10.0.0.0/24) where the DNS server
// listens, standing in for kube-proxy.
const (
	podA      = "10.244.0.10"
	podB      = "10.244.0.11"
	dnsIP     = "10.0.0.53"
	publicLB  = "203.0.113.10" // TEST-NET-3: public, and never dialed
	publicGW  = "198.51.100.7" // TEST-NET-2
	privateLB = "10.96.7.7"
	agentTok  = "k8s-agent-token-0123456789"
	managed   = "pipeops.io/managed"
)

// TestKubernetesEndToEnd runs the agent exactly as `portway agent` does
// (runAgent, with kubernetes.kubeconfig) against a real kube-apiserver and
// etcd, a real in-process gateway, real Redis and dnsmasq servers and their
// real clients, all inside a network namespace of its own, and walks through
// the PipeOps quick start and every change discovery must follow.
func TestKubernetesEndToEnd(t *testing.T) {
	if !k8stest.Isolate(t) {
		return
	}
	for _, a := range []string{podA, podB, dnsIP} {
		k8stest.AddAddress(t, a+"/32")
	}
	env := k8stest.Start(t)
	k := newKube(t, env)

	redisA := testservers.RedisOn(t, podA)
	redisB := testservers.RedisOn(t, podB)
	for _, r := range []*testservers.RedisServer{redisA, redisB} {
		if out, err := r.CLI(t, r.Host, r.Port, "SET", "who", r.Host); err != nil || !strings.Contains(string(out), "OK") {
			t.Fatalf("redis-cli SET on %s: %q %v", r.Addr(), out, err)
		}
	}
	dns := testservers.DNSOn(t, dnsIP, map[string]string{"db.portway.test": "10.1.2.3"})

	gw := startTestGateway(t)
	ag := startKubeAgent(t, gw.url, env.Kubeconfig(t))

	t.Run("waits for the Gateway API CRDs and recovers", func(t *testing.T) {
		const line = "Gateway API CRDs not installed yet (gateways.gateway.networking.k8s.io, tcproutes.gateway.networking.k8s.io, udproutes.gateway.networking.k8s.io); waiting"
		testwait.For(t, 30*time.Second, "the agent to say it waits for the CRDs", func() bool { return ag.log.Count(line) > 0 })
		// Let it retry a few times: the line must not repeat.
		time.Sleep(2 * time.Second)
		env.InstallGatewayAPI(t)
		testwait.For(t, 60*time.Second, "discovery to start", func() bool { return ag.log.Count("Kubernetes discovery started") == 1 })
		if n := ag.log.Count(line); n != 1 {
			t.Errorf("the waiting line was logged %d times, want once", n)
		}
		if ag.log.Count("Gateway API CRDs found; starting discovery") != 1 {
			t.Errorf("no line saying the CRDs were found")
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	k.namespace(t, "pipeops-system", "databases", "team-a", "team-b")
	k.headlessService(t, "databases", "redis-a", podA, redisA.Port)
	k.headlessService(t, "databases", "redis-b", podB, redisB.Port)
	k.create(t, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "databases", Name: "dns"},
		Spec: corev1.ServiceSpec{ClusterIP: dnsIP, Ports: []corev1.ServicePort{
			{Name: "dns", Port: int32(dns.Port), Protocol: corev1.ProtocolUDP},
		}},
	})
	// The PipeOps quick start: a labelled Gateway, a TCPRoute and a UDPRoute
	// (at v1alpha2, as the PipeOps examples write them).
	k.create(t, &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "pipeops-system", Name: "tcp-gateway", Labels: map[string]string{managed: "true"}},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio", Listeners: []gwv1.Listener{
			{Name: "redis", Port: 6379, Protocol: gwv1.TCPProtocolType},
			{Name: "dns", Port: 53, Protocol: gwv1.UDPProtocolType},
			{Name: "postgres", Port: 5432, Protocol: gwv1.TCPProtocolType},
			{Name: "web", Port: 80, Protocol: gwv1.HTTPProtocolType},
		}},
	})
	k.create(t, tcpRoute("pipeops-system", "redis-route", "tcp-gateway", "redis", "databases", "redis-a", 6379))
	k.create(t, udpRoute("pipeops-system", "dns-route", "tcp-gateway", "dns", "databases", "dns", dns.Port))

	redisEP := "127.0.0.1:16379"
	dnsEP := "127.0.0.1:10053"

	t.Run("endpoints are written back and traffic flows", func(t *testing.T) {
		want := map[string][]discovery.EndpointEntry{
			"redis": {{Mode: "tunnel", Protocol: protocol.KindTCP, Endpoint: redisEP}},
			"dns":   {{Mode: "tunnel", Protocol: protocol.KindUDP, Endpoint: dnsEP}},
		}
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", want)
		k.waitRouteEndpoint(t, "TCPRoute", "pipeops-system", "redis-route", redisEP)
		k.waitRouteEndpoint(t, "UDPRoute", "pipeops-system", "dns-route", dnsEP)
		if got := redisWho(t, redisA, redisEP); got != podA {
			t.Errorf("redis-cli through %s: who = %q, want %q", redisEP, got, podA)
		}
		ans, err := dns.Dig(t, "127.0.0.1", 10053, "db.portway.test", "A")
		if err != nil || len(ans) != 1 || ans[0] != "10.1.2.3" {
			t.Errorf("dig through %s: %q, %v; want 10.1.2.3", dnsEP, ans, err)
		}
		if n := testmetrics.Value(t, ag.reg, "pipeops_agent_gateway_watcher_discovered_services", map[string]string{"protocol": "tcp"}); n != 1 {
			t.Errorf("discovered tcp services = %v, want 1", n)
		}
		if n := testmetrics.Value(t, ag.reg, "pipeops_agent_gateway_watcher_discovered_services", map[string]string{"protocol": "udp"}); n != 1 {
			t.Errorf("discovered udp services = %v, want 1", n)
		}
		if n := testmetrics.Value(t, ag.reg, "pipeops_agent_gateway_watcher_sync_total", map[string]string{"result": "error"}); n < 1 {
			t.Errorf("sync_total{result=error} = %v; the postgres listener without a route should count", n)
		}
		if ag.log.Count(`msg=endpoint gateway=pipeops-system/tcp-gateway listener=redis protocol=tcp mode=tunnel endpoint=`+redisEP) != 1 {
			t.Errorf("the redis endpoint was not logged exactly once")
		}
	})

	t.Run("a listener without a route is reported, not exposed", func(t *testing.T) {
		k.waitEvent(t, "pipeops-system", "Gateway", "tcp-gateway", "NoRoute", `TCP listener "postgres" has no TCPRoute attached`)
		if n := ag.log.Count(`TCP listener \"postgres\" has no TCPRoute attached`); n != 1 {
			t.Errorf("the missing route was logged %d times, want once", n)
		}
		waitRefused(t, "tcp", "127.0.0.1:15432")
	})

	t.Run("a route to a missing Service is reported, then exposed when it appears, then withdrawn with the route", func(t *testing.T) {
		k.create(t, tcpRoute("pipeops-system", "pg-route", "tcp-gateway", "postgres", "databases", "postgres", 5432))
		k.waitEvent(t, "pipeops-system", "TCPRoute", "pg-route", "BackendNotFound", "backend Service databases/postgres not found")
		waitRefused(t, "tcp", "127.0.0.1:15432")
		if _, ok := k.gatewayEndpoints(t, "pipeops-system", "tcp-gateway")["postgres"]; ok {
			t.Errorf("postgres has an endpoint while its backend Service is missing")
		}
		k.create(t, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "databases", Name: "postgres"},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 5432}}},
		})
		k.waitRouteEndpoint(t, "TCPRoute", "pipeops-system", "pg-route", "127.0.0.1:15432")
		waitOpen(t, "127.0.0.1:15432")
		k.delete(t, "TCPRoute", "pipeops-system", "pg-route")
		waitRefused(t, "tcp", "127.0.0.1:15432")
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", map[string][]discovery.EndpointEntry{
			"redis": {{Mode: "tunnel", Protocol: protocol.KindTCP, Endpoint: redisEP}},
			"dns":   {{Mode: "tunnel", Protocol: protocol.KindUDP, Endpoint: dnsEP}},
		})
	})

	t.Run("editing the route's backend moves the traffic", func(t *testing.T) {
		start := time.Now()
		k.patch(t, "TCPRoute", "pipeops-system", "redis-route",
			`{"spec":{"rules":[{"backendRefs":[{"name":"redis-b","namespace":"databases","port":6379}]}]}}`)
		testwait.For(t, 10*time.Second, "redis traffic to reach redis-b", func() bool { return redisWho(t, redisB, redisEP) == podB })
		t.Logf("traffic followed the route edit in %v", time.Since(start).Round(time.Millisecond))
		k.waitRouteEndpoint(t, "TCPRoute", "pipeops-system", "redis-route", redisEP)
	})

	t.Run("deleting the UDPRoute closes the UDP port; recreating it opens it again", func(t *testing.T) {
		k.delete(t, "UDPRoute", "pipeops-system", "dns-route")
		waitRefused(t, "udp", dnsEP)
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", map[string][]discovery.EndpointEntry{
			"redis": {{Mode: "tunnel", Protocol: protocol.KindTCP, Endpoint: redisEP}},
		})
		k.create(t, udpRoute("pipeops-system", "dns-route", "tcp-gateway", "dns", "databases", "dns", dns.Port))
		k.waitRouteEndpoint(t, "UDPRoute", "pipeops-system", "dns-route", dnsEP)
		testwait.For(t, 10*time.Second, "dig to work again", func() bool {
			ans, err := dns.Dig(t, "127.0.0.1", 10053, "db.portway.test", "A")
			return err == nil && len(ans) == 1 && ans[0] == "10.1.2.3"
		})
	})

	t.Run("routing modes follow the annotation and the public address", func(t *testing.T) {
		noPublic := "no public address in the Gateway's status.addresses or its LoadBalancer Service"
		// Forced direct, with no public address known: withdrawn from the
		// tunnel, and the annotation says why there is no endpoint.
		k.patch(t, "Gateway", "pipeops-system", "tcp-gateway", `{"metadata":{"annotations":{"pipeops.io/routing-mode":"direct"}}}`)
		waitRefused(t, "tcp", redisEP)
		waitRefused(t, "udp", dnsEP)
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", map[string][]discovery.EndpointEntry{
			"redis": {{Mode: "direct", Protocol: protocol.KindTCP, Error: noPublic}},
			"dns":   {{Mode: "direct", Protocol: protocol.KindUDP, Error: noPublic}},
		})
		k.waitRouteEndpoint(t, "TCPRoute", "pipeops-system", "redis-route", "")
		k.waitEvent(t, "pipeops-system", "Gateway", "tcp-gateway", "NoPublicAddress", "pipeops.io/routing-mode=direct")

		// An invalid value is reported and ignored: auto-detection, no
		// public address, so tunnel again.
		k.patch(t, "Gateway", "pipeops-system", "tcp-gateway", `{"metadata":{"annotations":{"pipeops.io/routing-mode":"sideways"}}}`)
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", map[string][]discovery.EndpointEntry{
			"redis": {{Mode: "tunnel", Protocol: protocol.KindTCP, Endpoint: redisEP}},
			"dns":   {{Mode: "tunnel", Protocol: protocol.KindUDP, Endpoint: dnsEP}},
		})
		k.waitEvent(t, "pipeops-system", "Gateway", "tcp-gateway", "InvalidAnnotation", `pipeops.io/routing-mode="sideways" is not tunnel, direct or dual; ignored`)
		if got := redisWho(t, redisB, redisEP); got != podB {
			t.Errorf("redis through the tunnel after the invalid annotation: who = %q", got)
		}

		// A LoadBalancer Service of the Gateway with a private address
		// changes nothing; with a public one, auto-detection gives direct
		// (dual_mode_enabled is false).
		lb := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "pipeops-system", Name: "tcp-gateway-istio",
				Labels: map[string]string{discovery.LabelGatewayName: "tcp-gateway"}},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Ports: []corev1.ServicePort{{Name: "redis", Port: 6379}}},
		}
		k.create(t, lb)
		k.setLoadBalancerIP(t, "pipeops-system", "tcp-gateway-istio", privateLB)
		time.Sleep(time.Second) // well past the throttle: a wrong switch would show
		if got := redisWho(t, redisB, redisEP); got != podB {
			t.Errorf("a private LoadBalancer address switched the mode: who = %q", got)
		}
		k.setLoadBalancerIP(t, "pipeops-system", "tcp-gateway-istio", publicLB)
		waitRefused(t, "tcp", redisEP)
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", map[string][]discovery.EndpointEntry{
			"redis": {{Mode: "direct", Protocol: protocol.KindTCP, Endpoint: publicLB + ":6379"}},
			"dns":   {{Mode: "direct", Protocol: protocol.KindUDP, Endpoint: publicLB + ":53"}},
		})
		k.waitRouteEndpoint(t, "TCPRoute", "pipeops-system", "redis-route", publicLB+":6379")

		// dual: registered with the gateway, both endpoints reported.
		k.patch(t, "Gateway", "pipeops-system", "tcp-gateway", `{"metadata":{"annotations":{"pipeops.io/routing-mode":"dual"}}}`)
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", map[string][]discovery.EndpointEntry{
			"redis": {{Mode: "tunnel", Protocol: protocol.KindTCP, Endpoint: redisEP}, {Mode: "direct", Protocol: protocol.KindTCP, Endpoint: publicLB + ":6379"}},
			"dns":   {{Mode: "tunnel", Protocol: protocol.KindUDP, Endpoint: dnsEP}, {Mode: "direct", Protocol: protocol.KindUDP, Endpoint: publicLB + ":53"}},
		})
		k.waitRouteEndpoint(t, "TCPRoute", "pipeops-system", "redis-route", redisEP+","+publicLB+":6379")
		if got := redisWho(t, redisB, redisEP); got != podB {
			t.Errorf("redis through the tunnel in dual mode: who = %q", got)
		}
		if m := gatewayServiceMode(gw, "pipeops-system/tcp-gateway/redis"); m != "dual" {
			t.Errorf("the gateway has the redis service in mode %q, want dual", m)
		}

		// Back to auto, the LoadBalancer gone, a public address in the
		// Gateway's own status: direct at that address.
		k.delete(t, "Service", "pipeops-system", "tcp-gateway-istio")
		k.patch(t, "Gateway", "pipeops-system", "tcp-gateway", `{"metadata":{"annotations":{"pipeops.io/routing-mode":null}}}`)
		k.setGatewayAddress(t, "pipeops-system", "tcp-gateway", publicGW)
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", map[string][]discovery.EndpointEntry{
			"redis": {{Mode: "direct", Protocol: protocol.KindTCP, Endpoint: publicGW + ":6379"}},
			"dns":   {{Mode: "direct", Protocol: protocol.KindUDP, Endpoint: publicGW + ":53"}},
		})
		waitRefused(t, "tcp", redisEP)

		// Forced tunnel by annotation wins over the public address.
		k.patch(t, "Gateway", "pipeops-system", "tcp-gateway", `{"metadata":{"annotations":{"pipeops.io/routing-mode":"tunnel"}}}`)
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", map[string][]discovery.EndpointEntry{
			"redis": {{Mode: "tunnel", Protocol: protocol.KindTCP, Endpoint: redisEP}},
			"dns":   {{Mode: "tunnel", Protocol: protocol.KindUDP, Endpoint: dnsEP}},
		})
		testwait.For(t, 10*time.Second, "redis through the tunnel again", func() bool { return redisWho(t, redisB, redisEP) == podB })
	})

	t.Run("the idle-timeout annotation applies; an invalid one is reported and ignored", func(t *testing.T) {
		k.patch(t, "Gateway", "pipeops-system", "tcp-gateway", `{"metadata":{"annotations":{"pipeops.io/idle-timeout":"banana"}}}`)
		k.waitEvent(t, "pipeops-system", "Gateway", "tcp-gateway", "InvalidAnnotation", `pipeops.io/idle-timeout="banana"`)
		// The configured 5m applies: an idle connection survives.
		if err := idleSurvives(redisEP, 2*time.Second); err != nil {
			t.Errorf("with an invalid idle-timeout: %v", err)
		}
		k.patch(t, "Gateway", "pipeops-system", "tcp-gateway", `{"metadata":{"annotations":{"pipeops.io/idle-timeout":"1s"}}}`)
		testwait.For(t, 10*time.Second, "the agent to log the new idle timeout", func() bool {
			return ag.log.CountLines(`msg="service changed" service=pipeops-system/tcp-gateway/redis `, " idle_timeout=1s") > 0
		})
		time.Sleep(500 * time.Millisecond) // the register after the agent's debounce
		if err := idleSurvives(redisEP, 3*time.Second); err == nil {
			t.Errorf("with idle-timeout 1s an idle connection survived 3s")
		}
	})

	t.Run("Gateways with the same name in two namespaces do not collide", func(t *testing.T) {
		for _, c := range []struct{ ns, backend string }{{"team-a", "redis-a"}, {"team-b", "redis-b"}} {
			k.create(t, &gwv1.Gateway{
				ObjectMeta: metav1.ObjectMeta{Namespace: c.ns, Name: "edge", Labels: map[string]string{managed: "true"}},
				Spec: gwv1.GatewaySpec{GatewayClassName: "istio", Listeners: []gwv1.Listener{
					{Name: "redis", Port: 6379, Protocol: gwv1.TCPProtocolType},
				}},
			})
			// No sectionName: the route takes every TCP listener.
			r := tcpRoute(c.ns, "redis", "edge", "", "databases", c.backend, 6379)
			k.create(t, r)
		}
		epA := k.waitAnyRouteEndpoint(t, "TCPRoute", "team-a", "redis")
		epB := k.waitAnyRouteEndpoint(t, "TCPRoute", "team-b", "redis")
		if epA == epB || epA == redisEP || epB == redisEP {
			t.Fatalf("endpoints collide: team-a %s, team-b %s, pipeops-system %s", epA, epB, redisEP)
		}
		if got := redisWho(t, redisA, epA); got != podA {
			t.Errorf("team-a/edge (%s) reached %q, want redis-a", epA, got)
		}
		if got := redisWho(t, redisB, epB); got != podB {
			t.Errorf("team-b/edge (%s) reached %q, want redis-b", epB, got)
		}
		ga := k.gatewayEndpoints(t, "team-a", "edge")
		gb := k.gatewayEndpoints(t, "team-b", "edge")
		if len(ga["redis"]) != 1 || ga["redis"][0].Endpoint != epA || len(gb["redis"]) != 1 || gb["redis"][0].Endpoint != epB {
			t.Errorf("Gateway annotations: team-a %v, team-b %v", ga, gb)
		}
		testwait.For(t, 5*time.Second, "three tcp services discovered", func() bool {
			return testmetrics.Value(t, ag.reg, "pipeops_agent_gateway_watcher_discovered_services", map[string]string{"protocol": "tcp"}) == 3
		})
	})

	t.Run("unlabelling the Gateway withdraws its services and removes the annotations", func(t *testing.T) {
		k.patch(t, "Gateway", "pipeops-system", "tcp-gateway", `{"metadata":{"labels":{"pipeops.io/managed":null}}}`)
		waitRefused(t, "tcp", redisEP)
		waitRefused(t, "udp", dnsEP)
		k.waitGatewayEndpoints(t, "pipeops-system", "tcp-gateway", nil)
		k.waitRouteEndpoint(t, "TCPRoute", "pipeops-system", "redis-route", "")
		k.waitRouteEndpoint(t, "UDPRoute", "pipeops-system", "dns-route", "")
		// The other Gateways are untouched.
		if got := redisWho(t, redisA, k.waitAnyRouteEndpoint(t, "TCPRoute", "team-a", "redis")); got != podA {
			t.Errorf("team-a/edge after unlabelling pipeops-system/tcp-gateway: who = %q", got)
		}
	})
}

// ---- the agent and the gateway ----

type testGateway struct {
	*gateway.Gateway
	url string
}

func startTestGateway(t *testing.T) *testGateway {
	t.Helper()
	cfg := testgateway.Config(t, config.AgentIdentity{Name: "cluster", Token: agentTok})
	cfg.HeartbeatInterval = config.D(time.Second)
	cfg.Admin = config.Admin{Listen: "127.0.0.1:0", Token: "admin-token-0123456789"}
	log, lb := testlog.New(t, "gateway")
	_ = lb
	reg := prometheus.NewRegistry()
	g := testgateway.Start(t, gateway.Options{Config: cfg, Logger: log, Registry: reg, Gatherer: reg, Version: "test"})
	return &testGateway{Gateway: g, url: testgateway.URL(g)}
}

func gatewayServiceMode(g *testGateway, id string) string {
	for _, s := range g.Services() {
		if s.ID == id {
			return s.Mode
		}
	}
	return ""
}

type kubeAgent struct {
	log *testlog.Buffer
	reg *prometheus.Registry
}

// startKubeAgent runs runAgent, as `portway agent` does, with discovery on
// through kubernetes.kubeconfig, until the test ends.
func startKubeAgent(t *testing.T, url, kubeconfig string) *kubeAgent {
	t.Helper()
	cfg := config.DefaultAgent()
	cfg.Gateway = config.GatewayConn{URL: url, Token: agentTok, Protocol: "auto"}
	cfg.Metrics.Listen = ""
	cfg.Kubernetes = config.Kubernetes{Enabled: true, Kubeconfig: kubeconfig}
	// The test keeps managed Gateways in three namespaces, as an operator
	// with a Gateway per team would list them.
	cfg.Tunnels.Discovery.GatewayNamespaces = []string{"pipeops-system", "team-a", "team-b"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	log, lb := testlog.New(t, "agent")
	reg := prometheus.NewRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	noEnv := func(string) string { return "" }
	go func() {
		done <- runAgent(ctx, agent.Options{Config: cfg, Logger: log, Registry: reg, Gatherer: reg, Version: "test"}, noEnv)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("runAgent: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("runAgent did not return within 30s of its context ending")
		}
	})
	return &kubeAgent{log: lb, reg: reg}
}

// ---- clients and probes ----

// redisWho asks, with the real redis-cli, the Redis server behind addr which
// one it is (its "who" key holds its address). "" when it cannot.
func redisWho(t *testing.T, cli *testservers.RedisServer, addr string) string {
	t.Helper()
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("endpoint %q: %v", addr, err)
	}
	port, _ := strconv.Atoi(p)
	out, err := cli.CLI(t, host, port, "GET", "who")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

// refused reports whether addr answers a connection (tcp) or a datagram
// (udp) with "connection refused": nothing listens there.
func refused(network, addr string) bool {
	c, err := net.DialTimeout(network, addr, time.Second)
	if err != nil {
		return errors.Is(err, syscall.ECONNREFUSED)
	}
	defer c.Close()
	if network == "tcp" {
		return false
	}
	c.SetDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := c.Write([]byte{0}); err != nil {
		return errors.Is(err, syscall.ECONNREFUSED)
	}
	_, err = c.Read(make([]byte, 16))
	return errors.Is(err, syscall.ECONNREFUSED)
}

func waitRefused(t *testing.T, network, addr string) {
	t.Helper()
	testwait.For(t, 10*time.Second, network+" "+addr+" to refuse connections", func() bool { return refused(network, addr) })
}

func waitOpen(t *testing.T, addr string) {
	t.Helper()
	testwait.For(t, 10*time.Second, addr+" to accept connections", func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

// idleSurvives opens a Redis connection through addr, checks PING, stays
// idle for d and checks PING again.
func idleSurvives(addr string, d time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	ping := func() error {
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, "PING\r\n"); err != nil {
			return err
		}
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if strings.TrimSpace(line) != "+PONG" {
			return fmt.Errorf("PING answered %q", line)
		}
		return nil
	}
	if err := ping(); err != nil {
		return fmt.Errorf("first PING: %w", err)
	}
	time.Sleep(d)
	if err := ping(); err != nil {
		return fmt.Errorf("PING after %v idle: %w", d, err)
	}
	return nil
}

// ---- Kubernetes objects ----

type kube struct {
	core kubernetes.Interface
	gw   gwclient.Interface
}

func newKube(t *testing.T, env *k8stest.Env) *kube {
	t.Helper()
	core, err := kubernetes.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	gw, err := gwclient.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	return &kube{core: core, gw: gw}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func (k *kube) namespace(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		k.create(t, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n}})
	}
}

func (k *kube) create(t *testing.T, obj any) {
	t.Helper()
	ctx := ctxT(t)
	var err error
	switch o := obj.(type) {
	case *corev1.Namespace:
		_, err = k.core.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{})
	case *corev1.Service:
		_, err = k.core.CoreV1().Services(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *discoveryv1.EndpointSlice:
		_, err = k.core.DiscoveryV1().EndpointSlices(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *gwv1.Gateway:
		_, err = k.gw.GatewayV1().Gateways(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *gwv1alpha2.TCPRoute:
		_, err = k.gw.GatewayV1alpha2().TCPRoutes(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *gwv1alpha2.UDPRoute:
		_, err = k.gw.GatewayV1alpha2().UDPRoutes(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	default:
		t.Fatalf("create: unsupported %T", obj)
	}
	if err != nil {
		t.Fatalf("creating %T: %v", obj, err)
	}
}

func (k *kube) delete(t *testing.T, kind, ns, name string) {
	t.Helper()
	ctx := ctxT(t)
	var err error
	switch kind {
	case "Service":
		err = k.core.CoreV1().Services(ns).Delete(ctx, name, metav1.DeleteOptions{})
	case "TCPRoute":
		err = k.gw.GatewayV1().TCPRoutes(ns).Delete(ctx, name, metav1.DeleteOptions{})
	case "UDPRoute":
		err = k.gw.GatewayV1().UDPRoutes(ns).Delete(ctx, name, metav1.DeleteOptions{})
	default:
		t.Fatalf("delete: unsupported kind %s", kind)
	}
	if err != nil {
		t.Fatalf("deleting %s %s/%s: %v", kind, ns, name, err)
	}
}

// patch applies a JSON merge patch.
func (k *kube) patch(t *testing.T, kind, ns, name, patch string) {
	t.Helper()
	ctx := ctxT(t)
	var err error
	pt, body, opts := types.MergePatchType, []byte(patch), metav1.PatchOptions{}
	switch kind {
	case "Gateway":
		_, err = k.gw.GatewayV1().Gateways(ns).Patch(ctx, name, pt, body, opts)
	case "TCPRoute":
		_, err = k.gw.GatewayV1().TCPRoutes(ns).Patch(ctx, name, pt, body, opts)
	default:
		t.Fatalf("patch: unsupported kind %s", kind)
	}
	if err != nil {
		t.Fatalf("patching %s %s/%s with %s: %v", kind, ns, name, patch, err)
	}
}

// headlessService creates a headless Service with no selector and the
// EndpointSlice a controller would make for it: one ready endpoint at
// podIP:targetPort. Its Service port is 6379.
func (k *kube) headlessService(t *testing.T, ns, name, podIP string, targetPort int) {
	t.Helper()
	k.create(t, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, Ports: []corev1.ServicePort{
			{Name: "redis", Port: 6379, TargetPort: intstr.FromInt(targetPort)},
		}},
	})
	ready, tcp, portName, port := true, corev1.ProtocolTCP, "redis", int32(targetPort)
	k.create(t, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{podIP}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Port: &port, Protocol: &tcp}},
	})
}

func (k *kube) setLoadBalancerIP(t *testing.T, ns, name, ip string) {
	t.Helper()
	ctx := ctxT(t)
	patch := fmt.Sprintf(`{"status":{"loadBalancer":{"ingress":[{"ip":%q}]}}}`, ip)
	if _, err := k.core.CoreV1().Services(ns).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}, "status"); err != nil {
		t.Fatalf("setting the load balancer address of %s/%s: %v", ns, name, err)
	}
}

func (k *kube) setGatewayAddress(t *testing.T, ns, name, ip string) {
	t.Helper()
	ctx := ctxT(t)
	patch := fmt.Sprintf(`{"status":{"addresses":[{"type":"IPAddress","value":%q}]}}`, ip)
	if _, err := k.gw.GatewayV1().Gateways(ns).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}, "status"); err != nil {
		t.Fatalf("setting the status address of Gateway %s/%s: %v", ns, name, err)
	}
}

func (k *kube) gatewayEndpoints(t *testing.T, ns, name string) map[string][]discovery.EndpointEntry {
	t.Helper()
	g, err := k.gw.GatewayV1().Gateways(ns).Get(ctxT(t), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("getting Gateway %s/%s: %v", ns, name, err)
	}
	v, ok := g.Annotations[discovery.AnnotationEndpoints]
	if !ok {
		return nil
	}
	var m map[string][]discovery.EndpointEntry
	if err := json.Unmarshal([]byte(v), &m); err != nil {
		t.Fatalf("Gateway %s/%s: annotation %s=%q is not JSON: %v", ns, name, discovery.AnnotationEndpoints, v, err)
	}
	return m
}

// waitGatewayEndpoints waits until the Gateway's pipeops.io/tunnel-endpoints
// annotation equals want (nil: absent).
func (k *kube) waitGatewayEndpoints(t *testing.T, ns, name string, want map[string][]discovery.EndpointEntry) {
	t.Helper()
	wantJSON, _ := json.Marshal(want)
	var last []byte
	deadline := time.Now().Add(10 * time.Second)
	for {
		last, _ = json.Marshal(k.gatewayEndpoints(t, ns, name))
		if bytes.Equal(last, wantJSON) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Gateway %s/%s: %s is %s, want %s", ns, name, discovery.AnnotationEndpoints, last, wantJSON)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (k *kube) routeEndpoint(t *testing.T, kind, ns, name string) string {
	t.Helper()
	var obj metav1.Object
	var err error
	switch kind {
	case "TCPRoute":
		obj, err = k.gw.GatewayV1().TCPRoutes(ns).Get(ctxT(t), name, metav1.GetOptions{})
	case "UDPRoute":
		obj, err = k.gw.GatewayV1().UDPRoutes(ns).Get(ctxT(t), name, metav1.GetOptions{})
	}
	if err != nil {
		t.Fatalf("getting %s %s/%s: %v", kind, ns, name, err)
	}
	return obj.GetAnnotations()[discovery.AnnotationRouteEndpoint]
}

// waitRouteEndpoint waits until the route's pipeops.io/tunnel-endpoint
// annotation is want ("": absent).
func (k *kube) waitRouteEndpoint(t *testing.T, kind, ns, name, want string) {
	t.Helper()
	var got string
	deadline := time.Now().Add(10 * time.Second)
	for {
		if got = k.routeEndpoint(t, kind, ns, name); got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s %s/%s: %s is %q, want %q", kind, ns, name, discovery.AnnotationRouteEndpoint, got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (k *kube) waitAnyRouteEndpoint(t *testing.T, kind, ns, name string) string {
	t.Helper()
	var got string
	testwait.For(t, 10*time.Second, kind+" "+ns+"/"+name+" to get an endpoint", func() bool {
		got = k.routeEndpoint(t, kind, ns, name)
		return got != ""
	})
	return got
}

// waitEvent waits for an events.k8s.io Event about kind ns/name with reason
// and a note containing note.
func (k *kube) waitEvent(t *testing.T, ns, kind, name, reason, note string) {
	t.Helper()
	testwait.For(t, 10*time.Second, fmt.Sprintf("a %s Event on %s %s/%s", reason, kind, ns, name), func() bool {
		evs, err := k.core.EventsV1().Events(ns).List(ctxT(t), metav1.ListOptions{})
		if err != nil {
			t.Fatalf("listing Events in %s: %v", ns, err)
		}
		for _, e := range evs.Items {
			if e.Regarding.Kind == kind && e.Regarding.Name == name && e.Reason == reason && strings.Contains(e.Note, note) &&
				e.Type == corev1.EventTypeWarning && e.ReportingController == discovery.FieldManager {
				return true
			}
		}
		return false
	})
}

func tcpRoute(ns, name, gateway, section, backendNS, backend string, port int) *gwv1alpha2.TCPRoute {
	return &gwv1alpha2.TCPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gwv1alpha2.TCPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{parentRef(gateway, section)}},
			Rules:           []gwv1alpha2.TCPRouteRule{{BackendRefs: []gwv1.BackendRef{backendRef(backendNS, backend, port)}}},
		},
	}
}

func udpRoute(ns, name, gateway, section, backendNS, backend string, port int) *gwv1alpha2.UDPRoute {
	return &gwv1alpha2.UDPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gwv1alpha2.UDPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{parentRef(gateway, section)}},
			Rules:           []gwv1alpha2.UDPRouteRule{{BackendRefs: []gwv1.BackendRef{backendRef(backendNS, backend, port)}}},
		},
	}
}

func parentRef(gateway, section string) gwv1.ParentReference {
	p := gwv1.ParentReference{Name: gwv1.ObjectName(gateway)}
	if section != "" {
		s := gwv1.SectionName(section)
		p.SectionName = &s
	}
	return p
}

func backendRef(ns, name string, port int) gwv1.BackendRef {
	n := gwv1.Namespace(ns)
	p := gwv1.PortNumber(port)
	return gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name), Namespace: &n, Port: &p}}
}

// TestDiscoveryNeedsTheAgentsNamespace: with tunnels.discovery.gateway_namespaces
// empty, managed Gateways live in the agent's own namespace; an agent that
// cannot tell it (no POD_NAMESPACE, no service account) refuses to start,
// naming the key, before it contacts anything.
func TestDiscoveryNeedsTheAgentsNamespace(t *testing.T) {
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	kc := "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:1\"}\n" +
		"contexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\nusers:\n- name: u\n  user: {token: t}\n"
	if err := os.WriteFile(kubeconfig, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/var/run/secrets/kubernetes.io/serviceaccount/namespace"); err == nil {
		t.Skip("running in a pod: the service account names the namespace")
	}
	cfg := config.DefaultAgent()
	cfg.Gateway = config.GatewayConn{URL: "ws://127.0.0.1:1/v1/tunnel", Token: agentTok, Protocol: "auto"}
	cfg.Metrics.Listen = ""
	cfg.Kubernetes = config.Kubernetes{Enabled: true, Kubeconfig: kubeconfig}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := runAgent(ctx, agent.Options{Config: cfg, Registry: prometheus.NewRegistry(), Version: "test"}, func(string) string { return "" })
	if err == nil || !strings.Contains(err.Error(), "tunnels.discovery.gateway_namespaces") || !strings.Contains(err.Error(), "POD_NAMESPACE") {
		t.Fatalf("runAgent without the agent's namespace: %v", err)
	}
}
