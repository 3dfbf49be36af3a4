#!/usr/bin/env bash
# Runs helm, pinned, built from its Go module (no binary download): the
# first run builds it (about a minute), later runs reuse Go's build cache.
# The chart tests (internal/deploytest) and scripts/test.sh call it; so can
# you: scripts/helm.sh template deploy/helm/portway-gateway.
set -euo pipefail
command -v go >/dev/null 2>&1 || export PATH="$PATH:/usr/local/go/bin"
# With a version, go run ignores the repository's go.mod: helm builds with
# its own dependency versions, not portway's.
#
# --path prints where the built helm is (in Go's build cache) instead, for
# callers that run it many times.
if [ "${1:-}" = "--path" ]; then
  exec go run -exec echo helm.sh/helm/v3/cmd/helm@v3.22.0
fi
exec go run helm.sh/helm/v3/cmd/helm@v3.22.0 "$@"
