package k8stest

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// Decode reads the objects of a stream of YAML (or JSON) documents, as
// `kubectl apply -f` or `helm template` sees them, with every number an
// int64 (see Normalize). Empty documents are skipped; a stream without
// objects, or one that does not decode, fails the test. what names the
// stream in failures.
func Decode(t testing.TB, what, stream string) []*unstructured.Unstructured {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(stream), 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: decoding the manifests: %v", what, err)
		}
		if len(m) > 0 {
			objs = append(objs, &unstructured.Unstructured{Object: Normalize(m).(map[string]any)})
		}
	}
	if len(objs) == 0 {
		t.Fatalf("%s: no objects", what)
	}
	return objs
}

// Kustomization reads the objects of the kustomize folder dir: the files
// its kustomization.yaml lists under resources, in that order. A YAML file
// in dir that the list leaves out is reported (t.Errorf): kubectl apply -k
// would not deploy it.
func Kustomization(t testing.TB, dir string) []*unstructured.Unstructured {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		Resources []string `json:"resources"`
	}
	if err := yaml.Unmarshal(b, &k); err != nil {
		t.Fatalf("%s: kustomization.yaml: %v", dir, err)
	}
	if len(k.Resources) == 0 {
		t.Fatalf("%s: kustomization.yaml lists no resources", dir)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
	for _, f := range files {
		if base := filepath.Base(f); base != "kustomization.yaml" && !slices.Contains(k.Resources, base) {
			t.Errorf("%s is not listed in kustomization.yaml", f)
		}
	}
	var all strings.Builder
	for _, r := range k.Resources {
		b, err := os.ReadFile(filepath.Join(dir, r))
		if err != nil {
			t.Fatal(err)
		}
		all.WriteString("\n---\n")
		all.Write(b)
	}
	return Decode(t, dir, all.String())
}

// Normalize makes decoded YAML comparable, and what the unstructured
// helpers expect: every number an int64, in maps and lists at any depth.
func Normalize(v any) any {
	switch v := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, e := range v {
			out[k] = Normalize(e)
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = Normalize(e)
		}
		return out
	case float64:
		return int64(v)
	case int:
		return int64(v)
	}
	return v
}
