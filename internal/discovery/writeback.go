package discovery

import (
	"context"
	"encoding/json"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	eventsclient "k8s.io/client-go/kubernetes/typed/events/v1"

	"github.com/portway/portway/internal/protocol"
)

// EndpointEntry is one endpoint of a listener in the
// pipeops.io/tunnel-endpoints annotation.
type EndpointEntry struct {
	// Mode is "tunnel" (through the portway gateway) or "direct" (the
	// Gateway's own public address).
	Mode     Mode          `json:"mode"`
	Protocol protocol.Kind `json:"protocol"`
	// Endpoint is host:port for clients; empty when Error is set.
	Endpoint string `json:"endpoint,omitempty"`
	// Error says why there is no endpoint (the gateway refused the
	// service, or no public address is known).
	Error string `json:"error,omitempty"`
}

// pending is an annotation patch that succeeded but that the informer cache
// may not show yet: the same patch is not sent again meanwhile.
type pending struct {
	uid    types.UID
	fromRV string // the resource version the patch was computed from
	value  string
}

// writeBack brings the endpoint annotations of every cached Gateway and
// route in line with res and the last endpoints, patching only what
// differs. It returns false when an API call failed (a retry is scheduled).
func (d *Discoverer) writeBack(ctx context.Context, res result) bool {
	d.mu.Lock()
	eps := d.endpoints // replaced wholesale by SetEndpoints, never mutated
	d.mu.Unlock()

	gwWant, routeWant := desiredAnnotations(res.listeners, eps)
	d.logEndpoints(gwWant)

	failed := false
	seen := map[objectKey]bool{}
	for _, o := range res.gateways {
		seen[o.ref.key()] = true
		want := ""
		if m := gwWant[o.ref.key()]; len(m) > 0 {
			b, _ := json.Marshal(m) // map keys are sorted: stable text
			want = string(b)
		}
		failed = d.patchIfNeeded(ctx, o, AnnotationEndpoints, want) || failed
	}
	for _, o := range res.routes {
		seen[o.ref.key()] = true
		failed = d.patchIfNeeded(ctx, o, AnnotationRouteEndpoint, strings.Join(routeWant[o.ref.key()], ",")) || failed
	}
	for k := range d.written {
		if !seen[k] {
			delete(d.written, k)
		}
	}
	d.scheduleRetry(failed)
	return !failed
}

// desiredAnnotations computes the Gateway annotations (listener → entries)
// and the route annotations (endpoints, tunnel first) from the exposed
// listeners and the gateway's answers. A tunnel endpoint appears once the
// gateway has answered for the service.
func desiredAnnotations(ls []listenerResult, eps map[protocol.ServiceKey]Endpoint) (map[objectKey]map[string][]EndpointEntry, map[objectKey][]string) {
	gw := map[objectKey]map[string][]EndpointEntry{}
	routes := map[objectKey][]string{}
	addRoute := func(k objectKey, ep string) {
		if !slices.Contains(routes[k], ep) {
			routes[k] = append(routes[k], ep)
		}
	}
	for _, lr := range ls {
		s := lr.service
		var entries []EndpointEntry
		if s.Mode != ModeDirect {
			if e, ok := eps[s.key()]; ok {
				entries = append(entries, EndpointEntry{Mode: ModeTunnel, Protocol: s.Protocol, Endpoint: e.Address, Error: e.Error})
				if e.Error == "" && e.Address != "" {
					addRoute(lr.route.key(), e.Address)
				}
			}
		}
		if s.Mode != ModeTunnel {
			entries = append(entries, EndpointEntry{Mode: ModeDirect, Protocol: s.Protocol, Endpoint: lr.direct, Error: lr.directErr})
			if lr.direct != "" {
				addRoute(lr.route.key(), lr.direct)
			}
		}
		if len(entries) == 0 {
			continue
		}
		if gw[lr.gateway.key()] == nil {
			gw[lr.gateway.key()] = map[string][]EndpointEntry{}
		}
		gw[lr.gateway.key()][lr.listener] = entries
	}
	return gw, routes
}

// logEndpoints logs each listener endpoint that appeared or changed, once.
func (d *Discoverer) logEndpoints(gw map[objectKey]map[string][]EndpointEntry) {
	next := map[string]string{}
	for gk, listeners := range gw {
		for l, entries := range listeners {
			k := gk.namespace + "/" + gk.name + "/" + l
			b, _ := json.Marshal(entries)
			next[k] = string(b)
			if d.loggedEP[k] == string(b) {
				continue
			}
			for _, e := range entries {
				if e.Error != "" {
					d.log.Warn("no endpoint", "gateway", gk.namespace+"/"+gk.name, "listener", l, "protocol", e.Protocol, "mode", e.Mode, "reason", e.Error)
				} else {
					d.log.Info("endpoint", "gateway", gk.namespace+"/"+gk.name, "listener", l, "protocol", e.Protocol, "mode", e.Mode, "endpoint", e.Endpoint)
				}
			}
		}
	}
	d.loggedEP = next
}

// patchIfNeeded sets (or, with want "", removes) annotation key on o by a
// JSON merge patch of metadata.annotations alone, when the cached value
// differs. It returns true when the API call failed.
func (d *Discoverer) patchIfNeeded(ctx context.Context, o cachedObject, key, want string) bool {
	k := o.ref.key()
	if o.annotation == want {
		delete(d.written, k)
		return false
	}
	if p, ok := d.written[k]; ok && p.uid == o.ref.uid && p.fromRV == o.ref.resourceVersion && p.value == want {
		return false // patched already; the cache has not caught up
	}
	var v any // nil removes the key
	if want != "" {
		v = want
	}
	// The uid makes the patch fail rather than annotate an object that was
	// deleted and created again under the same name meanwhile.
	body, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"uid":         o.ref.uid,
		"annotations": map[string]any{key: v},
	}})
	if err != nil {
		d.log.Error("encoding annotation patch", "err", err)
		return true
	}
	pctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	if o.source == nil {
		_, err = d.gw.GatewayV1().Gateways(o.ref.namespace).Patch(pctx, o.ref.name, types.MergePatchType, body, patchOptions)
	} else {
		err = o.source.patch(pctx, o.ref.namespace, o.ref.name, body)
	}
	switch {
	case err == nil:
		d.written[k] = pending{uid: o.ref.uid, fromRV: o.ref.resourceVersion, value: want}
		if want == "" {
			d.log.Debug("annotation removed", "object", o.ref.String(), "annotation", key)
		} else {
			d.log.Debug("annotation written", "object", o.ref.String(), "annotation", key, "value", want)
		}
		return false
	case apierrors.IsNotFound(err), apierrors.IsConflict(err):
		// Deleted or replaced meanwhile: its informer event brings the
		// next recompute.
		return false
	case ctx.Err() != nil:
		return false
	}
	d.log.Warn("writing annotation failed; will retry", "object", o.ref.String(), "annotation", key, "err", err)
	return true
}

// report logs and records as Events the problems that are new or changed
// since the last recompute, and logs those that went away.
func (d *Discoverer) report(ps []problem) {
	next := make(map[string]problem, len(ps))
	for _, p := range ps {
		k := p.key()
		next[k] = p
		if old, ok := d.problems[k]; ok && old.message == p.message {
			continue
		}
		d.log.Warn(p.message, "reason", p.reason, "object", p.obj.String())
		d.events.record(p)
	}
	for k, p := range d.problems {
		if _, ok := next[k]; !ok {
			d.log.Info("resolved", "reason", p.reason, "object", p.obj.String())
		}
	}
	d.problems = next
}

// eventWriter records problems as events.k8s.io/v1 Events on their objects,
// from its own goroutine so that a slow API server never holds up the
// recompute loop. The queue is bounded; what does not fit is still in the
// log.
type eventWriter struct {
	client   eventsclient.EventsV1Interface
	instance string
	log      *slog.Logger
	queue    chan problem
	lastErr  string // the API's reason for the last failure logged
}

func newEventWriter(c eventsclient.EventsV1Interface, instance string, log *slog.Logger) *eventWriter {
	return &eventWriter{client: c, instance: instance, log: log, queue: make(chan problem, 128)}
}

func (e *eventWriter) record(p problem) {
	select {
	case e.queue <- p:
	default:
		e.log.Debug("Event not recorded: queue full", "reason", p.reason, "object", p.obj.String())
	}
}

func (e *eventWriter) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case p := <-e.queue:
			e.write(ctx, p)
		}
	}
}

// maxNote is the API's limit on an Event's note.
const maxNote = 1024

func (e *eventWriter) write(ctx context.Context, p problem) {
	note := p.message
	if len(note) > maxNote {
		note = note[:maxNote]
	}
	// Named as client-go's recorders name theirs: object, dot, time.
	name := p.obj.name
	if len(name) > 200 {
		name = name[:200]
	}
	now := time.Now()
	ev := &eventsv1.Event{
		ObjectMeta:          metav1.ObjectMeta{Name: name + "." + strconv.FormatInt(now.UnixNano(), 16), Namespace: p.obj.namespace},
		EventTime:           metav1.NewMicroTime(now),
		ReportingController: FieldManager,
		ReportingInstance:   e.instance,
		Action:              "Discover",
		Reason:              p.reason,
		Type:                corev1.EventTypeWarning,
		Note:                note,
		Regarding: corev1.ObjectReference{
			Kind: p.obj.kind, APIVersion: p.obj.apiVersion, Namespace: p.obj.namespace, Name: p.obj.name,
			UID: p.obj.uid, ResourceVersion: p.obj.resourceVersion,
		},
	}
	cctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	_, err := e.client.Events(p.obj.namespace).Create(cctx, ev, metav1.CreateOptions{})
	if err != nil && ctx.Err() == nil {
		// One line per kind of failure: a missing RBAC rule would
		// otherwise log once per problem.
		if kind := string(apierrors.ReasonForError(err)); kind != e.lastErr {
			e.log.Warn("recording Event failed", "reason", p.reason, "object", p.obj.String(), "err", err)
			e.lastErr = kind
		}
	}
}
