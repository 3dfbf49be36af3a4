#!/usr/bin/env bash
# release.sh - cross-build portway release binaries into dist/, with SHA-256
# sums, the way goreleaser lays them out (the container image packages the
# linux ones: deploy/image/Containerfile, scripts/image.sh).
#
# Usage: scripts/release.sh [TARGET...]
#   TARGET is GOOS/GOARCH[/GOARM] (linux/arm/7); default: every release target.
#
# Environment:
#   VERSION  the version stamped in (default: `git describe --tags --always --dirty`, else "dev")
#   COMMIT   the commit stamped in (default: `git rev-parse HEAD`, else "unknown")
#   TAGS     build tags, e.g. nokubernetes for the lean gateway build
#            (default: none); grpcnotrace is always added (see below)
#   DIST     output directory (default: dist)
#
# Output: DIST/portway_VERSION_GOOS_GOARCH[vGOARM][.exe] and
# DIST/portway_VERSION_SHA256SUMS.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null 2>&1 || export PATH="$PATH:/usr/local/go/bin"

ALL_TARGETS=(linux/amd64 linux/arm64 linux/arm/7 linux/386 darwin/arm64 darwin/amd64 windows/amd64)
targets=("$@")
((${#targets[@]})) || targets=("${ALL_TARGETS[@]}")

VERSION="${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}"
COMMIT="${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
DIST="${DIST:-dist}"
mkdir -p "$DIST"

ldflags="-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}"
failed=()
for target in "${targets[@]}"; do
	IFS=/ read -r goos goarch goarm <<<"$target"
	[[ -n "$goos" && -n "$goarch" ]] || { echo "release.sh: target $target: want GOOS/GOARCH[/GOARM]" >&2; exit 2; }
	# grpcnotrace: the etcd client's gRPC otherwise links
	# golang.org/x/net/trace and with it html/template, whose reflective
	# method calls keep every method of every type in the binary (twice
	# its size).
	tags="${TAGS:+$TAGS,}grpcnotrace"
	name="portway_${VERSION}_${goos}_${goarch}${goarm:+v$goarm}"
	[[ "$goos" == windows ]] && name+=.exe
	echo "release.sh: $target${tags:+ (tags: $tags)} -> $DIST/$name" >&2
	# Every target is tried, so one run reports every one that fails.
	if ! CGO_ENABLED=0 GOOS="$goos" GOARCH="$goarch" GOARM="${goarm}" \
		go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$DIST/$name" ./cmd/portway; then
		failed+=("$target")
		rm -f "$DIST/$name"
	fi
done

# Sums of this version's binaries (every target built so far, this run's
# included), ready for `sha256sum -c`.
sums="portway_${VERSION}_SHA256SUMS"
(cd "$DIST" && find . -maxdepth 1 -type f -name "portway_${VERSION}_*" ! -name "$sums" -printf '%f\n' | sort | xargs -r sha256sum >"$sums")
echo "release.sh: $DIST/$sums" >&2
if ((${#failed[@]})); then
	echo "release.sh: FAILED: ${failed[*]}" >&2
	exit 1
fi
