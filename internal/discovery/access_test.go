package discovery

import (
	"strings"
	"testing"
	"time"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/portway/portway/internal/protocol"
)

// The access annotations of a route: valid values reach the service, an
// invalid one is reported (naming the annotation) and the listener is not
// exposed rather than exposed wider or without the header its backend
// expects.
func TestRouteAccessAnnotations(t *testing.T) {
	r := route{access: accessAnnotations(map[string]string{
		AnnotationProxyProtocol: "v2",
		AnnotationAllowCIDRs:    " 10.0.0.0/8, 192.0.2.7 ",
		AnnotationDenyCIDRs:     "10.9.0.0/16",
		"other":                 "ignored",
	})}
	pp, pol, prob := routeAccess(r, protocol.KindUDP)
	if prob != nil || pp != "v2" || strings.Join(pol.AllowCIDRs, ",") != "10.0.0.0/8,192.0.2.7" || strings.Join(pol.DenyCIDRs, ",") != "10.9.0.0/16" {
		t.Fatalf("got %q %+v %+v", pp, pol, prob)
	}
	if pp, pol, prob := routeAccess(route{}, protocol.KindTCP); pp != "" || pol.AllowCIDRs != nil || prob != nil {
		t.Fatalf("no annotations: got %q %+v %+v", pp, pol, prob)
	}
	for _, c := range []struct {
		key, value string
		proto      protocol.Kind
	}{
		{AnnotationProxyProtocol, "v1", protocol.KindUDP},
		{AnnotationProxyProtocol, "yes", protocol.KindTCP},
		{AnnotationAllowCIDRs, "10.0.0.1/8", protocol.KindTCP},
		{AnnotationAllowCIDRs, " , ", protocol.KindTCP},
		{AnnotationDenyCIDRs, "10.0.0.0/8,bogus", protocol.KindTCP},
	} {
		_, _, prob := routeAccess(route{access: map[string]string{c.key: c.value}}, c.proto)
		if prob == nil || prob.reason != reasonInvalidAnnotation || !strings.Contains(prob.message, c.key) {
			t.Errorf("%s=%q on %s: problem %+v, want InvalidAnnotation naming it", c.key, c.value, c.proto, prob)
		}
	}
}

// Through the whole computation: a route's access annotations reach its
// service; an invalid one keeps the listener unexposed and is reported
// on the route.
func TestRouteAccessAnnotationsComputed(t *testing.T) {
	g := managedGateway("ns", "gw", tcpL("t", 1))
	r := tcpRoute("ns", "r", time.Unix(1, 0), []gwv1.ParentReference{parent("gw", "")}, backend("", "svc", 1))
	r.Annotations = map[string]string{AnnotationProxyProtocol: "v1", AnnotationAllowCIDRs: "203.0.113.0/24"}
	svc := clusterIPService("ns", "svc", "10.96.0.1", port("p", 1, ""))
	res := mustCompute(t, testWorld(t, g, svc, r), defaultTunnels())
	if len(res.services) != 1 || res.services[0].ProxyProtocol != "v1" || strings.Join(res.services[0].Policy.AllowCIDRs, ",") != "203.0.113.0/24" {
		t.Fatalf("services %+v, want proxy protocol v1 and the allow list", res.services)
	}

	r.Annotations = map[string]string{AnnotationAllowCIDRs: "203.0.113.1/24"}
	res = mustCompute(t, testWorld(t, g, svc, r), defaultTunnels())
	if len(res.services) != 0 {
		t.Fatalf("services %+v, want none for an invalid allow list", res.services)
	}
	found := false
	for _, p := range res.problems {
		if p.reason == reasonInvalidAnnotation && p.obj.kind == "TCPRoute" && strings.Contains(p.message, AnnotationAllowCIDRs) {
			found = true
		}
	}
	if !found {
		t.Errorf("problems %+v, want InvalidAnnotation on the route naming %s", res.problems, AnnotationAllowCIDRs)
	}
}
