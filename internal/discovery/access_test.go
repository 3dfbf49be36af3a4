package discovery

import (
	"strings"
	"testing"

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
