//go:build nokubernetes

package cli

import (
	"context"
	"errors"

	"github.com/portway/portway/internal/agent"
)

// runWithDiscovery is not available in a build without the Kubernetes
// client libraries (go build -tags nokubernetes), which is smaller for
// gateway hosts and agents outside Kubernetes.
func runWithDiscovery(context.Context, agent.Options, func(string) string, func(*agent.Agent)) error {
	return errors.New("kubernetes.enabled: this portway binary was built without Kubernetes support (-tags nokubernetes)")
}
