package discovery

import (
	"errors"
	"fmt"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
	gwinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"
)

// grantSource lists the ReferenceGrants of a namespace, at the version the
// cluster serves (v1, or v1beta1 before Gateway API v1.5; the spec is the
// same type at both).
type grantSource struct {
	informer cache.SharedIndexInformer
	list     func(namespace string) ([]gwv1.ReferenceGrantSpec, error)
}

// newGrantSource returns the source for version ("v1" or "v1beta1").
func newGrantSource(version string, f gwinformers.SharedInformerFactory) *grantSource {
	switch version {
	case "v1":
		inf := f.Gateway().V1().ReferenceGrants()
		return &grantSource{informer: inf.Informer(), list: func(ns string) ([]gwv1.ReferenceGrantSpec, error) {
			return grantSpecs(inf.Lister().ReferenceGrants(ns).List, func(g *gwv1.ReferenceGrant) gwv1.ReferenceGrantSpec { return g.Spec })
		}}
	case "v1beta1":
		inf := f.Gateway().V1beta1().ReferenceGrants()
		return &grantSource{informer: inf.Informer(), list: func(ns string) ([]gwv1.ReferenceGrantSpec, error) {
			return grantSpecs(inf.Lister().ReferenceGrants(ns).List, func(g *gwv1beta1.ReferenceGrant) gwv1.ReferenceGrantSpec { return g.Spec })
		}}
	}
	panic(fmt.Sprintf("discovery: no ReferenceGrant source for %s", version)) // probeAPI returns only the versions above
}

// grantSpecs lists ReferenceGrants of one version and keeps their specs.
func grantSpecs[T any](list func(labels.Selector) ([]T, error), spec func(T) gwv1.ReferenceGrantSpec) ([]gwv1.ReferenceGrantSpec, error) {
	gs, err := list(labels.Everything())
	if err != nil {
		return nil, err
	}
	specs := make([]gwv1.ReferenceGrantSpec, len(gs))
	for i, g := range gs {
		specs[i] = spec(g)
	}
	return specs, nil
}

// errGrantsUnreadable is referenceAllowed's answer while ReferenceGrants
// cannot be read (not yet synced, or the agent's RBAC lacks them).
var errGrantsUnreadable = errors.New("ReferenceGrants are not readable yet (the agent needs get, list and watch on referencegrants)")

// grantVersions are the versions tried for ReferenceGrant, newest first.
var grantVersions = []string{"v1", "v1beta1"}

// referenceAllowed reports whether a ReferenceGrant in the Service's
// namespace lets routes of kind in fromNS use the Service named name. With
// no grant source (ReferenceGrant not served) nothing is granted.
func (w *world) referenceAllowed(kind, fromNS, toNS, name string) (bool, error) {
	if w.grants == nil {
		return false, nil
	}
	if w.grantsSynced != nil && !w.grantsSynced() {
		return false, errGrantsUnreadable
	}
	specs, err := w.grants.list(toNS)
	if err != nil {
		return false, fmt.Errorf("listing ReferenceGrants in %s: %w", toNS, err)
	}
	for _, s := range specs {
		from := false
		for _, f := range s.From {
			if string(f.Group) == gwv1.GroupName && string(f.Kind) == kind && string(f.Namespace) == fromNS {
				from = true
				break
			}
		}
		if !from {
			continue
		}
		for _, t := range s.To {
			if string(t.Group) == "" && string(t.Kind) == "Service" && (t.Name == nil || string(*t.Name) == name) {
				return true, nil
			}
		}
	}
	return false, nil
}
