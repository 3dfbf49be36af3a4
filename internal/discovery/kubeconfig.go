package discovery

import (
	"errors"
	"fmt"
	"path/filepath"

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
