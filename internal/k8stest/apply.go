package k8stest

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// applyTimeout is a hang guard for one apply, not a performance bound.
const applyTimeout = 30 * time.Second

// Applier sends objects of any kind to the apiserver with server-side
// apply, as `kubectl apply --server-side` would. Its kind-to-resource
// mapping is read from the apiserver on first use: make a new Applier after
// installing CRDs whose kinds it has not seen yet.
type Applier struct {
	mapper *restmapper.DeferredDiscoveryRESTMapper
	dyn    *dynamic.DynamicClient
}

// NewApplier returns an Applier for the apiserver cfg points at.
func NewApplier(t testing.TB, cfg *rest.Config) *Applier {
	t.Helper()
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatalf("k8stest: %v", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatalf("k8stest: %v", err)
	}
	return &Applier{mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(kc.Discovery())), dyn: dyn}
}

// Apply applies o, only validating it (dryRun=All) when dryRun is set. A
// failure is reported with t.Errorf, naming the object and showing it, so
// that one call checks one object and the test goes on to the next.
func (a *Applier) Apply(t testing.TB, o *unstructured.Unstructured, dryRun bool) {
	t.Helper()
	gvk := o.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		t.Errorf("%s %s: %v", gvk, o.GetName(), err)
		return
	}
	var ri dynamic.ResourceInterface = a.dyn.Resource(m.Resource)
	if o.GetNamespace() != "" {
		ri = a.dyn.Resource(m.Resource).Namespace(o.GetNamespace())
	}
	opts := metav1.ApplyOptions{FieldManager: "portway-test", Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	ctx, cancel := context.WithTimeout(context.Background(), applyTimeout)
	defer cancel()
	if _, err := ri.Apply(ctx, o.GetName(), o, opts); err != nil {
		js, _ := json.MarshalIndent(o.Object, "", "  ")
		t.Errorf("applying %s %s/%s (dry run %v): %v\n%s", gvk.Kind, o.GetNamespace(), o.GetName(), dryRun, err, js)
	}
}
