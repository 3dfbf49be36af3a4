#!/usr/bin/env bash
# units.sh - check the systemd units in deploy/systemd: `systemd-analyze
# verify` against a built binary (it checks that ExecStart's binary exists,
# so the units are checked on a copy pointing at one), with any warning
# (an unknown or misspelt key is only a warning to systemd) failing the
# check; the hardening the units promise; and the sysusers file, applied to
# an empty root.
#
# Usage: scripts/units.sh [BINARY]   (default: builds one into a temp dir)
# Needs systemd-analyze and systemd-sysusers (Debian package systemd); runs
# without systemd as PID 1.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null 2>&1 || export PATH="$PATH:/usr/local/go/bin"

die() { printf '[units] ERROR: %s\n' "$*" >&2; exit 1; }
command -v systemd-analyze >/dev/null 2>&1 || die "systemd-analyze is not installed (scripts/install-test-deps.sh installs systemd)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bin="${1:-}"
if [[ -z "$bin" ]]; then
	bin="$work/portway"
	go build -tags grpcnotrace -o "$bin" ./cmd/portway
fi
bin=$(realpath "$bin")

mkdir -p "$work/units"
for unit in deploy/systemd/*.service; do
	sed "s#/usr/local/bin/portway#$bin#g" "$unit" >"$work/units/$(basename "$unit")"
done
# SYSTEMD_LOG_LEVEL=notice: warnings and errors only.
out=$(cd "$work/units" && SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no ./*.service 2>&1) || die "systemd-analyze verify failed: $out"
[[ -z "$out" ]] || die "systemd-analyze verify warns: $out"

# The hardening each unit must keep (a removed line is a regression).
need() { grep -qx "$2" "deploy/systemd/$1" || die "$1 lacks $2"; }
for u in portway-gateway.service portway-agent.service; do
	for line in User=portway NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
		PrivateDevices=yes RestrictSUIDSGID=yes 'SystemCallFilter=@system-service' RestartPreventExitStatus=78; do
		need "$u" "$line"
	done
done
need portway-gateway.service StateDirectory=portway
need portway-gateway.service CapabilityBoundingSet=CAP_NET_BIND_SERVICE
need portway-gateway.service AmbientCapabilities=CAP_NET_BIND_SERVICE
need portway-agent.service CapabilityBoundingSet=
need portway-agent.service AmbientCapabilities=
grep -q -- '--exit-on-auth-failure' deploy/systemd/portway-agent.service || die "portway-agent.service does not pass --exit-on-auth-failure"
# The flags the units pass exist.
"$bin" gateway --help | grep -q -- '--config' || die "portway gateway has no --config"
"$bin" agent --help | grep -q -- '--exit-on-auth-failure' || die "portway agent has no --exit-on-auth-failure"

# The sysusers file makes the user the units run as.
mkdir -p "$work/root/etc"
systemd-sysusers --root="$work/root" - <deploy/systemd/portway.sysusers >/dev/null 2>&1 || die "systemd-sysusers refused deploy/systemd/portway.sysusers"
grep -q '^portway:x:[0-9]*:[0-9]*:.*:/var/lib/portway:' "$work/root/etc/passwd" || die "deploy/systemd/portway.sysusers made no portway user"
echo "[units] deploy/systemd: verified" >&2
