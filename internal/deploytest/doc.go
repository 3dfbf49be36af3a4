// Package deploytest checks the deployment files under deploy/: the Helm
// charts deploy/helm/portway-gateway and deploy/helm/portway-agent are
// linted and rendered with the pinned helm (scripts/helm.sh), their
// configuration files are parsed by internal/config as `portway gateway`
// and `portway agent` would parse them, every rendered object passes a
// server-side dry run against a real kube-apiserver, and the agent chart is
// held equal to the kustomize base deploy/agent where both say the same
// thing (RBAC, agent.yaml, the pod's security and probes).
//
// The package holds tests only.
package deploytest
