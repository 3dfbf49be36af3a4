package discovery

import (
	"context"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1alpha2 "sigs.k8s.io/gateway-api/apis/v1alpha2"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gwinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"

	"github.com/portway/portway/internal/protocol"
)

// route is a TCPRoute or UDPRoute reduced to what discovery uses, whichever
// version it was read at.
type route struct {
	ref        objectRef
	created    metav1.Time
	annotation string // our AnnotationRouteEndpoint, as cached
	// access holds the route's access annotations that are present
	// (AnnotationProxyProtocol, AnnotationAllowCIDRs, AnnotationDenyCIDRs).
	access     map[string]string
	parentRefs []gwv1.ParentReference
	// backends are the first rule's backendRefs: portway dials one
	// backend per service.
	backends []gwv1.BackendRef
}

// routeSource is the informer, lister and patcher of one route kind at the
// version the cluster serves.
type routeSource struct {
	kind, version string
	informer      cache.SharedIndexInformer
	list          func() ([]route, error)
	patch         func(ctx context.Context, ns, name string, data []byte) error
}

var patchOptions = metav1.PatchOptions{FieldManager: FieldManager}

// newRouteSource returns the source for kind (TCP → TCPRoute, UDP →
// UDPRoute) at version ("v1" or "v1alpha2").
func newRouteSource(kind protocol.Kind, version string, f gwinformers.SharedInformerFactory, c gwclient.Interface) *routeSource {
	switch kind.String() + "/" + version {
	case "tcp/v1":
		inf := f.Gateway().V1().TCPRoutes()
		return &routeSource{
			kind: "TCPRoute", version: version, informer: inf.Informer(),
			list: func() ([]route, error) {
				return listRoutes(inf.Lister().List, "TCPRoute", version, specTCPv1)
			},
			patch: func(ctx context.Context, ns, name string, data []byte) error {
				_, err := c.GatewayV1().TCPRoutes(ns).Patch(ctx, name, types.MergePatchType, data, patchOptions)
				return err
			},
		}
	case "tcp/v1alpha2":
		inf := f.Gateway().V1alpha2().TCPRoutes()
		return &routeSource{
			kind: "TCPRoute", version: version, informer: inf.Informer(),
			list: func() ([]route, error) {
				return listRoutes(inf.Lister().List, "TCPRoute", version, specTCPv1alpha2)
			},
			patch: func(ctx context.Context, ns, name string, data []byte) error {
				_, err := c.GatewayV1alpha2().TCPRoutes(ns).Patch(ctx, name, types.MergePatchType, data, patchOptions)
				return err
			},
		}
	case "udp/v1":
		inf := f.Gateway().V1().UDPRoutes()
		return &routeSource{
			kind: "UDPRoute", version: version, informer: inf.Informer(),
			list: func() ([]route, error) {
				return listRoutes(inf.Lister().List, "UDPRoute", version, specUDPv1)
			},
			patch: func(ctx context.Context, ns, name string, data []byte) error {
				_, err := c.GatewayV1().UDPRoutes(ns).Patch(ctx, name, types.MergePatchType, data, patchOptions)
				return err
			},
		}
	case "udp/v1alpha2":
		inf := f.Gateway().V1alpha2().UDPRoutes()
		return &routeSource{
			kind: "UDPRoute", version: version, informer: inf.Informer(),
			list: func() ([]route, error) {
				return listRoutes(inf.Lister().List, "UDPRoute", version, specUDPv1alpha2)
			},
			patch: func(ctx context.Context, ns, name string, data []byte) error {
				_, err := c.GatewayV1alpha2().UDPRoutes(ns).Patch(ctx, name, types.MergePatchType, data, patchOptions)
				return err
			},
		}
	}
	panic(fmt.Sprintf("discovery: no route source for %s/%s", kind, version)) // probeAPI returns only the versions above
}

// listRoutes lists one route kind from its lister and reduces each object.
func listRoutes[T metav1.Object](list func(labels.Selector) ([]T, error), kind, version string, spec func(T) ([]gwv1.ParentReference, []gwv1.BackendRef)) ([]route, error) {
	objs, err := list(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("listing %ss: %w", kind, err)
	}
	out := make([]route, 0, len(objs))
	for _, o := range objs {
		parents, backends := spec(o)
		out = append(out, route{
			ref:        refOf(kind, gwv1.GroupName+"/"+version, o),
			created:    o.GetCreationTimestamp(),
			annotation: o.GetAnnotations()[AnnotationRouteEndpoint],
			access:     accessAnnotations(o.GetAnnotations()),
			parentRefs: parents,
			backends:   backends,
		})
	}
	return out, nil
}

// The parentRefs and first rule's backendRefs of each route kind and
// version; v1alpha2 rules are v1 rules under another name.
func specTCPv1(o *gwv1.TCPRoute) ([]gwv1.ParentReference, []gwv1.BackendRef) {
	return o.Spec.ParentRefs, firstRule(o.Spec.Rules, func(r gwv1.TCPRouteRule) []gwv1.BackendRef { return r.BackendRefs })
}

func specTCPv1alpha2(o *gwv1alpha2.TCPRoute) ([]gwv1.ParentReference, []gwv1.BackendRef) {
	return o.Spec.ParentRefs, firstRule(o.Spec.Rules, func(r gwv1alpha2.TCPRouteRule) []gwv1.BackendRef { return r.BackendRefs })
}

func specUDPv1(o *gwv1.UDPRoute) ([]gwv1.ParentReference, []gwv1.BackendRef) {
	return o.Spec.ParentRefs, firstRule(o.Spec.Rules, func(r gwv1.UDPRouteRule) []gwv1.BackendRef { return r.BackendRefs })
}

func specUDPv1alpha2(o *gwv1alpha2.UDPRoute) ([]gwv1.ParentReference, []gwv1.BackendRef) {
	return o.Spec.ParentRefs, firstRule(o.Spec.Rules, func(r gwv1alpha2.UDPRouteRule) []gwv1.BackendRef { return r.BackendRefs })
}

func firstRule[R any](rules []R, backends func(R) []gwv1.BackendRef) []gwv1.BackendRef {
	if len(rules) == 0 {
		return nil
	}
	return backends(rules[0])
}

// objectRef names a Kubernetes object for reports, Events and patches.
type objectRef struct {
	kind, apiVersion string
	namespace, name  string
	uid              types.UID
	resourceVersion  string
}

func refOf(kind, apiVersion string, o metav1.Object) objectRef {
	return objectRef{kind: kind, apiVersion: apiVersion, namespace: o.GetNamespace(), name: o.GetName(),
		uid: o.GetUID(), resourceVersion: o.GetResourceVersion()}
}

// key identifies the object regardless of its version.
func (r objectRef) key() objectKey { return objectKey{r.kind, r.namespace, r.name} }

// String formats the reference as "Kind namespace/name".
func (r objectRef) String() string { return r.kind + " " + r.namespace + "/" + r.name }

type objectKey struct{ kind, namespace, name string }
