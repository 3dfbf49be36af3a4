#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, checks
# formatting, vet and staticcheck, builds a stamped release binary, verifies
# the systemd units, builds and checks the container image, runs the whole
# suite with the race detector against real servers, and runs every fuzz
# target briefly.
#
# Environment:
#   FUZZTIME   per fuzz target (default 3s; 0 skips fuzzing)
#   PORTWAY_K8S_CACHE  where scripts/k8s-test-env.sh keeps kube-apiserver and
#              etcd (default ~/.cache/portway/k8s)
#   CI         set by default here: a test whose real server is missing
#              fails instead of skipping
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null 2>&1 || export PATH="$PATH:/usr/local/go/bin"
export CI="${CI:-1}"
FUZZTIME="${FUZZTIME:-3s}"

step() { printf '\n==> %s\n' "$*" >&2; }

# The Kubernetes tests need kube-apiserver and etcd, which a fresh machine
# builds from source (~3.5 min, cached after): start that first, alongside
# the steps below, and wait for it just before the tests.
k8s_env_out=$(mktemp)
k8s_env_log=$(mktemp)
scripts/k8s-test-env.sh >"$k8s_env_out" 2>"$k8s_env_log" &
k8s_env_pid=$!
# The chart tests (internal/deploytest) run helm built from its Go module
# (scripts/helm.sh: about a minute the first time, cached after): build it
# alongside too.
helm_log=$(mktemp)
scripts/helm.sh version >"$helm_log" 2>&1 &
helm_pid=$!
rel_dir=$(mktemp -d)
trap 'kill "$k8s_env_pid" "$helm_pid" 2>/dev/null || true; rm -rf "$k8s_env_out" "$k8s_env_log" "$helm_log" "$rel_dir"' EXIT

step "installing test dependencies"
scripts/install-test-deps.sh

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change:" >&2
  echo "$unformatted" >&2
  exit 1
fi

step "go vet"
go vet ./...
# The lean build for gateway hosts (docs/benchmarks.md): it must keep
# compiling, and refuse kubernetes.enabled clearly.
go vet -tags nokubernetes ./cmd/... ./internal/cli/...
go test -tags nokubernetes -count=1 -run TestNoKubernetesBuild ./internal/cli

step "other platforms: 32-bit builds, the protocol and tunnel tests on 386"
# Agents run on armv7 and 386 boards, where int has 32 bits: wire values
# must not wrap there. 386 binaries run on amd64 Linux (no race detector).
# The cross builds leave out the Kubernetes libraries (-tags nokubernetes):
# compiling them again per platform would cost minutes, and all of
# portway's own code but discovery is in that build.
for target in linux/386 linux/arm windows/amd64; do
  GOOS=${target%/*} GOARCH=${target#*/} GOARM=7 go build -tags nokubernetes -o /dev/null ./cmd/portway
done
GOARCH=386 go test -count=1 ./internal/protocol ./internal/tunnel ./internal/relay

step "staticcheck"
go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

step "release build, systemd units, container image"
# One stamped release binary (the lean build for gateway hosts): its
# version output names what was stamped and the build tags.
rel_commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
VERSION=v0.0.0-test COMMIT="$rel_commit" TAGS=nokubernetes DIST="$rel_dir" scripts/release.sh "$(go env GOOS)/$(go env GOARCH)"
rel_bin="$rel_dir/portway_v0.0.0-test_$(go env GOOS)_$(go env GOARCH)"
(cd "$rel_dir" && sha256sum -c --quiet portway_v0.0.0-test_SHA256SUMS)
rel_out=$("$rel_bin" --version)
for want in "portway v0.0.0-test" "commit: *$rel_commit" "go: *go[0-9]" "build tags: *nokubernetes"; do
  grep -q "^$want" <<<"$rel_out" || { echo "release binary --version lacks \"$want\":" >&2; echo "$rel_out" >&2; exit 1; }
done
# Nothing may call methods by name through reflection (text/template's
# execution does): the linker then keeps every method of every type, and
# the binary grows by two thirds and its RSS by 10 MiB.
# The binary is stripped (no symbol table for go tool nm), but the names
# of its functions stay in the table tracebacks read.
if grep -a -q 'text/template.(\*state).evalField' "$rel_bin"; then
  echo "the release binary links text/template's execution (reflective method calls): find the caller with go build -ldflags=-dumpdep" >&2
  exit 1
fi
scripts/units.sh "$rel_bin"
# The image, packaged from the release binary above for this machine's
# platform: a release runs scripts/image.sh as it is, building full
# binaries for linux/amd64 and linux/arm64; here that would compile every
# package twice more, Kubernetes libraries included, to check the same
# packaging.
VERSION=v0.0.0-test COMMIT="$rel_commit" DIST_IN="$rel_dir" PLATFORMS="linux/$(go env GOARCH)" scripts/image.sh

step "kube-apiserver and etcd for the Kubernetes tests (scripts/k8s-test-env.sh)"
k8s_env_rc=0
wait "$k8s_env_pid" || k8s_env_rc=$?
cat "$k8s_env_log" >&2
if [ "$k8s_env_rc" != 0 ]; then
  echo "scripts/k8s-test-env.sh failed (exit $k8s_env_rc): the Kubernetes tests cannot run" >&2
  exit 1
fi
KUBEBUILDER_ASSETS=$(cat "$k8s_env_out")
export KUBEBUILDER_ASSETS
echo "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS" >&2

step "helm lint (scripts/helm.sh); internal/deploytest renders and dry-runs the charts"
helm_rc=0
wait "$helm_pid" || helm_rc=$?
if [ "$helm_rc" != 0 ]; then
  cat "$helm_log" >&2
  echo "scripts/helm.sh could not build helm (exit $helm_rc): the chart tests cannot run" >&2
  exit 1
fi
scripts/helm.sh lint --strict deploy/helm/portway-gateway deploy/helm/portway-agent

step "tests (race detector on)"
go test -race -count=1 -timeout 12m ./...

if [ "$FUZZTIME" != "0" ]; then
  step "fuzzing each target for $FUZZTIME"
  # Every decoder has a fuzz target; list them from the source so a new one
  # is never forgotten.
  grep -rl --include='*_test.go' '^func Fuzz' internal | while read -r file; do
    pkg="./$(dirname "$file")"
    for target in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$file" | cut -d' ' -f2); do
      echo "fuzz $pkg $target" >&2
      # Quiet on success; on failure the output names the failing input
      # (testdata/fuzz/...) and the panic or error.
      if ! out=$(go test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" "$pkg" 2>&1); then
        # Go 1.26's fuzz coordinator can fail a run at the -fuzztime
        # deadline with a bare "context deadline exceeded" and no failing
        # input (go.dev/issue/75804, fixed in Go 1.27): not a finding.
        if ! grep -q "Failing input written to" <<<"$out" && grep -q "^    context deadline exceeded$" <<<"$out"; then
          echo "fuzz $target: the coordinator's deadline race (go.dev/issue/75804), no failing input; not a failure" >&2
          continue
        fi
        echo "$out" >&2
        echo "fuzz target $target in $pkg failed" >&2
        exit 1
      fi
    done
  done
fi
step "all tests passed"
