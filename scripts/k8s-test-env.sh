#!/usr/bin/env bash
# k8s-test-env.sh - provide real kube-apiserver and etcd binaries for
# integration tests (envtest style).
#
# Usage:   scripts/k8s-test-env.sh            (from any directory)
# Example: export KUBEBUILDER_ASSETS="$(scripts/k8s-test-env.sh)"
#
# On success the ONLY line written to stdout is the absolute path of a folder
# that holds executables named exactly `kube-apiserver` and `etcd` (the layout
# envtest expects in KUBEBUILDER_ASSETS). Every progress/log line goes to
# stderr. On failure a message is printed on stderr and the exit code is
# non-zero.
#
# The envtest download bucket is not reachable from our machines; only the Go
# module proxy and Debian apt are. So both binaries are built from source
# through the Go module proxy, in throwaway modules that live in a temp folder
# under the cache (never in this repository):
#   * kube-apiserver from k8s.io/kubernetes. Its go.mod replaces every
#     k8s.io/<staging> module with ./staging/src/k8s.io/<staging>, which is
#     why a plain `go install ...@version` fails. The throwaway module copies
#     Kubernetes' requirements and replaces each staging module with its
#     published twin k8s.io/<staging> v0.<minor>.<patch>.
#   * etcd from go.etcd.io/etcd/server/v3 (its root package is the etcd main).
#
# The first run costs roughly 150 MB of module downloads, 3-8 minutes of build
# on 2 cores (3.5 measured from empty Go caches) and ~2 GB of peak memory.
# Later runs are instant: the result is cached under
# ${PORTWAY_K8S_CACHE:-$HOME/.cache/portway/k8s}/<versions>/ and marked
# complete by a stamp file written only after both binaries were built and
# verified. The script is idempotent, safe to interrupt (it builds in a
# temp folder and renames it into place atomically) and safe to run
# concurrently (flock on a lock file in the cache root).
#
# Environment:
#   PORTWAY_K8S_CACHE         cache root (default: $HOME/.cache/portway/k8s)
#   PORTWAY_K8S_LOCK_TIMEOUT  seconds to wait for another running instance
#                             (default: 3600)
set -euo pipefail

# --- Versions (keep the etcd version the one this Kubernetes pins) ----------
KUBE_VERSION="v1.36.1"
ETCD_VERSION="v3.6.8"

# --- Derived settings ----------------------------------------------------------
# Kubernetes v1.X.Y publishes its staging modules as k8s.io/<name> v0.X.Y.
STAGING_VERSION="v0.${KUBE_VERSION#v1.}"
KUBE_MINOR="${KUBE_VERSION#v1.}"
KUBE_MINOR="${KUBE_MINOR%%.*}"

CACHE_ROOT="${PORTWAY_K8S_CACHE:-$HOME/.cache/portway/k8s}"
STAMP_NAME="kube-apiserver-${KUBE_VERSION}_etcd-${ETCD_VERSION}"
STAMP_FILE=".complete"
LOCK_TIMEOUT="${PORTWAY_K8S_LOCK_TIMEOUT:-3600}"

# Keep the caller's stdout on fd 3 for the single result line and send
# everything else (our logs, go's output) to stderr.
exec 3>&1 1>&2

log() { printf '[k8s-test-env] %s\n' "$*" >&2; }
die() { printf '[k8s-test-env] ERROR: %s\n' "$*" >&2; exit 1; }

# Print the result folder on the real stdout and exit successfully.
finish() { printf '%s\n' "$1" >&3; exit 0; }

# --- Fast path: already built ---------------------------------------------------
# The cache root is made absolute first so that the printed path is absolute
# even when PORTWAY_K8S_CACHE is relative.
mkdir -p "$CACHE_ROOT" || die "cannot create cache folder $CACHE_ROOT"
CACHE_ROOT="$(cd "$CACHE_ROOT" && pwd -P)"
FINAL_DIR="$CACHE_ROOT/$STAMP_NAME"

# The final folder only ever appears through an atomic rename of a folder that
# already holds the stamp, so checking the stamp without the lock is safe.
if [[ -f "$FINAL_DIR/$STAMP_FILE" ]]; then
  finish "$FINAL_DIR"
fi

# --- Tools --------------------------------------------------------------------
if ! command -v go >/dev/null 2>&1 && [[ -x /usr/local/go/bin/go ]]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
command -v go >/dev/null 2>&1 || die "go not found (looked in PATH and /usr/local/go/bin)"
command -v flock >/dev/null 2>&1 || die "flock not found (Debian package util-linux)"

# --- Lock: one builder at a time --------------------------------------------
exec 9>"$CACHE_ROOT/.lock"
if ! flock -n 9; then
  log "another instance is building; waiting up to ${LOCK_TIMEOUT}s for its lock..."
  flock -w "$LOCK_TIMEOUT" 9 || die "timed out waiting for lock $CACHE_ROOT/.lock"
fi

# The other instance may have finished the job while we waited.
if [[ -f "$FINAL_DIR/$STAMP_FILE" ]]; then
  finish "$FINAL_DIR"
fi

# Holding the lock, anything left in the way is debris of an interrupted run:
# temp folders (only ever created under the lock) and a final folder without a
# stamp (should not happen, but never trust it).
rm -rf "$CACHE_ROOT"/.tmp.* "$FINAL_DIR"

WORK="$(mktemp -d "$CACHE_ROOT/.tmp.XXXXXX")"
CHILD=""
# On exit (normal, error or signal): stop a running build (see gobuild) and
# drop the temp folder.
# shellcheck disable=SC2317  # invoked through the trap
cleanup() {
  local rc=$?
  if [[ -n "$CHILD" ]]; then kill "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
  rm -rf "$WORK"
  if (( rc != 0 )); then log "FAILED (exit $rc); nothing was cached"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
OUT="$WORK/out"   # becomes FINAL_DIR by rename; same file system as the cache
mkdir -p "$OUT"

log "building kube-apiserver ${KUBE_VERSION} and etcd ${ETCD_VERSION} into $FINAL_DIR"
log "using $(go version) at $(command -v go); a first build takes 3-8 minutes and ~150 MB of downloads"

# Run go in a throwaway module folder ($1). -mod=mod lets go fill in go.sum
# there; GOWORK=off ignores any go.work above it; CGO is off as in upstream
# release builds (and a fresh machine may have no C compiler).
# The lock's fd 9 is closed for go so that no stray child can hold the lock.
gomod() {
  local dir="$1"; shift
  (cd "$dir" && GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0 exec go "$@" 9>&-)
}

# Same, for the long builds: go runs in the background (the subshell execs
# into it, so CHILD is go's own pid) and we `wait` for it; a signal to this
# script then interrupts the wait at once and cleanup stops go.
gobuild() {
  local dir="$1"; shift
  (cd "$dir" && GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0 exec go build "$@" 9>&-) &
  CHILD=$!
  wait "$CHILD"   # under set -e a failed build ends the script here
  CHILD=""
}

# --- kube-apiserver -------------------------------------------------------------
build_kube_apiserver() {
  local src="$WORK/kube-apiserver-src"
  mkdir -p "$src"
  gomod "$src" mod init portway.invalid/k8s-test-env/kube-apiserver >/dev/null 2>&1 \
    || die "go mod init failed in $src"

  # Find Kubernetes' own go.mod in the module cache.
  log "kube-apiserver: fetching k8s.io/kubernetes ${KUBE_VERSION} metadata"
  local dl kmod
  dl="$(gomod "$src" mod download -json "k8s.io/kubernetes@${KUBE_VERSION}")" \
    || die "cannot download k8s.io/kubernetes@${KUBE_VERSION}: $(sed -n 's/^[[:space:]]*"Error": //p' <<<"$dl")"
  kmod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$dl")"
  [[ -n "$kmod" && -f "$kmod" ]] || die "could not locate go.mod of k8s.io/kubernetes@${KUBE_VERSION}"

  # Staging modules: every `k8s.io/X => ./staging/...` replacement, in both the
  # block form and the single-line `replace X => ./...` form.
  local -a staging
  mapfile -t staging < <(awk '
    { sub(/^[[:space:]]*replace[[:space:]]+/, ""); sub(/^[[:space:]]+/, "") }
    $1 ~ /^k8s\.io\// && $2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }
  ' "$kmod")
  (( ${#staging[@]} > 0 )) || die "found no staging replacements in $kmod"

  # Requirements: copy every `path version` pair from Kubernetes' require
  # block(s) so that all dependencies resolve to exactly what it pins.
  local -a reqs
  mapfile -t reqs < <(awk '
    /^require[[:space:]]*\($/ { inreq = 1; next }
    inreq && /^\)/            { inreq = 0; next }
    /^require[[:space:]]+[^(]/ { print $2, $3; next }
    inreq && NF >= 2 && $1 !~ /^\/\// { print $1, $2 }
  ' "$kmod")
  (( ${#reqs[@]} > 0 )) || die "found no requirements in $kmod"

  local -a edits=("-require=k8s.io/kubernetes@${KUBE_VERSION}")
  local r path ver m
  for r in "${reqs[@]}"; do
    path="${r% *}"; ver="${r#* }"
    for m in "${staging[@]}"; do
      [[ "$path" == "$m" ]] && ver="$STAGING_VERSION"   # staging ones are v0.0.0 there
    done
    edits+=("-require=${path}@${ver}")
  done
  for m in "${staging[@]}"; do
    edits+=("-replace=${m}=${m}@${STAGING_VERSION}")
  done
  # Same language version (and so the same GODEBUG defaults) as Kubernetes.
  local gover
  gover="$(awk '$1 == "go" { print $2; exit }' "$kmod")"
  [[ -n "$gover" ]] && edits+=("-go=${gover}")
  gomod "$src" mod edit "${edits[@]}"
  log "kube-apiserver: module has ${#reqs[@]} requirements, ${#staging[@]} staging replacements (=> ${STAGING_VERSION})"

  # Version info is normally stamped by Kubernetes' hack/lib/version.sh.
  local ldflags="-s -w" pkg key
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    for key in gitVersion=$KUBE_VERSION gitMajor=1 gitMinor=$KUBE_MINOR gitTreeState=clean \
               buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ); do
      ldflags+=" -X ${pkg}.${key}"
    done
  done

  log "kube-apiserver: downloading modules and compiling (the long part)..."
  gobuild "$src" -trimpath -ldflags "$ldflags" -o "$OUT/kube-apiserver" \
    k8s.io/kubernetes/cmd/kube-apiserver

  # Sanity check: our dependency versions must equal what Kubernetes pins
  # (they could only differ if a staging module asked for something newer).
  local mismatches
  mismatches="$(
    gomod "$src" list -m -f '{{.Path}} {{.Version}}' all | awk '
      NR == FNR { want[$1] = $2; next }
      ($1 in want) && want[$1] != $2 { print "  " $1 ": kubernetes pins " want[$1] ", got " $2 }
    ' <(printf '%s\n' "${reqs[@]}" | awk -v s=" ${staging[*]} " 'index(s, " " $1 " ") == 0') -
  )" || die "could not list the modules of the kube-apiserver build"
  if [[ -n "$mismatches" ]]; then
    log "WARNING: some dependencies differ from the versions k8s.io/kubernetes ${KUBE_VERSION} pins:"
    printf '%s\n' "$mismatches" >&2
  fi
}

# --- etcd -------------------------------------------------------------------------
build_etcd() {
  local src="$WORK/etcd-src"
  mkdir -p "$src"
  gomod "$src" mod init portway.invalid/k8s-test-env/etcd >/dev/null 2>&1 \
    || die "go mod init failed in $src"
  # Requiring only the server module lets its own go.mod pin the dependencies.
  gomod "$src" mod edit "-require=go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
  log "etcd: downloading modules and compiling..."
  gobuild "$src" -trimpath -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3
}

SECONDS=0
build_etcd
build_kube_apiserver
log "built in ${SECONDS}s"

# --- Verify -------------------------------------------------------------------------
apiserver_version="$("$OUT/kube-apiserver" --version 2>&1)" \
  || die "kube-apiserver --version failed: $apiserver_version"
grep -qx "Kubernetes ${KUBE_VERSION}" <<<"$apiserver_version" \
  || die "kube-apiserver reports '$apiserver_version', expected 'Kubernetes ${KUBE_VERSION}'"
etcd_version="$("$OUT/etcd" --version 2>&1)" || die "etcd --version failed: $etcd_version"
grep -qx "etcd Version: ${ETCD_VERSION#v}" <<<"$etcd_version" \
  || die "etcd reports '$etcd_version', expected version ${ETCD_VERSION#v}"
log "verified: $apiserver_version; $(head -n1 <<<"$etcd_version")"

# --- Publish atomically -----------------------------------------------------------
# The stamp goes in before the rename, so FINAL_DIR never exists incomplete.
{
  echo "kube-apiserver ${KUBE_VERSION}"
  echo "etcd ${ETCD_VERSION}"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) with $(go version)"
} >"$OUT/$STAMP_FILE"
mv -T "$OUT" "$FINAL_DIR"
log "done: $FINAL_DIR"
finish "$FINAL_DIR"
