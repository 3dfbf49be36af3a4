#!/usr/bin/env bash
# image.sh - build the portway container image (deploy/image/Containerfile)
# for linux/amd64 and linux/arm64 from release binaries, and check it: its
# config (user, entrypoint, labels, architecture) and that the binary in it
# runs and reports the stamped version. No base image is pulled and no
# daemon is needed: podman with the vfs storage driver, in a private store.
#
# Usage:
#   scripts/image.sh            build and check in a throw-away store (the test command)
#   IMAGE=registry.example.com/portway:v1.2.3 KEEP=1 scripts/image.sh
#                               build into podman's normal store as a manifest
#                               list, to push with:
#                               podman manifest push --all IMAGE docker://IMAGE
#
# Environment:
#   VERSION, COMMIT   stamped into the binaries and the labels (as scripts/release.sh)
#   IMAGE             image name (default: localhost/portway:VERSION)
#   KEEP              1: use podman's default store and keep the image
#   PLATFORMS         default: "linux/amd64 linux/arm64"
#   DIST_IN           package the binaries scripts/release.sh already wrote
#                     there (same VERSION) instead of building them
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null 2>&1 || export PATH="$PATH:/usr/local/go/bin"

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] ERROR: %s\n' "$*" >&2; exit 1; }

command -v podman >/dev/null 2>&1 || die "podman is not installed (scripts/install-test-deps.sh installs it)"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
[[ -s "$CA_BUNDLE" ]] || die "$CA_BUNDLE is missing (Debian package ca-certificates)"

VERSION="${VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}"
COMMIT="${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
IMAGE="${IMAGE:-localhost/portway:${VERSION}}"
PLATFORMS="${PLATFORMS:-linux/amd64 linux/arm64}"
export VERSION COMMIT

work=$(mktemp -d)
podman_args=()
if [[ "${KEEP:-0}" != 1 ]]; then
	# A private store: nothing is left behind, and nothing the machine's
	# podman holds is touched.
	podman_args=(--root "$work/store" --runroot "$work/run" --storage-driver vfs)
fi
pm() { podman "${podman_args[@]}" "$@"; }
cleanup() {
	if [[ "${KEEP:-0}" != 1 ]]; then
		# vfs layers belong to root; podman removes its own store.
		pm system reset --force >/dev/null 2>&1 || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

# The release binaries, built as scripts/release.sh builds them.
ctx="$work/context"
mkdir -p "$ctx"
targets=()
for p in $PLATFORMS; do targets+=("$p"); done
dist="${DIST_IN:-$work/dist}"
if [[ -z "${DIST_IN:-}" ]]; then
	DIST="$dist" scripts/release.sh "${targets[@]}"
fi
for p in $PLATFORMS; do
	arch="${p#*/}"
	cp "$dist/portway_${VERSION}_linux_${arch}" "$ctx/portway_linux_${arch}" ||
		die "no binary for $p in $dist (DIST_IN holds scripts/release.sh output)"
done
cp "$CA_BUNDLE" "$ctx/ca-certificates.crt"

pm manifest rm "$IMAGE" >/dev/null 2>&1 || true
pm manifest create "$IMAGE" >/dev/null
for p in $PLATFORMS; do
	arch="${p#*/}"
	tag="$IMAGE-$arch"
	log "building $tag ($p)"
	pm build --quiet --pull=never --platform "$p" \
		--build-arg "TARGETARCH=$arch" --build-arg "VERSION=$VERSION" --build-arg "REVISION=$COMMIT" \
		-f deploy/image/Containerfile -t "$tag" "$ctx" >/dev/null
	pm manifest add "$IMAGE" "containers-storage:$tag" >/dev/null

	# The image's config.
	cfg=$(pm image inspect --format '{{.Config.User}}|{{json .Config.Entrypoint}}|{{.Architecture}}|{{.Os}}|{{index .Config.Labels "org.opencontainers.image.version"}}|{{index .Config.Labels "org.opencontainers.image.revision"}}|{{index .Config.Labels "org.opencontainers.image.source"}}' "$tag")
	want="65532:65532|[\"portway\"]|$arch|linux|$VERSION|$COMMIT|https://github.com/portway/portway"
	[[ "$cfg" == "$want" ]] || die "$tag config: got $cfg, want $want"

	# The filesystem: exactly the binary and the CA bundle, the binary for
	# the right machine.
	rootfs="$work/rootfs-$arch"
	mkdir -p "$rootfs"
	cid=$(pm create --platform "$p" "$tag")
	pm export "$cid" | tar -x -C "$rootfs"
	pm rm "$cid" >/dev/null
	files=$(cd "$rootfs" && find . -type f | sort | tr '\n' ' ')
	[[ "$files" == "./etc/ssl/certs/ca-certificates.crt ./usr/local/bin/portway " ]] || die "$tag holds: $files"
	cmp -s "$rootfs/etc/ssl/certs/ca-certificates.crt" "$CA_BUNDLE" || die "$tag: CA bundle differs from $CA_BUNDLE"
	# ELF e_machine (bytes 18-19): 0x3e x86-64, 0xb7 AArch64.
	machine=$(od -An -tx1 -j18 -N1 "$rootfs/usr/local/bin/portway" | tr -d ' ')
	case "$arch:$machine" in
	amd64:3e | arm64:b7) ;;
	*) die "$tag: binary is for ELF machine 0x$machine, not $arch" ;;
	esac

	# The binary runs and knows its version: in a container where the
	# machine allows it, else straight from the extracted filesystem (only
	# for the host's architecture).
	if [[ "$arch" == "$(go env GOARCH)" ]]; then
		if out=$(timeout 60 podman "${podman_args[@]}" run --rm --pull=never --network none "$tag" version 2>/dev/null); then
			log "$tag: ran in a container"
		else
			log "$tag: containers cannot run on this machine; running the binary from the image's filesystem"
			out=$("$rootfs/usr/local/bin/portway" version)
		fi
		[[ "$(head -1 <<<"$out")" == "portway $VERSION" ]] || die "$tag: version printed: $out"
		grep -q "^commit: *$COMMIT\$" <<<"$out" || die "$tag: commit not stamped: $out"
	fi
	log "$tag: ok (user 65532, entrypoint portway, labels, $arch binary)"
done
log "manifest list $IMAGE: $(pm manifest inspect "$IMAGE" | grep -c '"architecture"') platforms"
if [[ "${KEEP:-0}" == 1 ]]; then
	log "push with: podman manifest push --all $IMAGE docker://$IMAGE"
fi
