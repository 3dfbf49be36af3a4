// Package discovery turns Kubernetes Gateway API objects into tunnel
// services.
//
// It watches, with client-go shared informers (never by polling), the
// Gateways labelled for portway, the TCPRoutes and UDPRoutes in every
// namespace, the Services and EndpointSlices those routes point at, the
// ReferenceGrants that allow routes to use Services of other namespaces,
// and Namespaces (for listeners that select route namespaces by label). On
// every change it recomputes the full desired set of services and hands it to
// Options.Publish. The endpoints the gateway assigns come back through
// SetEndpoints and are written to annotations on the Gateways and routes.
// Objects that cannot be exposed are reported in the log and as Kubernetes
// Events on the object.
//
// The package knows nothing of the agent or the gateway: internal/cli maps
// Service and Endpoint to and from the agent's types.
package discovery

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gwinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
)

// Annotations and labels read or written by discovery. The pipeops.io keys
// are the PipeOps agent's public interface and are kept exactly
// (docs/compatibility.md).
const (
	// AnnotationRoutingMode on a Gateway forces its routing mode:
	// tunnel, direct or dual.
	AnnotationRoutingMode = "pipeops.io/routing-mode"
	// AnnotationIdleTimeout on a Gateway overrides tunnels.tcp.idle_timeout
	// and tunnels.udp.session_timeout for its services (a Go duration).
	AnnotationIdleTimeout = "pipeops.io/idle-timeout"
	// AnnotationEndpoints is written on each managed Gateway: JSON, listener
	// name → its endpoints.
	AnnotationEndpoints = "pipeops.io/tunnel-endpoints"
	// AnnotationRouteEndpoint is written on each route backing a service:
	// its endpoints, comma-separated, tunnel first.
	AnnotationRouteEndpoint = "pipeops.io/tunnel-endpoint"
	// AnnotationProxyProtocol on a TCPRoute or UDPRoute makes the agent
	// write a PROXY protocol header to the backend: v1 or v2 (UDP: v2).
	AnnotationProxyProtocol = "pipeops.io/proxy-protocol"
	// AnnotationAllowCIDRs on a route restricts the service's clients to
	// these sources (comma-separated CIDRs or addresses).
	AnnotationAllowCIDRs = "pipeops.io/allow-cidrs"
	// AnnotationDenyCIDRs on a route refuses these sources.
	AnnotationDenyCIDRs = "pipeops.io/deny-cidrs"
	// LabelGatewayName marks the Services that a Gateway implementation
	// (Istio, for one) creates for a Gateway; a LoadBalancer among them
	// gives the Gateway its public address.
	LabelGatewayName = "gateway.networking.k8s.io/gateway-name"
	// FieldManager names portway in managedFields and Events.
	FieldManager = "portway-agent"
)

// Mode is a Gateway's routing mode: the one type the agent registers and
// the gateway shows, protocol.Mode.
type Mode = protocol.Mode

// The routing modes, named as the PipeOps agent names them.
const (
	ModeTunnel = protocol.ModeTunnel
	ModeDirect = protocol.ModeDirect
	ModeDual   = protocol.ModeDual
)

// Service is one discovered tunnel service: a TCP or UDP listener of a
// managed Gateway with a route to a backend.
type Service struct {
	// ID is namespace/gateway/listener, unique in the cluster.
	ID string
	// Protocol is the listener's protocol.
	Protocol protocol.Kind
	// Port is the listener's port.
	Port int
	// Backend is host:port to dial: the Service's ClusterIP and port, or a
	// ready endpoint of a headless Service.
	Backend string
	// IdleTimeout is the Gateway's pipeops.io/idle-timeout, 0 when unset.
	IdleTimeout time.Duration
	// Mode is the Gateway's routing mode.
	Mode Mode
	// ProxyProtocol is the route's pipeops.io/proxy-protocol ("" when
	// unset).
	ProxyProtocol string
	// Policy holds the route's pipeops.io/allow-cidrs and deny-cidrs.
	Policy config.SourcePolicy
}

// Endpoint is the gateway's answer for one published service.
type Endpoint struct {
	ID       string
	Protocol protocol.Kind
	// Address is the public host:port; empty when Error is set.
	Address string
	Error   string
}

// Options configure a Discoverer.
type Options struct {
	// Config reaches the Kubernetes API (see RESTConfig).
	Config *rest.Config
	// Tunnels is the agent's tunnels: block: enabled, routing, discovery.
	Tunnels config.Tunnels
	Logger  *slog.Logger
	// Publish receives the full set of services to register (modes tunnel
	// and dual) whenever it changes. It is called from one goroutine and
	// must not block.
	Publish func([]Service)
	// Discovered and Syncs, when set, are the PipeOps agent's
	// pipeops_agent_gateway_watcher_discovered_services{protocol} and
	// pipeops_agent_gateway_watcher_sync_total{result}.
	Discovered *prometheus.GaugeVec
	Syncs      *prometheus.CounterVec
	// Instance names this agent in Events (default: the host name, which is
	// the pod name in a cluster).
	Instance string
	// Namespace is the agent's own namespace (see AgentNamespace): where
	// managed Gateways may live when tunnels.discovery.gateway_namespaces
	// is empty. New fails when both are empty.
	Namespace string
}

// Timing of the loop. The throttle bounds how soon a change is published
// (the agent then debounces its register by another 100 ms), so that a
// burst of informer events costs one recompute.
const (
	throttle     = 150 * time.Millisecond
	retryInitial = 500 * time.Millisecond
	retryMax     = 20 * time.Second
	// crdRetryMax bounds the wait for the Gateway API CRDs: an agent
	// deployed with them recovers within seconds of their install.
	crdRetryMax    = 8 * time.Second
	requestTimeout = 15 * time.Second
	// optionalSyncWait bounds the wait at start for the caches that need
	// permissions older RBAC lacks (Namespaces, ReferenceGrants).
	optionalSyncWait = 10 * time.Second
)

// Discoverer watches the cluster and publishes tunnel services.
type Discoverer struct {
	opts   Options
	log    *slog.Logger
	kube   kubernetes.Interface
	gw     gwclient.Interface
	events *eventWriter

	// trigger (cap 1) asks the loop for a recompute.
	trigger chan struct{}

	mu        sync.Mutex
	endpoints map[protocol.ServiceKey]Endpoint // from the last SetEndpoints

	// Owned by the loop goroutine.
	w         *world
	published []Service
	known     map[protocol.ServiceKey]Service // every discovered service, for change logs
	problems  map[string]problem              // reported and not yet resolved
	written   map[objectKey]pending           // annotation patches the cache has not shown yet
	loggedEP  map[string]string               // gateway/listener → endpoints line last logged
	retry     *time.Timer                     // re-runs a failed write-back
	retryWait time.Duration
}

// New checks the options and builds the API clients. It does not contact
// the API server; Run does.
func New(o Options) (*Discoverer, error) {
	if o.Config == nil {
		return nil, errors.New("discovery: no Kubernetes client config")
	}
	if o.Publish == nil {
		return nil, errors.New("discovery: no Publish function")
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.Instance == "" {
		o.Instance, _ = os.Hostname()
	}
	// A managed Gateway lends its routes the agent's reach into every
	// namespace: without a list of namespaces to confine it to, there is
	// no safe default.
	disc := &o.Tunnels.Discovery
	switch {
	case len(disc.GatewayNamespaces) > 0:
		disc.GatewayNamespaces = slices.Clone(disc.GatewayNamespaces)
	case o.Namespace != "":
		disc.GatewayNamespaces = []string{o.Namespace}
	default:
		return nil, errors.New("discovery: tunnels.discovery.gateway_namespaces is empty and the agent's namespace is unknown")
	}
	disc.GatewayClasses = slices.Clone(disc.GatewayClasses)
	base := rest.CopyConfig(o.Config)
	if base.QPS == 0 {
		// client-go's default (5/s, burst 10) would make the first sync of
		// a cluster with many Gateways wait seconds for its patches.
		base.QPS, base.Burst = 20, 40
	}
	base.UserAgent = FieldManager
	base.WarningHandlerWithContext = newWarningLogger(log)

	// Core objects are fetched as protobuf, cheaper for large lists of
	// Services and EndpointSlices; the Gateway API types only speak JSON.
	kcfg := rest.CopyConfig(base)
	kcfg.ContentType = runtime.ContentTypeProtobuf
	kcfg.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	kube, err := kubernetes.NewForConfig(kcfg)
	if err != nil {
		return nil, fmt.Errorf("discovery: Kubernetes client: %w", err)
	}
	gcfg := rest.CopyConfig(base)
	gcfg.ContentType = runtime.ContentTypeJSON
	gcfg.AcceptContentTypes = runtime.ContentTypeJSON
	gw, err := gwclient.NewForConfig(gcfg)
	if err != nil {
		return nil, fmt.Errorf("discovery: Gateway API client: %w", err)
	}
	return &Discoverer{
		opts: o, log: log, kube: kube, gw: gw,
		events:    newEventWriter(kube.EventsV1(), o.Instance, log),
		trigger:   make(chan struct{}, 1),
		endpoints: map[protocol.ServiceKey]Endpoint{},
		known:     map[protocol.ServiceKey]Service{},
		problems:  map[string]problem{},
		written:   map[objectKey]pending{},
		loggedEP:  map[string]string{},
	}, nil
}

// SetEndpoints records the gateway's answers for the published services and
// writes them back to Kubernetes. It does not block: the agent calls it from
// its session loop.
func (d *Discoverer) SetEndpoints(eps []Endpoint) {
	m := make(map[protocol.ServiceKey]Endpoint, len(eps))
	for _, e := range eps {
		m[e.key()] = e
	}
	d.mu.Lock()
	d.endpoints = m
	d.mu.Unlock()
	d.poke()
}

func (d *Discoverer) poke() {
	select {
	case d.trigger <- struct{}{}:
	default:
	}
}

// Run waits until the Gateway API is installed, starts the informers and
// publishes the desired set on every change until ctx ends. It returns nil
// when ctx ends.
func (d *Discoverer) Run(ctx context.Context) error {
	apis, err := d.waitForAPI(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	ws := d.newWatches(apis)
	if err := ws.notify(d.poke); err != nil {
		return err
	}
	ws.start(ctx)
	defer ws.shutdown()
	stopEvents := d.startEvents(ctx)
	defer stopEvents()

	if !ws.waitForSync(ctx) {
		return nil
	}
	d.warnUnreadable(ws.world)
	d.w = ws.world
	d.log.Info("Kubernetes discovery started", "tcproutes", apis.routes[protocol.KindTCP], "udproutes", apis.routes[protocol.KindUDP], "referencegrants", cmp.Or(apis.grants, "(not served)"),
		"tcp_label", labelOrOff(d.opts.Tunnels.Discovery.TCP), "udp_label", labelOrOff(d.opts.Tunnels.Discovery.UDP),
		"gateway_namespaces", strings.Join(d.opts.Tunnels.Discovery.GatewayNamespaces, ","),
		"gateway_classes", cmp.Or(strings.Join(d.opts.Tunnels.Discovery.GatewayClasses, ","), "(any)"))
	return d.loop(ctx)
}

// watches are the shared informers a running Discoverer reads, and the
// world built on their caches.
type watches struct {
	kube  informers.SharedInformerFactory
	gw    gwinformers.SharedInformerFactory
	world *world
	// required are waited for before the first publish: publishing
	// before every cache is filled would withdraw services that exist,
	// for a moment, at every start.
	required []cache.SharedIndexInformer
	// optional (Namespaces, ReferenceGrants) are read under permissions
	// that an agent deployed with older RBAC lacks: they are not waited
	// for at start beyond optionalSyncWait, and until they sync nothing
	// they would allow is allowed.
	optional []cache.SharedIndexInformer
}

// newWatches builds the informers for the kinds discovery reads, at the
// versions the cluster serves. They run once started.
func (d *Discoverer) newWatches(served apis) *watches {
	// Managed fields are never read here and are a large part of each
	// cached object.
	kf := informers.NewSharedInformerFactoryWithOptions(d.kube, 0, informers.WithTransform(stripManagedFields))
	gf := gwinformers.NewSharedInformerFactoryWithOptions(d.gw, 0, gwinformers.WithTransform(stripManagedFields))
	gateways := gf.Gateway().V1().Gateways()
	services := kf.Core().V1().Services()
	endpointSlices := kf.Discovery().V1().EndpointSlices()
	namespaces := kf.Core().V1().Namespaces()
	ws := &watches{
		kube: kf, gw: gf,
		world: &world{
			gateways:         gateways.Lister(),
			services:         services.Lister(),
			slices:           endpointSlices.Lister(),
			namespaces:       namespaces.Lister(),
			namespacesSynced: namespaces.Informer().HasSynced,
			routes:           map[protocol.Kind]*routeSource{},
		},
		required: []cache.SharedIndexInformer{gateways.Informer(), services.Informer(), endpointSlices.Informer()},
		optional: []cache.SharedIndexInformer{namespaces.Informer()},
	}
	for proto, version := range served.routes {
		src := newRouteSource(proto, version, gf, d.gw)
		ws.world.routes[proto] = src
		ws.required = append(ws.required, src.informer)
	}
	if served.grants != "" {
		ws.world.grants = newGrantSource(served.grants, gf)
		ws.world.grantsSynced = ws.world.grants.informer.HasSynced
		ws.optional = append(ws.optional, ws.world.grants.informer)
	}
	return ws
}

// notify calls poke on every change of a watched object, except the
// updates that only carry discovery's own annotations.
func (ws *watches) notify(poke func()) error {
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { poke() },
		UpdateFunc: func(oldObj, newObj any) {
			// Our own annotation patches come back as updates; they
			// change nothing we compute from, so they must not start a
			// recompute (nor, through it, another patch).
			if !onlyOwnAnnotationsChanged(oldObj, newObj) {
				poke()
			}
		},
		DeleteFunc: func(any) { poke() },
	}
	// Namespaces and ReferenceGrants change rarely: any change of theirs is
	// a recompute too.
	for _, inf := range append(slices.Clip(ws.required), ws.optional...) {
		if _, err := inf.AddEventHandler(handler); err != nil {
			return fmt.Errorf("discovery: adding event handler: %w", err)
		}
	}
	return nil
}

// start runs the informers until ctx ends.
func (ws *watches) start(ctx context.Context) {
	ws.kube.Start(ctx.Done())
	ws.gw.Start(ctx.Done())
}

// shutdown waits for the informer goroutines, which stop when the context
// given to start ends.
func (ws *watches) shutdown() {
	ws.kube.Shutdown()
	ws.gw.Shutdown()
}

// waitForSync waits until the required caches are filled, and the optional
// ones for at most optionalSyncWait. It returns false when ctx ended first.
func (ws *watches) waitForSync(ctx context.Context) bool {
	synced := make([]cache.InformerSynced, len(ws.required))
	for i, inf := range ws.required {
		synced[i] = inf.HasSynced
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return false
	}
	optctx, cancel := context.WithTimeout(ctx, optionalSyncWait)
	defer cancel()
	for _, inf := range ws.optional {
		cache.WaitForCacheSync(optctx.Done(), inf.HasSynced)
	}
	return ctx.Err() == nil
}

// warnUnreadable says which optional caches did not sync, and what is
// refused until they do.
func (d *Discoverer) warnUnreadable(w *world) {
	if !w.namespacesSynced() {
		d.log.Warn("cannot read Namespaces yet; listeners with allowedRoutes.namespaces.from: Selector accept no routes until the agent can (it needs get, list and watch on namespaces)")
	}
	if w.grants != nil && !w.grantsSynced() {
		d.log.Warn("cannot read ReferenceGrants yet; routes outside a Gateway's namespace cannot use Services of other namespaces until the agent can (it needs get, list and watch on referencegrants)")
	}
}

// startEvents runs the Event writer until ctx ends or the returned stop is
// called; stop waits for it.
func (d *Discoverer) startEvents(ctx context.Context) (stop func()) {
	evctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		d.events.run(evctx)
	}()
	return func() {
		cancel()
		<-done
	}
}

func labelOrOff(s config.DiscoverySource) string {
	if !s.Enabled {
		return "(disabled)"
	}
	return s.GatewayLabel + "=true"
}

// loop recomputes at most once per throttle period while changes arrive.
func (d *Discoverer) loop(ctx context.Context) error {
	d.retry = time.NewTimer(time.Hour)
	d.retry.Stop()
	defer d.retry.Stop()
	d.sync(ctx) // the first sync needs no event
	var wait <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-d.trigger:
			if wait == nil {
				wait = time.After(throttle)
			}
		case <-d.retry.C:
			if wait == nil {
				wait = time.After(throttle)
			}
		case <-wait:
			wait = nil
			d.sync(ctx)
		}
	}
}

// sync recomputes the desired set, publishes it when it changed, reports
// new problems and writes endpoints back.
func (d *Discoverer) sync(ctx context.Context) {
	res, err := compute(d.w, d.opts.Tunnels)
	if err != nil {
		// Listing from the informer caches fails only on a bug; keep the
		// last published set.
		d.log.Error("discovery: recompute failed", "err", err)
		d.countSync(false)
		return
	}
	d.publish(res.services)
	d.report(res.problems)
	ok := d.writeBack(ctx, res) && len(res.problems) == 0
	d.countSync(ok)
}

func (d *Discoverer) countSync(ok bool) {
	if d.opts.Syncs == nil {
		return
	}
	result := "success"
	if !ok {
		result = "error"
	}
	d.opts.Syncs.WithLabelValues(result).Inc()
}

// publish hands the tunnel and dual services to Publish when the set
// changed, and logs each service that appeared, changed or went.
func (d *Discoverer) publish(all []Service) {
	counts := map[protocol.Kind]int{protocol.KindTCP: 0, protocol.KindUDP: 0}
	next := make(map[protocol.ServiceKey]Service, len(all))
	var tunneled []Service
	for _, s := range all {
		counts[s.Protocol]++
		next[s.key()] = s
		if s.Mode != ModeDirect {
			tunneled = append(tunneled, s)
		}
	}
	if d.opts.Discovered != nil {
		for proto, n := range counts {
			d.opts.Discovered.WithLabelValues(proto.String()).Set(float64(n))
		}
	}
	for k, s := range next {
		old, had := d.known[k]
		switch {
		case !had:
			d.log.Info("service discovered", "service", s.ID, "protocol", s.Protocol, "port", s.Port,
				"backend", s.Backend, "mode", s.Mode, "registered", s.Mode != ModeDirect)
		case !sameService(old, s):
			d.log.Info("service changed", "service", s.ID, "protocol", s.Protocol, "port", s.Port,
				"backend", s.Backend, "mode", s.Mode, "registered", s.Mode != ModeDirect, "idle_timeout", s.IdleTimeout)
		}
	}
	for k, s := range d.known {
		if _, ok := next[k]; !ok {
			d.log.Info("service withdrawn", "service", s.ID, "protocol", s.Protocol)
		}
	}
	d.known = next
	if d.published != nil && equalServices(d.published, tunneled) {
		return
	}
	if tunneled == nil {
		tunneled = []Service{} // published, even when empty
	}
	d.published = tunneled
	d.opts.Publish(append([]Service(nil), tunneled...))
}

// sameService reports whether a and b are the same service, allow and
// deny lists included.
func sameService(a, b Service) bool { return reflect.DeepEqual(a, b) }

func equalServices(a, b []Service) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !sameService(a[i], b[i]) {
			return false
		}
	}
	return true
}

// scheduleRetry re-runs the write-back later, with backoff, after an API
// call failed; success resets the backoff.
func (d *Discoverer) scheduleRetry(failed bool) {
	if !failed {
		d.retryWait = 0
		return
	}
	if d.retryWait == 0 {
		d.retryWait = retryInitial
	} else {
		d.retryWait = min(2*d.retryWait, retryMax)
	}
	d.retry.Reset(d.retryWait)
}

// key identifies the service: the same id may exist once per protocol.
func (s *Service) key() protocol.ServiceKey { return protocol.ServiceKey{ID: s.ID, Kind: s.Protocol} }

// key identifies the endpoint's service.
func (e *Endpoint) key() protocol.ServiceKey { return protocol.ServiceKey{ID: e.ID, Kind: e.Protocol} }
