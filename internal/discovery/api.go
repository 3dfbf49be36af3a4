package discovery

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/portway/portway/internal/protocol"
)

// apis are the Gateway API versions the cluster serves, as discovery uses
// them.
type apis struct {
	// routes maps a protocol to the route version to watch ("v1" or
	// "v1alpha2"), for each protocol whose discovery is enabled.
	routes map[protocol.Kind]string
	// grants is the ReferenceGrant version to watch ("v1" or "v1beta1"),
	// "" when the cluster serves none: then no grant exists.
	grants string
}

// routeVersions are the versions tried for TCPRoute and UDPRoute, newest
// first: Gateway API v1.6 serves v1 and deprecates v1alpha2, older releases
// serve only v1alpha2 (the version the PipeOps examples use).
var routeVersions = []string{"v1", "v1alpha2"}

// waitForAPI returns once the Gateway API resources discovery needs are
// served, retrying with backoff until ctx ends. An agent may well start
// before the CRDs are installed; it then says so once and recovers without
// a restart.
func (d *Discoverer) waitForAPI(ctx context.Context) (apis, error) {
	wait := retryInitial
	var lastMsg string
	waited := false
	for {
		found, missing, err := d.probeAPI(ctx)
		switch {
		case err != nil:
			if msg := err.Error(); msg != lastMsg {
				d.log.Warn("Kubernetes API not reachable; retrying", "err", err)
				lastMsg = msg
			}
		case len(missing) > 0:
			msg := "Gateway API CRDs not installed yet (" + strings.Join(missing, ", ") + "); waiting"
			if msg != lastMsg {
				d.log.Warn(msg)
				lastMsg = msg
			}
		default:
			if waited {
				d.log.Info("Gateway API CRDs found; starting discovery")
			}
			return found, nil
		}
		waited = true
		d.log.Debug("Gateway API check failed; retrying", "retry_in", wait)
		// Jitter, so that many agents started together do not probe in
		// lockstep.
		delay := wait/2 + rand.N(wait/2+1)
		select {
		case <-ctx.Done():
			return apis{}, ctx.Err()
		case <-time.After(delay):
		}
		wait = min(2*wait, crdRetryMax)
	}
}

// probeAPI asks the discovery API which of the needed resources are served.
// missing names each absent CRD by its full name.
func (d *Discoverer) probeAPI(ctx context.Context) (found apis, missing []string, err error) {
	served := map[string][]string{} // version → resources
	for _, v := range []string{"v1", "v1beta1", "v1alpha2"} {
		rl, err := d.kube.Discovery().ServerResourcesForGroupVersion(gwv1.GroupName + "/" + v)
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return apis{}, nil, fmt.Errorf("discovering %s/%s: %w", gwv1.GroupName, v, err)
		}
		for _, r := range rl.APIResources {
			served[v] = append(served[v], r.Name)
		}
	}
	if ctx.Err() != nil {
		return apis{}, nil, ctx.Err()
	}
	found = apis{routes: map[protocol.Kind]string{}}
	if !slices.Contains(served["v1"], "gateways") {
		missing = append(missing, "gateways."+gwv1.GroupName)
	}
	for _, p := range []struct {
		proto    protocol.Kind
		resource string
		on       bool
	}{
		{protocol.KindTCP, "tcproutes", d.opts.Tunnels.Discovery.TCP.Enabled},
		{protocol.KindUDP, "udproutes", d.opts.Tunnels.Discovery.UDP.Enabled},
	} {
		if !p.on {
			continue
		}
		for _, v := range routeVersions {
			if slices.Contains(served[v], p.resource) {
				found.routes[p.proto] = v
				break
			}
		}
		if found.routes[p.proto] == "" {
			missing = append(missing, p.resource+"."+gwv1.GroupName)
		}
	}
	for _, v := range grantVersions {
		if slices.Contains(served[v], "referencegrants") {
			found.grants = v
			break
		}
	}
	return found, missing, nil
}

// stripManagedFields drops managedFields from cached objects: discovery
// never reads them, and they are a large part of each object.
func stripManagedFields(obj any) (any, error) {
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
	}
	return obj, nil
}

// onlyOwnAnnotationsChanged reports whether an update changed nothing but
// the resource version and the annotations discovery writes itself.
func onlyOwnAnnotationsChanged(oldObj, newObj any) bool {
	o, ok1 := oldObj.(runtime.Object)
	n, ok2 := newObj.(runtime.Object)
	if !ok1 || !ok2 {
		return false
	}
	oc, nc := o.DeepCopyObject(), n.DeepCopyObject()
	for _, c := range []runtime.Object{oc, nc} {
		m, ok := c.(metav1.Object)
		if !ok {
			return false
		}
		m.SetResourceVersion("")
		m.SetManagedFields(nil)
		if a := m.GetAnnotations(); a != nil {
			delete(a, AnnotationEndpoints)
			delete(a, AnnotationRouteEndpoint)
			if len(a) == 0 {
				m.SetAnnotations(nil)
			}
		}
	}
	return equality.Semantic.DeepEqual(oc, nc)
}

// warningLogger logs each distinct API warning (such as "v1alpha2 TCPRoute
// is deprecated") once, instead of client-go's line per request.
type warningLogger struct {
	log  *slog.Logger
	mu   sync.Mutex
	seen map[string]bool
}

func newWarningLogger(log *slog.Logger) rest.WarningHandlerWithContext {
	return &warningLogger{log: log, seen: map[string]bool{}}
}

// HandleWarningHeaderWithContext implements rest.WarningHandlerWithContext.
func (w *warningLogger) HandleWarningHeaderWithContext(_ context.Context, code int, _ string, text string) {
	if code != 299 || text == "" {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.seen[text] || len(w.seen) > 100 {
		return
	}
	w.seen[text] = true
	w.log.Warn("Kubernetes API warning", "warning", text)
}
