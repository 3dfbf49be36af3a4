#!/usr/bin/env bash
# install-test-deps.sh - install the Debian packages that portway's end-to-end
# tests need (the real servers and clients started by internal/testservers).
#
# Usage: scripts/install-test-deps.sh
#
# Idempotent: a package is installed only when `dpkg-query` says it is not
# installed, and `apt-get update` runs only when something must be installed,
# so a second run does nothing and returns in well under a second.
#
# Packages and why:
#   postgresql        initdb/postgres (in /usr/lib/postgresql/*/bin) + psql
#   redis-server      redis-server
#   redis-tools       redis-cli
#   openssh-server    /usr/sbin/sshd
#   openssh-client    ssh, scp, ssh-keygen
#   dnsmasq-base      /usr/sbin/dnsmasq only (the `dnsmasq` package would also
#                     install and start a system DNS service; we do not want it)
#   dnsutils          dig
#   tinyproxy-bin     /usr/bin/tinyproxy only (an HTTP CONNECT proxy for the
#                     proxy traversal test; the `tinyproxy` package would also
#                     install a system service)
#   haproxy           haproxy (PROXY protocol v1/v2 peer; its service is not
#                     started, see Services below)
#   iproute2          ip, ss
#   util-linux        unshare
#   procps            ps, pgrep
#   ca-certificates, curl
#   podman            builds and checks the container image (scripts/image.sh):
#                     vfs storage, FROM scratch, nothing pulled, no daemon
#   systemd           systemd-analyze verify and systemd-sysusers for the
#                     units in deploy/systemd (scripts/units.sh); nothing of it
#                     needs systemd running as PID 1
#
# Services: the postinst scripts of postgresql, redis-server, openssh-server
# and haproxy try to start system services through invoke-rc.d. Those would
# hold ports (5432, 6379, 22; haproxy's default config binds none but the
# daemon would still run) and keep running in CI. During the install a
# /usr/sbin/policy-rc.d that exits 101 ("action forbidden") is put in place, so
# invoke-rc.d starts nothing; a pre-existing policy-rc.d is restored afterwards.
# As a second line of defence the init scripts of the packages installed by this
# run are told to stop.
#
# Environment:
#   APT_LOCK_TIMEOUT  seconds to wait for another apt/dpkg (default: 600)
set -euo pipefail

log() { printf '[install-test-deps] %s\n' "$*" >&2; }
die() { printf '[install-test-deps] ERROR: %s\n' "$*" >&2; exit 1; }

PACKAGES=(
	postgresql
	redis-server
	redis-tools
	openssh-server
	openssh-client
	dnsmasq-base
	dnsutils
	tinyproxy-bin
	haproxy
	iproute2
	util-linux
	procps
	ca-certificates
	curl
	podman
	systemd
)

# Binaries that must be present afterwards (binary:package). A package can be
# "installed" while a binary is missing (e.g. removed by hand): then the
# package is reinstalled.
BINARIES=(
	psql:postgresql
	redis-server:redis-server
	redis-cli:redis-tools
	sshd:openssh-server
	ssh:openssh-client
	scp:openssh-client
	ssh-keygen:openssh-client
	dnsmasq:dnsmasq-base
	dig:dnsutils
	tinyproxy:tinyproxy-bin
	haproxy:haproxy
	ip:iproute2
	unshare:util-linux
	ps:procps
	curl:curl
	podman:podman
	systemd-analyze:systemd
	systemd-sysusers:systemd
)

have_binary() {
	# sbin directories are not always on a normal user's PATH.
	PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1
}

is_installed() {
	[[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

have_initdb() {
	compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

missing=()
reinstall=()
for p in "${PACKAGES[@]}"; do
	is_installed "$p" || missing+=("$p")
done
# owner BIN: the installed package that ships BIN (found through dpkg's file
# lists, which still name a file that was deleted), or nothing.
owner() {
	local d line
	for d in /usr/bin /usr/sbin /bin /sbin; do
		if line="$(dpkg-query -S "$d/$1" 2>/dev/null | head -n1)" && [[ -n "$line" ]]; then
			printf '%s\n' "${line%%: *}"
			return
		fi
	done
}
for entry in "${BINARIES[@]}"; do
	bin="${entry%%:*}" pkg="${entry#*:}"
	if ! have_binary "$bin" && [[ " ${missing[*]-} " != *" $pkg "* ]]; then
		# The package is installed but the binary is gone: reinstall the
		# package that ships it (e.g. dig is in bind9-dnsutils, dnsutils
		# being a transitional package).
		own="$(owner "$bin")"
		pkg="${own:-$pkg}"
		[[ " ${reinstall[*]-} " == *" $pkg "* ]] || reinstall+=("$pkg")
	fi
done
if ! have_initdb && [[ " ${missing[*]-} " != *" postgresql "* ]]; then
	# The server binaries live in postgresql-<major>; `postgresql` pulls the
	# current one in.
	reinstall+=(postgresql)
fi

if ((${#missing[@]} == 0 && ${#reinstall[@]} == 0)); then
	log "all test dependencies are installed"
	exit 0
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
	command -v sudo >/dev/null 2>&1 || die "not root and sudo is not available; as root, install: ${missing[*]} ${reinstall[*]}"
	SUDO=(sudo)
fi

as_root() { "${SUDO[@]}" "$@"; }

POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
POLICY_INSTALLED=0

restore_policy() {
	if ((POLICY_INSTALLED)); then
		if [[ -n "$POLICY_BACKUP" ]]; then
			as_root mv -f "$POLICY_BACKUP" "$POLICY" || true
		else
			as_root rm -f "$POLICY" || true
		fi
		POLICY_INSTALLED=0
	fi
}
trap restore_policy EXIT
trap 'exit 130' INT TERM

if [[ -e "$POLICY" ]]; then
	POLICY_BACKUP="$(as_root mktemp /usr/sbin/policy-rc.d.install-test-deps.XXXXXX)"
	as_root cp -p "$POLICY" "$POLICY_BACKUP"
fi
POLICY_INSTALLED=1
printf '#!/bin/sh\n# Temporary, written by portway scripts/install-test-deps.sh.\nexit 101\n' |
	as_root tee "$POLICY" >/dev/null
as_root chmod 0755 "$POLICY"

LOCK_TIMEOUT="${APT_LOCK_TIMEOUT:-600}"
APT=(env DEBIAN_FRONTEND=noninteractive apt-get -o "DPkg::Lock::Timeout=${LOCK_TIMEOUT}")

todo=("${missing[@]}" "${reinstall[@]}")
log "installing: ${todo[*]}"
as_root "${APT[@]}" update -qq
if ((${#missing[@]})); then
	as_root "${APT[@]}" install -y -q --no-install-recommends "${missing[@]}"
fi
if ((${#reinstall[@]})); then
	as_root "${APT[@]}" install -y -q --no-install-recommends --reinstall "${reinstall[@]}"
fi

restore_policy

# Second line of defence: stop any service of the packages just installed that
# started anyway. Init scripts act on their own pid files only, so servers
# started by tests (own configs, own pid files) are not touched.
changed=" ${todo[*]} "
for entry in postgresql:postgresql redis-server:redis-server ssh:openssh-server haproxy:haproxy; do
	svc="${entry%%:*}" pkg="${entry#*:}"
	if [[ "$changed" == *" $pkg "* && -x "/etc/init.d/$svc" ]]; then
		as_root "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
	fi
done

# Verify.
fail=0
for entry in "${BINARIES[@]}"; do
	bin="${entry%%:*}" pkg="${entry#*:}"
	if ! have_binary "$bin"; then
		log "still missing: $bin (package $pkg)"
		fail=1
	fi
done
have_initdb || { log "still missing: /usr/lib/postgresql/*/bin/initdb (package postgresql)"; fail=1; }
((fail == 0)) || die "some test dependencies could not be installed"
log "done"
