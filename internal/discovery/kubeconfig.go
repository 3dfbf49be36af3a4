package discovery

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// RESTConfig finds the Kubernetes API, in this order: the kubeconfig file
// named by kubernetes.kubeconfig (kubeconfig), the files listed in the
// KUBECONFIG variable (read through getenv), the in-cluster service account.
// source says which one was used, for the log.
func RESTConfig(kubeconfig string, getenv func(string) string) (cfg *rest.Config, source string, err error) {
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, "", fmt.Errorf("kubernetes.kubeconfig %s: %w", kubeconfig, err)
		}
		return cfg, "kubernetes.kubeconfig " + kubeconfig, nil
	}
	if v := getenv("KUBECONFIG"); v != "" {
		rules := &clientcmd.ClientConfigLoadingRules{Precedence: filepath.SplitList(v)}
		cfg, err = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
		if err != nil {
			return nil, "", fmt.Errorf("KUBECONFIG=%s: %w", v, err)
		}
		return cfg, "KUBECONFIG " + v, nil
	}
	cfg, err = rest.InClusterConfig()
	if errors.Is(err, rest.ErrNotInCluster) {
		return nil, "", errors.New("kubernetes.enabled: not running in a cluster and no kubeconfig: set kubernetes.kubeconfig or KUBECONFIG")
	}
	if err != nil {
		return nil, "", fmt.Errorf("in-cluster Kubernetes config: %w", err)
	}
	return cfg, "in-cluster service account", nil
}

// serviceAccountNamespace is where a pod's service account token mount
// names the pod's namespace.
const serviceAccountNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// AgentNamespace returns the namespace the agent runs in: the POD_NAMESPACE
// variable (set from the downward API by deploy/agent), else the service
// account's namespace file. It is the default of
// tunnels.discovery.gateway_namespaces; outside a cluster neither exists and
// it returns an error saying what to set.
func AgentNamespace(getenv func(string) string) (ns, source string, err error) {
	return agentNamespace(getenv, serviceAccountNamespace)
}

func agentNamespace(getenv func(string) string, saFile string) (string, string, error) {
	if v := strings.TrimSpace(getenv("POD_NAMESPACE")); v != "" {
		return v, "POD_NAMESPACE", nil
	}
	b, err := os.ReadFile(saFile)
	if err == nil && strings.TrimSpace(string(b)) != "" {
		return strings.TrimSpace(string(b)), saFile, nil
	}
	if err == nil || errors.Is(err, fs.ErrNotExist) {
		return "", "", errors.New("tunnels.discovery.gateway_namespaces: the agent's own namespace, its default, is unknown (no POD_NAMESPACE and no service account namespace file): set POD_NAMESPACE or list the namespaces")
	}
	return "", "", fmt.Errorf("tunnels.discovery.gateway_namespaces: reading the agent's namespace from %s: %w", saFile, err)
}
