package discovery

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwlisters "sigs.k8s.io/gateway-api/pkg/client/listers/apis/v1"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
)

// world is what a recompute reads: the informer caches.
type world struct {
	gateways gwlisters.GatewayLister
	services corelisters.ServiceLister
	slices   discoverylisters.EndpointSliceLister
	// namespaces serves allowedRoutes.namespaces.from: Selector; nil, or
	// not yet synced (namespacesSynced false), when the agent cannot read
	// Namespaces.
	namespaces       corelisters.NamespaceLister
	namespacesSynced func() bool
	// grants lists ReferenceGrants; nil when the cluster does not serve
	// them (then no cross-namespace reference needing one is allowed).
	// grantsSynced is false while they cannot be read yet.
	grants       *grantSource
	grantsSynced func() bool
	// routes maps a protocol to its route kind; absent when that
	// protocol's discovery is disabled.
	routes map[protocol.Kind]*routeSource
}

// result is one recompute's outcome.
type result struct {
	// services are all discovered services, direct ones included, sorted
	// by id then protocol.
	services []Service
	// listeners are the Gateway listeners that became services, for the
	// write-back.
	listeners []listenerResult
	problems  []problem
	// gateways and routes are every object of those kinds in the caches,
	// with the value of our annotation there ("" when absent).
	gateways []cachedObject
	routes   []cachedObject
}

// listenerResult is one Gateway listener exposed as a service.
type listenerResult struct {
	gateway  objectRef
	listener string
	service  Service
	route    objectRef
	// direct is public-address:listener-port for modes direct and dual;
	// directErr says why it is unknown.
	direct, directErr string
}

// cachedObject is a Gateway or route as cached, for the write-back.
type cachedObject struct {
	ref        objectRef
	annotation string
	source     *routeSource // nil for Gateways
}

// problem is something about an object that keeps a listener or route from
// being exposed as asked (or an annotation that is ignored). It is logged
// and recorded as an Event on the object once, when it appears.
type problem struct {
	obj     objectRef
	reason  string // CamelCase, as Kubernetes Event reasons are
	subject string // the listener, for per-listener problems
	message string
}

func (p problem) key() string {
	return p.obj.kind + "|" + p.obj.namespace + "/" + p.obj.name + "|" + p.reason + "|" + p.subject
}

// Problem reasons, also the Events' reasons.
const (
	reasonInvalidAnnotation  = "InvalidAnnotation"
	reasonNoRoute            = "NoRoute"
	reasonNoMatchingListener = "NoMatchingListener"
	reasonNotAllowed         = "RouteNotAllowed"
	reasonRouteConflict      = "RouteConflict"
	reasonNoBackend          = "NoBackend"
	reasonUnsupportedBackend = "UnsupportedBackend"
	reasonBackendNotFound    = "BackendNotFound"
	reasonRefNotPermitted    = "RefNotPermitted"
	reasonBackendPort        = "BackendPortNotFound"
	reasonNoReadyEndpoints   = "NoReadyEndpoints"
	reasonNoPublicAddress    = "NoPublicAddress"

	// reasonGatewayNotPermitted: a labelled Gateway outside the permitted
	// namespaces or classes.
	reasonGatewayNotPermitted = "GatewayNotPermitted"
)

// minIdleTimeout is the smallest pipeops.io/idle-timeout accepted, as for
// tunnels.tcp.idle_timeout.
const minIdleTimeout = 100 * time.Millisecond

// compute maps the cached objects to services, per the rules in
// docs/kubernetes.md. It reads only w and t, so that it can be tested on
// listers filled by hand.
func compute(w *world, t config.Tunnels) (result, error) {
	c, err := newComputation(w, t)
	if err != nil {
		return result{}, err
	}
	c.refuseUnpermittedGateways()
	for _, g := range c.gateways {
		c.exposeGateway(g)
	}
	c.reportUnmatchedParentRefs()
	slices.SortFunc(c.res.services, func(a, b Service) int {
		return cmp.Or(cmp.Compare(a.ID, b.ID), cmp.Compare(a.Protocol, b.Protocol))
	})
	return c.res, nil
}

// computation is one recompute in progress: the cached objects it reads,
// what it has decided about them so far, and the result it builds.
type computation struct {
	w *world
	t config.Tunnels
	// gateways are all cached Gateways, sorted by namespace and name.
	gateways []*gwv1.Gateway
	// routes maps a protocol to its cached routes, oldest
	// first (the order Gateway API conflict resolution prefers).
	routes map[protocol.Kind][]route
	// refused holds the Gateways labelled outside the permitted
	// namespaces or classes; they are reported and otherwise treated as
	// unlabelled.
	refused map[objectKey]bool
	// matched[route][parentRef index] is set when the parentRef selected
	// a listener of a managed Gateway.
	matched map[objectKey]map[int]bool
	res     result
}

// newComputation lists the Gateways and routes from the caches, sorted so
// that the outcome does not depend on cache order.
func newComputation(w *world, t config.Tunnels) (*computation, error) {
	gws, err := w.gateways.List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("listing Gateways: %w", err)
	}
	slices.SortFunc(gws, func(a, b *gwv1.Gateway) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	c := &computation{
		w: w, t: t, gateways: gws,
		routes:  map[protocol.Kind][]route{},
		refused: map[objectKey]bool{},
		matched: map[objectKey]map[int]bool{},
	}
	for proto, src := range w.routes {
		rs, err := src.list()
		if err != nil {
			return nil, err
		}
		slices.SortFunc(rs, olderFirst)
		c.routes[proto] = rs
		for _, r := range rs {
			c.res.routes = append(c.res.routes, cachedObject{ref: r.ref, annotation: r.annotation, source: src})
		}
	}
	return c, nil
}

// labelled reports whether g carries the discovery label of proto, and
// discovery of that protocol is enabled and served.
func (c *computation) labelled(g *gwv1.Gateway, proto protocol.Kind) bool {
	var src config.DiscoverySource
	switch proto {
	case protocol.KindTCP:
		src = c.t.Discovery.TCP
	case protocol.KindUDP:
		src = c.t.Discovery.UDP
	}
	return src.Enabled && c.w.routes[proto] != nil && g.Labels[src.GatewayLabel] == "true"
}

// managed reports whether portway exposes g's listeners of proto: g is
// labelled for proto and not refused.
func (c *computation) managed(g *gwv1.Gateway, proto protocol.Kind) bool {
	return c.labelled(g, proto) && !c.refused[objectKey{"Gateway", g.Namespace, g.Name}]
}

// report records p in the result.
func (c *computation) report(p problem) {
	c.res.problems = append(c.res.problems, p)
}

// refuseUnpermittedGateways marks and reports the labelled Gateways outside
// the permitted namespaces or classes. It runs before any Gateway is
// exposed, since managed depends on it.
func (c *computation) refuseUnpermittedGateways() {
	for _, g := range c.gateways {
		if !c.labelled(g, protocol.KindTCP) && !c.labelled(g, protocol.KindUDP) {
			continue
		}
		if why := gatewayNotPermitted(g, c.t.Discovery); why != "" {
			ref := refOf("Gateway", gwv1.GroupVersion.String(), g)
			c.refused[ref.key()] = true
			c.report(problem{obj: ref, reason: reasonGatewayNotPermitted, message: why})
		}
	}
}

// gatewaySettings are what a managed Gateway's annotations and addresses
// decide for all of its listeners.
type gatewaySettings struct {
	ref    objectRef
	mode   Mode
	public string // the public address for direct endpoints, "" when none
	idle   time.Duration
}

// exposeGateway records g for the write-back and, when it is managed,
// exposes each of its listeners of a managed protocol.
func (c *computation) exposeGateway(g *gwv1.Gateway) {
	gref := refOf("Gateway", gwv1.GroupVersion.String(), g)
	c.res.gateways = append(c.res.gateways, cachedObject{ref: gref, annotation: g.Annotations[AnnotationEndpoints]})
	if !c.managed(g, protocol.KindTCP) && !c.managed(g, protocol.KindUDP) {
		return
	}
	mode, public, probs := routingMode(g, gref, c.w.services, c.t.Routing)
	c.res.problems = append(c.res.problems, probs...)
	idle, prob := idleTimeout(g, gref)
	if prob != nil {
		c.report(*prob)
	}
	gs := gatewaySettings{ref: gref, mode: mode, public: public, idle: idle}
	for _, l := range g.Spec.Listeners {
		proto := listenerProtocol(l.Protocol)
		if !proto.Valid() || !c.managed(g, proto) {
			continue
		}
		c.exposeListener(g, gs, l, proto)
	}
}

// exposeListener makes listener l of g a service when a route is attached
// to it and its backend resolves; otherwise it records why not.
func (c *computation) exposeListener(g *gwv1.Gateway, gs gatewaySettings, l gwv1.Listener, proto protocol.Kind) {
	r, ok := c.attachedRoute(g, gs.ref, l, proto)
	if !ok {
		return
	}
	backend, prob := resolveBackend(c.w, r, proto, g.Namespace)
	if prob != nil {
		prob.subject = string(l.Name)
		c.report(*prob)
		return
	}
	pp, policy, prob := routeAccess(r, proto)
	if prob != nil {
		prob.subject = string(l.Name)
		c.report(*prob)
		return
	}
	svc := Service{
		ID:            g.Namespace + "/" + g.Name + "/" + string(l.Name),
		Protocol:      proto,
		Port:          int(l.Port),
		Backend:       backend,
		IdleTimeout:   gs.idle,
		Mode:          gs.mode,
		ProxyProtocol: pp,
		Policy:        policy,
	}
	lr := listenerResult{gateway: gs.ref, listener: string(l.Name), service: svc, route: r.ref}
	if gs.mode != ModeTunnel {
		if gs.public == "" {
			lr.directErr = "no public address in the Gateway's status.addresses or its LoadBalancer Service"
		} else {
			lr.direct = net.JoinHostPort(gs.public, strconv.Itoa(int(l.Port)))
		}
	}
	c.res.services = append(c.res.services, svc)
	c.res.listeners = append(c.res.listeners, lr)
}

// attachedRoute returns the route that listener l of g serves: of the
// routes of proto that select l and that l accepts, the oldest (Gateway API
// conflict resolution). The other candidates, the routes l does not accept
// and a listener without a route are reported.
func (c *computation) attachedRoute(g *gwv1.Gateway, gref objectRef, l gwv1.Listener, proto protocol.Kind) (route, bool) {
	candidates := c.candidateRoutes(g, l, proto)
	if len(candidates) == 0 {
		c.report(problem{obj: gref, reason: reasonNoRoute, subject: string(l.Name),
			message: fmt.Sprintf("%s listener %q has no %s attached; not exposed", strings.ToUpper(proto.String()), l.Name, c.w.routes[proto].kind)})
		return route{}, false
	}
	r := candidates[0]
	for _, loser := range candidates[1:] {
		c.report(problem{obj: loser.ref, reason: reasonRouteConflict, subject: string(l.Name),
			message: fmt.Sprintf("listener %q of Gateway %s/%s is already taken by the older %s; this route is ignored there", l.Name, g.Namespace, g.Name, r.ref)})
	}
	return r, true
}

// candidateRoutes returns the routes of proto, oldest first, with a
// parentRef selecting listener l of g that l accepts. It marks those
// parentRefs matched and reports the routes l does not accept.
func (c *computation) candidateRoutes(g *gwv1.Gateway, l gwv1.Listener, proto protocol.Kind) []route {
	var candidates []route
	for _, r := range c.routes[proto] {
		if !c.markSelecting(r, g, l) {
			continue
		}
		if why := notAllowed(l, g.Namespace, r, c.w.namespaceLabels); why != "" {
			c.report(problem{obj: r.ref, reason: reasonNotAllowed, subject: string(l.Name),
				message: fmt.Sprintf("listener %q of Gateway %s/%s does not accept this route: %s", l.Name, g.Namespace, g.Name, why)})
			continue
		}
		candidates = append(candidates, r)
	}
	return candidates
}

// markSelecting marks every parentRef of r that selects listener l of g as
// matched, and reports whether there was one.
func (c *computation) markSelecting(r route, g *gwv1.Gateway, l gwv1.Listener) bool {
	sel := false
	for i, p := range r.parentRefs {
		if !selects(p, r.ref.namespace, g, l) {
			continue
		}
		sel = true
		if c.matched[r.ref.key()] == nil {
			c.matched[r.ref.key()] = map[int]bool{}
		}
		c.matched[r.ref.key()][i] = true
	}
	return sel
}

// reportUnmatchedParentRefs reports each parentRef that names a managed
// Gateway but selects none of its listeners: almost always a typo in
// sectionName or port.
func (c *computation) reportUnmatchedParentRefs() {
	for proto, rs := range c.routes {
		for _, r := range rs {
			for i, p := range r.parentRefs {
				if c.matched[r.ref.key()][i] {
					continue
				}
				g := findGateway(c.gateways, p, r.ref.namespace)
				if g == nil || !c.managed(g, proto) {
					continue
				}
				c.report(problem{obj: r.ref, reason: reasonNoMatchingListener, subject: strconv.Itoa(i),
					message: fmt.Sprintf("parentRefs[%d] selects no %s listener of Gateway %s/%s%s", i, strings.ToUpper(proto.String()), g.Namespace, g.Name, describeSection(p))})
			}
		}
	}
}

func olderFirst(a, b route) int {
	if !a.created.Equal(&b.created) {
		if a.created.Before(&b.created) {
			return -1
		}
		return 1
	}
	return cmp.Or(cmp.Compare(a.ref.namespace, b.ref.namespace), cmp.Compare(a.ref.name, b.ref.name))
}

func describeSection(p gwv1.ParentReference) string {
	var parts []string
	if p.SectionName != nil {
		parts = append(parts, fmt.Sprintf("sectionName %q", *p.SectionName))
	}
	if p.Port != nil {
		parts = append(parts, fmt.Sprintf("port %d", *p.Port))
	}
	if len(parts) == 0 {
		return ""
	}
	return " with " + strings.Join(parts, " and ")
}

// listenerProtocol maps a listener protocol to its Kind; other protocols
// (HTTP, TLS, ...) are not portway's: 0.
func listenerProtocol(p gwv1.ProtocolType) protocol.Kind {
	switch p {
	case gwv1.TCPProtocolType:
		return protocol.KindTCP
	case gwv1.UDPProtocolType:
		return protocol.KindUDP
	}
	return 0
}

// isGatewayRef reports whether p refers to a Gateway (group and kind
// default to the Gateway API's Gateway), and returns its namespace.
func isGatewayRef(p gwv1.ParentReference, routeNS string) (string, bool) {
	if p.Group != nil && string(*p.Group) != gwv1.GroupName {
		return "", false
	}
	if p.Kind != nil && *p.Kind != "Gateway" {
		return "", false
	}
	ns := routeNS
	if p.Namespace != nil && *p.Namespace != "" {
		ns = string(*p.Namespace)
	}
	return ns, true
}

// selects reports whether a route's parentRef selects listener l of g:
// the Gateway by name and namespace (default: the route's), the listener by
// sectionName and port when given, else every listener.
func selects(p gwv1.ParentReference, routeNS string, g *gwv1.Gateway, l gwv1.Listener) bool {
	ns, ok := isGatewayRef(p, routeNS)
	if !ok || ns != g.Namespace || string(p.Name) != g.Name {
		return false
	}
	if p.SectionName != nil && *p.SectionName != l.Name {
		return false
	}
	if p.Port != nil && *p.Port != l.Port {
		return false
	}
	return true
}

func findGateway(gws []*gwv1.Gateway, p gwv1.ParentReference, routeNS string) *gwv1.Gateway {
	ns, ok := isGatewayRef(p, routeNS)
	if !ok {
		return nil
	}
	for _, g := range gws {
		if g.Namespace == ns && g.Name == string(p.Name) {
			return g
		}
	}
	return nil
}

// gatewayNotPermitted returns why a labelled Gateway is not managed, or "":
// managed Gateways may live only in tunnels.discovery.gateway_namespaces
// (which New fills with the agent's own namespace when empty) and, when
// tunnels.discovery.gateway_classes is set, have one of those classes. The
// routes beside a managed Gateway may use Services of any namespace, so
// that privilege stays with namespaces the operator chose.
func gatewayNotPermitted(g *gwv1.Gateway, d config.Discovery) string {
	if !slices.Contains(d.GatewayNamespaces, g.Namespace) {
		return fmt.Sprintf("the Gateway is labelled for portway, but managed Gateways may only live in namespaces %s (tunnels.discovery.gateway_namespaces); ignored",
			strings.Join(d.GatewayNamespaces, ", "))
	}
	if len(d.GatewayClasses) > 0 && !slices.Contains(d.GatewayClasses, string(g.Spec.GatewayClassName)) {
		return fmt.Sprintf("the Gateway is labelled for portway, but its gatewayClassName %q is not one of %s (tunnels.discovery.gateway_classes); ignored",
			g.Spec.GatewayClassName, strings.Join(d.GatewayClasses, ", "))
	}
	return ""
}

// notAllowed returns why listener l (of a Gateway in gwNS) does not accept
// route r, or "". nsLabels returns the labels of a namespace, for
// allowedRoutes.namespaces.from: Selector.
func notAllowed(l gwv1.Listener, gwNS string, r route, nsLabels func(string) (labels.Set, error)) string {
	from := gwv1.NamespacesFromSame
	var nsSel *metav1.LabelSelector
	var kinds []gwv1.RouteGroupKind
	if ar := l.AllowedRoutes; ar != nil {
		if ar.Namespaces != nil && ar.Namespaces.From != nil {
			from = *ar.Namespaces.From
			nsSel = ar.Namespaces.Selector
		}
		kinds = ar.Kinds
	}
	switch from {
	case gwv1.NamespacesFromAll:
	case gwv1.NamespacesFromSame:
		if r.ref.namespace != gwNS {
			return "allowedRoutes.namespaces.from is Same and the route is in another namespace"
		}
	case gwv1.NamespacesFromSelector:
		// As the Gateway API defines it: the Gateway's own namespace too
		// must match the selector.
		if nsSel == nil {
			return "allowedRoutes.namespaces.from is Selector but no selector is given"
		}
		sel, err := metav1.LabelSelectorAsSelector(nsSel)
		if err != nil {
			return fmt.Sprintf("allowedRoutes.namespaces.selector is invalid: %v", err)
		}
		set, err := nsLabels(r.ref.namespace)
		if err != nil {
			return fmt.Sprintf("allowedRoutes.namespaces.from is Selector and the labels of namespace %s are unknown: %v", r.ref.namespace, err)
		}
		if !sel.Matches(set) {
			return fmt.Sprintf("namespace %s does not match allowedRoutes.namespaces.selector (%s)", r.ref.namespace, sel)
		}
	default:
		return fmt.Sprintf("allowedRoutes.namespaces.from is %s", from)
	}
	if len(kinds) > 0 && !slices.ContainsFunc(kinds, func(k gwv1.RouteGroupKind) bool {
		return (k.Group == nil || string(*k.Group) == gwv1.GroupName) && string(k.Kind) == r.ref.kind
	}) {
		return "allowedRoutes.kinds does not list " + r.ref.kind
	}
	return ""
}

// errNamespacesUnreadable is namespaceLabels' answer while Namespaces
// cannot be read (not yet synced, or the agent's RBAC lacks them).
var errNamespacesUnreadable = errors.New("namespaces are not readable yet (the agent needs get, list and watch on namespaces)")

// namespaceLabels returns the labels of namespace ns from the cache.
func (w *world) namespaceLabels(ns string) (labels.Set, error) {
	if w.namespaces == nil || (w.namespacesSynced != nil && !w.namespacesSynced()) {
		return nil, errNamespacesUnreadable
	}
	n, err := w.namespaces.Get(ns)
	if err != nil {
		return nil, err
	}
	return labels.Set(n.Labels), nil
}

// resolveBackend turns the route's first backendRef into host:port.
// ExternalName Services resolve to their name (looked up at each dial),
// Services with a ClusterIP to ClusterIP:port, headless Services to a ready
// endpoint of their EndpointSlices; no cluster domain is assumed anywhere.
//
// A route outside the Gateway's namespace (gwNS) may use a Service of a
// third namespace only when a ReferenceGrant there allows it. Routes beside
// the Gateway need none: whoever may write them is trusted as the Gateway's
// owner, and the PipeOps examples (routes in pipeops-system, Services in
// databases) rely on that. Other routes may also not use a Service that
// leads further than they may reach (see reachNotPermitted).
func resolveBackend(w *world, r route, proto protocol.Kind, gwNS string) (string, *problem) {
	ref, prob := firstBackend(r)
	if prob != nil {
		return "", prob
	}
	svc, prob := w.backendService(r, ref, gwNS)
	if prob != nil {
		return "", prob
	}
	return w.serviceAddress(r.ref, svc, ref.port, proto)
}

// backendRef is the Service a route's backendRef names.
type backendRef struct {
	namespace, name string
	port            int32
}

// firstBackend checks the route's first backendRef: a core Service with a
// port, in the route's namespace unless it names another.
func firstBackend(r route) (backendRef, *problem) {
	if len(r.backends) == 0 {
		return backendRef{}, newProblem(r.ref, reasonNoBackend, "the route's first rule has no backendRefs; not exposed")
	}
	// Further backendRefs (weighted splits) are not used: portway dials one
	// backend per service, as documented.
	b := r.backends[0].BackendObjectReference
	if (b.Group != nil && *b.Group != "") || (b.Kind != nil && *b.Kind != "Service") {
		return backendRef{}, newProblem(r.ref, reasonUnsupportedBackend, "backendRef %s is not a core Service; only Services are supported", b.Name)
	}
	if b.Port == nil {
		return backendRef{}, newProblem(r.ref, reasonBackendPort, "backendRef %s has no port", b.Name)
	}
	ref := backendRef{namespace: r.ref.namespace, name: string(b.Name), port: int32(*b.Port)}
	if b.Namespace != nil && *b.Namespace != "" {
		ref.namespace = string(*b.Namespace)
	}
	return ref, nil
}

// backendService returns the Service ref names, once the route may use it:
// routes beside a managed Gateway (in gwNS) are trusted as its owner's,
// since managed Gateways live only in the namespaces the operator listed;
// other routes need a ReferenceGrant to reach into another namespace, and
// a Service that leads no further than they may reach.
func (w *world) backendService(r route, ref backendRef, gwNS string) (*corev1.Service, *problem) {
	ns, name := ref.namespace, ref.name
	privileged := r.ref.namespace == gwNS
	if ns != r.ref.namespace && !privileged {
		ok, err := w.referenceAllowed(r.ref.kind, r.ref.namespace, ns, name)
		if err != nil {
			return nil, newProblem(r.ref, reasonRefNotPermitted, "backend Service %s/%s: %v; not exposed", ns, name, err)
		}
		if !ok {
			return nil, newProblem(r.ref, reasonRefNotPermitted, "backend Service %s/%s is in another namespace, and no ReferenceGrant in %s lets %ss of namespace %s use it; not exposed",
				ns, name, ns, r.ref.kind, r.ref.namespace)
		}
	}
	svc, err := w.services.Services(ns).Get(name)
	if err != nil {
		return nil, newProblem(r.ref, reasonBackendNotFound, "backend Service %s/%s not found; not exposed", ns, name)
	}
	if !privileged {
		why, err := w.reachNotPermitted(r, svc, gwNS)
		if err != nil {
			return nil, newProblem(r.ref, reasonRefNotPermitted, "backend Service %s/%s: %v; not exposed", ns, name, err)
		}
		if why != "" {
			return nil, newProblem(r.ref, reasonRefNotPermitted, "backend Service %s/%s %s; not exposed", ns, name, why)
		}
	}
	return svc, nil
}

// serviceAddress returns host:port to dial for port of svc: its
// ExternalName, its ClusterIP, or for a headless Service a ready endpoint.
// Problems are reported on obj, the route.
func (w *world) serviceAddress(obj objectRef, svc *corev1.Service, port int32, proto protocol.Kind) (string, *problem) {
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return net.JoinHostPort(svc.Spec.ExternalName, strconv.Itoa(int(port))), nil
	}
	want := corev1.ProtocolTCP
	if proto == protocol.KindUDP {
		want = corev1.ProtocolUDP
	}
	i := slices.IndexFunc(svc.Spec.Ports, func(sp corev1.ServicePort) bool {
		return sp.Port == port && cmp.Or(sp.Protocol, corev1.ProtocolTCP) == want
	})
	if i < 0 {
		return "", newProblem(obj, reasonBackendPort, "backend Service %s/%s has no %s port %d", svc.Namespace, svc.Name, want, port)
	}
	if ip := svc.Spec.ClusterIP; ip != "" && ip != corev1.ClusterIPNone {
		return net.JoinHostPort(ip, strconv.Itoa(int(port))), nil
	}
	return w.headlessEndpoint(obj, svc, svc.Spec.Ports[i], want)
}

// headlessEndpoint returns a ready endpoint of headless svc for its port sp
// (of protocol want), which maps to the endpoints' port by name.
func (w *world) headlessEndpoint(obj objectRef, svc *corev1.Service, sp corev1.ServicePort, want corev1.Protocol) (string, *problem) {
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: svc.Name})
	eps, err := w.slices.EndpointSlices(svc.Namespace).List(sel)
	if err != nil {
		return "", newProblem(obj, reasonNoReadyEndpoints, "listing EndpointSlices of %s/%s: %v", svc.Namespace, svc.Name, err)
	}
	var candidates []string
	for _, es := range eps {
		epPort := slicePort(es, sp.Name, want)
		if epPort == 0 {
			continue
		}
		for _, e := range es.Endpoints {
			if len(e.Addresses) == 0 || !(ptrOr(e.Conditions.Ready, true) || svc.Spec.PublishNotReadyAddresses) {
				continue
			}
			candidates = append(candidates, net.JoinHostPort(e.Addresses[0], strconv.Itoa(int(epPort))))
		}
	}
	if len(candidates) == 0 {
		return "", newProblem(obj, reasonNoReadyEndpoints, "headless Service %s/%s has no ready endpoint for %s port %d; not exposed", svc.Namespace, svc.Name, want, sp.Port)
	}
	// The smallest address, so that the choice is stable across
	// recomputes and only changes when that endpoint goes.
	slices.Sort(candidates)
	return candidates[0], nil
}

// slicePort returns the port of es named name with protocol want, 0 when
// es has none.
func slicePort(es *discoveryv1.EndpointSlice, name string, want corev1.Protocol) int32 {
	for _, p := range es.Ports {
		if p.Port != nil && ptrOr(p.Name, "") == name && ptrOr(p.Protocol, corev1.ProtocolTCP) == want {
			return *p.Port
		}
	}
	return 0
}

// newProblem is a problem with obj, formatting its message.
func newProblem(obj objectRef, reason, format string, args ...any) *problem {
	return &problem{obj: obj, reason: reason, message: fmt.Sprintf(format, args...)}
}

// managedByController is the EndpointSlice controller's value of
// discoveryv1.LabelManagedBy: it keeps such slices in line with the
// Service's selector, and so with Pods of the Service's namespace.
const managedByController = "endpointslice-controller.k8s.io"

// maxExternalNameHops bounds the ExternalName Services followed from one
// backend.
const maxExternalNameHops = 4

// reachNotPermitted returns why svc, the backend of a route that is not
// beside its Gateway, may lead outside what that route may use, or "".
// ReferenceGrants guard references by name; a Service can still lead
// elsewhere by what it resolves to, so:
//
//   - An ExternalName Service for a cluster Service name
//     (name.namespace.svc, or name.namespace.svc.cluster.local) counts as a
//     reference to that Service: it needs a ReferenceGrant there, as a
//     backendRef would, and that Service is checked in turn.
//   - Any other ExternalName (an IP address, an outside host name, a
//     custom cluster domain) leads where no namespace can vouch for.
//   - Other Services must have a selector, and every EndpointSlice of
//     theirs must be kept by the EndpointSlice controller with each
//     endpoint a Pod of the Service's namespace. Slices written by hand
//     (or mirrored from hand-written Endpoints) may name any address.
//
// err is set when ReferenceGrants cannot be read yet.
func (w *world) reachNotPermitted(r route, svc *corev1.Service, gwNS string) (string, error) {
	from := r.ref.namespace
	onlyBeside := "; only routes in the Gateway's namespace " + gwNS + " may use it"
	for hop := 0; ; hop++ {
		if svc.Spec.Type != corev1.ServiceTypeExternalName {
			if why := w.endpointsNotConfined(svc); why != "" {
				if hop > 0 {
					why = fmt.Sprintf("leads to Service %s/%s, which %s", svc.Namespace, svc.Name, why)
				}
				return why + onlyBeside, nil
			}
			return "", nil
		}
		via := ""
		if hop > 0 {
			via = fmt.Sprintf(" through the ExternalName Service %s/%s", svc.Namespace, svc.Name)
		}
		name, ns, ok := clusterServiceName(svc.Spec.ExternalName)
		if !ok {
			return fmt.Sprintf("is an ExternalName Service%s for %q, which no namespace owns", via, svc.Spec.ExternalName) + onlyBeside, nil
		}
		if hop == maxExternalNameHops {
			return fmt.Sprintf("leads through more than %d ExternalName Services", maxExternalNameHops) + onlyBeside, nil
		}
		if ns != from {
			ok, err := w.referenceAllowed(r.ref.kind, from, ns, name)
			if err != nil {
				return "", err
			}
			if !ok {
				return fmt.Sprintf("is an ExternalName Service%s for Service %s/%s, and no ReferenceGrant in %s lets %ss of namespace %s use it", via, ns, name, ns, r.ref.kind, from), nil
			}
		}
		next, err := w.services.Services(ns).Get(name)
		if err != nil {
			return fmt.Sprintf("is an ExternalName Service%s for Service %s/%s, which does not exist", via, ns, name), nil
		}
		svc = next
	}
}

// endpointsNotConfined returns why the endpoints of svc (not ExternalName)
// may lie outside its namespace's Pods, or "".
func (w *world) endpointsNotConfined(svc *corev1.Service) string {
	if len(svc.Spec.Selector) == 0 {
		return "has no selector, so its endpoints are written by hand and may be any address"
	}
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: svc.Name})
	eps, err := w.slices.EndpointSlices(svc.Namespace).List(sel)
	if err != nil {
		return fmt.Sprintf("has EndpointSlices that cannot be listed (%v)", err)
	}
	slices.SortFunc(eps, func(a, b *discoveryv1.EndpointSlice) int { return cmp.Compare(a.Name, b.Name) })
	for _, es := range eps {
		if es.Labels[discoveryv1.LabelManagedBy] != managedByController {
			return fmt.Sprintf("has the EndpointSlice %s, not kept by the EndpointSlice controller, so its addresses may be anywhere", es.Name)
		}
		for _, e := range es.Endpoints {
			if tr := e.TargetRef; tr == nil || tr.Kind != "Pod" || tr.Namespace != svc.Namespace {
				return fmt.Sprintf("has an endpoint %s in EndpointSlice %s that is not a Pod of namespace %s", strings.Join(e.Addresses, ","), es.Name, svc.Namespace)
			}
		}
	}
	return ""
}

// clusterServiceName parses name.namespace.svc or
// name.namespace.svc.cluster.local (a trailing dot allowed). Other cluster
// domains are not recognised: a name under any other suffix may be a
// public DNS name that anyone can point anywhere.
func clusterServiceName(host string) (name, namespace string, ok bool) {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	parts := strings.Split(host, ".")
	switch {
	case len(parts) == 3 && parts[2] == "svc":
	case len(parts) == 5 && parts[2] == "svc" && parts[3] == "cluster" && parts[4] == "local":
	default:
		return "", "", false
	}
	if !isLabel(parts[0]) || !isLabel(parts[1]) {
		return "", "", false
	}
	return parts[0], parts[1], true
}

// isLabel reports whether s is a DNS-1123 label, as Service and namespace
// names are.
func isLabel(s string) bool {
	if s == "" || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// routingMode decides a Gateway's mode: the routing-mode annotation wins;
// then force_tunnel_mode; then a public address (direct, or dual when
// dual_mode_enabled); else tunnel. public is the address for direct
// endpoints ("" when none).
func routingMode(g *gwv1.Gateway, gref objectRef, svcs corelisters.ServiceLister, r config.Routing) (mode Mode, public string, probs []problem) {
	public = publicAddress(g, svcs)
	if v, ok := g.Annotations[AnnotationRoutingMode]; ok {
		switch m := Mode(strings.ToLower(strings.TrimSpace(v))); m {
		case ModeTunnel, ModeDirect, ModeDual:
			if m != ModeTunnel && public == "" {
				probs = append(probs, problem{obj: gref, reason: reasonNoPublicAddress,
					message: fmt.Sprintf("%s=%s but the Gateway has no public address (status.addresses or a LoadBalancer Service labelled %s=%s); direct endpoints unknown", AnnotationRoutingMode, m, LabelGatewayName, g.Name)})
			}
			return m, public, probs
		default:
			probs = append(probs, problem{obj: gref, reason: reasonInvalidAnnotation, subject: AnnotationRoutingMode,
				message: fmt.Sprintf("annotation %s=%q is not tunnel, direct or dual; ignored", AnnotationRoutingMode, v)})
		}
	}
	switch {
	case r.ForceTunnelMode:
		return ModeTunnel, public, probs
	case public != "" && r.DualModeEnabled:
		return ModeDual, public, probs
	case public != "":
		return ModeDirect, public, probs
	}
	return ModeTunnel, "", probs
}

// publicAddress returns the first public IP address of the Gateway: from
// status.addresses (type IPAddress), else from the ingress of a
// LoadBalancer Service in the Gateway's namespace labelled
// gateway.networking.k8s.io/gateway-name=<gateway> (how Istio and other
// implementations mark the Service they create). Host names are not
// evidence: Istio reports the in-cluster Service name there before a load
// balancer is assigned, and an internal load balancer's name resolves to
// private addresses.
func publicAddress(g *gwv1.Gateway, svcs corelisters.ServiceLister) string {
	for _, a := range g.Status.Addresses {
		if a.Type != nil && *a.Type != gwv1.IPAddressType {
			continue
		}
		if ip, err := netip.ParseAddr(a.Value); err == nil && isPublic(ip) {
			return ip.String()
		}
	}
	lbs, err := svcs.Services(g.Namespace).List(labels.SelectorFromSet(labels.Set{LabelGatewayName: g.Name}))
	if err != nil {
		return ""
	}
	slices.SortFunc(lbs, func(a, b *corev1.Service) int { return cmp.Compare(a.Name, b.Name) })
	for _, s := range lbs {
		if s.Spec.Type != corev1.ServiceTypeLoadBalancer {
			continue
		}
		for _, in := range s.Status.LoadBalancer.Ingress {
			if ip, err := netip.ParseAddr(in.IP); err == nil && isPublic(ip) {
				return ip.String()
			}
		}
	}
	return ""
}

// cgnat is RFC 6598's shared address space, used by carrier-grade NAT and
// by some clouds for internal load balancers.
var cgnat = netip.MustParsePrefix("100.64.0.0/10")

// isPublic reports whether ip is reachable from the internet: a global
// unicast address outside RFC 1918 / RFC 4193 private ranges, loopback,
// link-local and CGNAT space.
func isPublic(ip netip.Addr) bool {
	ip = ip.Unmap()
	return ip.IsGlobalUnicast() && !ip.IsPrivate() && !ip.IsLoopback() &&
		!ip.IsLinkLocalUnicast() && !cgnat.Contains(ip)
}

// idleTimeout reads pipeops.io/idle-timeout; an invalid value is reported
// and ignored (0: the agent's configured timeouts apply).
func idleTimeout(g *gwv1.Gateway, gref objectRef) (time.Duration, *problem) {
	v, ok := g.Annotations[AnnotationIdleTimeout]
	if !ok {
		return 0, nil
	}
	d, err := time.ParseDuration(strings.TrimSpace(v))
	if err == nil && d < minIdleTimeout {
		err = fmt.Errorf("below the minimum of %v", minIdleTimeout)
	}
	if err != nil {
		return 0, &problem{obj: gref, reason: reasonInvalidAnnotation, subject: AnnotationIdleTimeout,
			message: fmt.Sprintf("annotation %s=%q is not a duration of at least %v (like 10m); ignored", AnnotationIdleTimeout, v, minIdleTimeout)}
	}
	return d, nil
}

// accessAnnotations picks the access annotations present in a route's
// annotations (nil when none is).
func accessAnnotations(all map[string]string) map[string]string {
	var out map[string]string
	for _, k := range []string{AnnotationProxyProtocol, AnnotationAllowCIDRs, AnnotationDenyCIDRs} {
		if v, ok := all[k]; ok {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}

// routeAccess reads route r's access annotations for a service of proto.
// An invalid one is reported and the listener is not exposed: ignoring a
// malformed allow list would open the service wider than its owner asked,
// and a backend that expects a PROXY header refuses every connection
// without one.
func routeAccess(r route, proto protocol.Kind) (string, config.SourcePolicy, *problem) {
	var policy config.SourcePolicy
	bad := func(key, v, why string) (string, config.SourcePolicy, *problem) {
		return "", policy, &problem{obj: r.ref, reason: reasonInvalidAnnotation,
			message: fmt.Sprintf("annotation %s=%q: %s; not exposed", key, v, why)}
	}
	pp := strings.TrimSpace(r.access[AnnotationProxyProtocol])
	switch pp {
	case config.ProxyProtocolOff, config.ProxyProtocolV2:
	case config.ProxyProtocolV1:
		if proto == protocol.KindUDP {
			return bad(AnnotationProxyProtocol, pp, "v1 has no datagram form, use v2 on a UDPRoute")
		}
	default:
		return bad(AnnotationProxyProtocol, pp, "not v1 or v2")
	}
	for _, a := range []struct {
		key  string
		list *[]string
	}{{AnnotationAllowCIDRs, &policy.AllowCIDRs}, {AnnotationDenyCIDRs, &policy.DenyCIDRs}} {
		v, ok := r.access[a.key]
		if !ok {
			continue
		}
		var list []string
		for _, f := range strings.Split(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				list = append(list, f)
			}
		}
		if len(list) == 0 {
			return bad(a.key, v, "no CIDR listed (remove the annotation to allow every source)")
		}
		if _, err := config.ParseCIDRs(list); err != nil {
			return bad(a.key, v, err.Error())
		}
		*a.list = list
	}
	return pp, policy, nil
}
