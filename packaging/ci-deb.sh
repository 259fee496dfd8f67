#!/usr/bin/env bash
# CI piece for the .deb: builds it from the dev-profile binary that `cargo test` already built (no
# second full build), installs it, checks what it installed (user and groups, files, conffiles,
# the unit with `systemd-analyze verify`, the binary with --version, `check` and a readiness
# notification, all as the service's user), the upgrade path of its maintainer scripts
# (ci-deb-upgrade.sh), then purges it and checks what purge removed.
# Run as root on Debian, from .ci/run after `cargo test`:  bash packaging/ci-deb.sh
# Prints the time of each step. Needs: cargo, dpkg/apt, systemd-analyze, python3, a Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

CARGO_DEB_VERSION=3.8.0
UNIT=/usr/lib/systemd/system/gryt-agent.service
DROPIN=/etc/systemd/system/gryt-agent.service.d/ci-deb-ephemeral.conf

started=$(date +%s%N)
step_started=$started
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
step() { # step NAME: prints the time of the step that ends here, then starts NAME
  [ -n "${step_name:-}" ] && printf 'ci-deb: %-22s %6d ms\n' "$step_name" "$(ms_since "$step_started")"
  step_name=$1
  step_started=$(date +%s%N)
  printf '\n=== ci-deb: %s\n' "$1"
}
fail() { echo "ci-deb: FAIL: $*" >&2; exit 1; }
expect() { # expect DESCRIPTION COMMAND...
  "${@:2}" || fail "$1"
  echo "ok: $1"
}

tmp=$(mktemp -d)
chmod 0711 "$tmp" # the service's user reaches its files in here
agent_pid=
cleanup() {
  if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
  rm -f "$DROPIN"
  # A failed run must not leave the package (and its user's service) installed.
  if dpkg-query -W -f='${Status}' gryt-agent 2>/dev/null | grep -q installed; then
    dpkg --purge gryt-agent >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

step "cargo-deb"
# dpkg-shlibdeps (dpkg-dev) works out the libc dependency (`$auto` in Cargo.toml).
if ! command -v dpkg-shlibdeps >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends dpkg-dev
fi
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
cargo deb --version

step "build binary"
# After `cargo test` this is a no-op: the integration tests built the same dev-profile binary.
cargo build --locked --bin gryt-agent
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

step "build .deb"
# The dev profile: CI tests packaging, not an optimised binary (releases: plain `cargo deb`).
# cargo-deb warns that dev builds are not for releases; that is the point here.
rm -rf target/debian
cargo deb --profile dev --no-build --fast --output target/debian/
deb=$(ls target/debian/gryt-agent_*.deb)
ls -l "$deb"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
dpkg-deb --contents "$deb"

step "install"
if dpkg-query -W -f='${Status}' gryt-agent 2>/dev/null | grep -q installed; then
  dpkg --purge gryt-agent # a previous run's leftover
fi
# apt installs missing dependencies (docker.io); with all of them present it needs no download.
if ! apt-get install -y -qq --no-install-recommends "./$deb"; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "./$deb"
fi

step "check install"
expect "gryt-agent user exists" getent passwd gryt-agent
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd gryt-agent)
expect "a system user (uid $uid)" test "$uid" -lt 1000
expect "home /var/lib/gryt-agent" test "$home" = /var/lib/gryt-agent
expect "no login shell" test "$shell" = /usr/sbin/nologin
expect "primary group gryt-agent" test "$(getent group "$gid" | cut -d: -f1)" = gryt-agent
expect "in the docker group" sh -c 'id -nG gryt-agent | tr " " "\n" | grep -qx docker'
owner_mode() { stat -c '%U:%G %a' "$1"; }
expect "/usr/bin/gryt-agent executable" test -x /usr/bin/gryt-agent
expect "unit at $UNIT" test -f "$UNIT"
expect "unit enabled" test -L /etc/systemd/system/multi-user.target.wants/gryt-agent.service
expect "/etc/gryt-agent/agent.toml" test -f /etc/gryt-agent/agent.toml
expect "/etc/default/gryt-agent root 600" test "$(owner_mode /etc/default/gryt-agent)" = "root:root 600"
expect "reference config" test -f /usr/share/gryt-agent/agent.example.toml
expect "state dir gryt-agent 750" test "$(owner_mode /var/lib/gryt-agent)" = "gryt-agent:gryt-agent 750"
expect "work dir gryt-agent 750" test "$(owner_mode /var/lib/gryt-agent/work)" = "gryt-agent:gryt-agent 750"
expect "credentials dir root 700" test "$(owner_mode /etc/gryt-agent/credentials)" = "root:root 700"
conffiles=$(dpkg-query -W -f='${Conffiles}\n' gryt-agent)
echo "$conffiles"
expect "agent.toml is a conffile" grep -q '^ /etc/gryt-agent/agent.toml ' <<<"$conffiles"
expect "/etc/default/gryt-agent is a conffile" grep -q '^ /etc/default/gryt-agent ' <<<"$conffiles"

step "systemd-analyze"
# verify loads the unit as systemd would, checks its settings, and that ExecStart= exists.
if ! out=$(systemd-analyze verify "$UNIT" 2>&1); then
  echo "$out"
  fail "systemd-analyze verify $UNIT"
fi
# Warnings leave the exit code at 0: any line about our unit is a failure too.
if grep -i 'gryt-agent' <<<"$out"; then fail "systemd-analyze verify warned about the unit"; fi
echo "ok: systemd-analyze verify $UNIT: ${out:-no findings}"
systemd-analyze security --offline=true "$UNIT" 2>/dev/null | tail -n 1 || true

# The ephemeral drop-in that packaging/cloud-init/ephemeral.yaml writes, over the installed unit.
mkdir -p "${DROPIN%/*}"
awk '/path: \/etc\/systemd\/system\/gryt-agent.service.d\/ephemeral.conf/ { f = 1; next }
     f && /^  - path:/ { exit }
     f && /^      / { print substr($0, 7) }' packaging/cloud-init/ephemeral.yaml >"$DROPIN"
expect "ephemeral drop-in extracted" grep -q '^ExecStart=/usr/bin/gryt-agent run --max-jobs' "$DROPIN"
out=$(systemd-analyze verify "$UNIT" 2>&1) || { echo "$out"; fail "verify with the ephemeral drop-in"; }
if grep -i 'gryt-agent' <<<"$out"; then fail "systemd-analyze verify warned with the ephemeral drop-in"; fi
echo "ok: systemd-analyze verify with the cloud-init ephemeral drop-in: ${out:-no findings}"
rm -f "$DROPIN"
rmdir "${DROPIN%/*}" 2>/dev/null || true

step "run the binary"
out=$(gryt-agent --version)
echo "$out"
expect "--version says $version" test "$out" = "gryt-agent $version"

# `check` as the service's user, with a minimal push config and the keys in files, as the unit
# gives them: this also proves the docker group opens the Docker socket to that user.
install -d -o gryt-agent -m 0700 "$tmp/creds"
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$tmp/creds/api-key"
python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())' >"$tmp/creds/encryption-key"
chown gryt-agent "$tmp/creds"/*
chmod 0600 "$tmp/creds"/*
as_agent() {
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin GRYT_STATE_DIR=/var/lib/gryt-agent NO_COLOR=1 \
    AGENT_API_KEY_FILE="$tmp/creds/api-key" GRYT_ENCRYPTION_KEY_FILE="$tmp/creds/encryption-key" \
    GRYT_PUSH=true AGENT_HOST=127.0.0.1 "$@"
}
set +e
out=$(as_agent setpriv --reuid gryt-agent --regid gryt-agent --init-groups \
  gryt-agent --config /etc/gryt-agent/agent.toml check 2>&1)
rc=$?
set -e
echo "$out"
echo "(check exited $rc)"
for line in "settings load and are valid" "push mode: API key set" \
  "state dir /var/lib/gryt-agent is writable" "work dir /var/lib/gryt-agent/work is writable" \
  "Docker engine"; do
  expect "check: [ok] $line" grep -qF "[ok]   $line" <<<"$out"
done
# A missing default image is only a warning with the default pull policy; anything else failing
# is a packaging problem.
if grep -F '[FAIL]' <<<"$out" | grep -vF 'default image'; then fail "check reported a failure"; fi
expect "check exit code follows its [FAIL] lines" test "$rc" -eq "$(grep -qF '[FAIL]' <<<"$out" && echo 1 || echo 0)"

# Readiness (Type=notify): started as systemd would, the agent sends READY=1 to $NOTIFY_SOCKET
# once it listens, and drains and exits 0 on SIGTERM.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
install -d -o gryt-agent -m 0700 "$tmp/notify"
python3 - "$tmp/notify/sock" >"$tmp/notify.out" 2>&1 <<'PY' &
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666)
s.settimeout(30)
while True:
    msg = s.recv(4096).decode()
    print(msg, flush=True)
    if "READY=1" in msg.split("\n"):
        break
PY
listener=$!
for _ in $(seq 50); do [ -S "$tmp/notify/sock" ] && break; sleep 0.1; done
notify_started=$(date +%s%N)
# `exec` in the background subshell, so that $! is the agent itself (env and setpriv exec too).
(exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin GRYT_STATE_DIR=/var/lib/gryt-agent NO_COLOR=1 \
  AGENT_API_KEY_FILE="$tmp/creds/api-key" GRYT_ENCRYPTION_KEY_FILE="$tmp/creds/encryption-key" \
  GRYT_PUSH=true AGENT_HOST=127.0.0.1 AGENT_PORT="$port" NOTIFY_SOCKET="$tmp/notify/sock" \
  setpriv --reuid gryt-agent --regid gryt-agent --init-groups \
  gryt-agent --config /etc/gryt-agent/agent.toml run >"$tmp/agent.log" 2>&1) &
agent_pid=$!
if ! wait "$listener"; then cat "$tmp/notify.out" "$tmp/agent.log"; fail "no READY=1 from the agent"; fi
echo "ok: READY=1 after $(ms_since "$notify_started") ms ($(tr '\n' ' ' <"$tmp/notify.out"))"
expect "the started process is the agent" grep -q '^gryt-agent' "/proc/$agent_pid/comm"
# READY=1 can come a moment before the SIGTERM handler is in place: wait for it (SigCgt bit 15).
for _ in $(seq 100); do
  caught=$(awk '/^SigCgt:/ { print $2 }' "/proc/$agent_pid/status" 2>/dev/null || echo 0)
  (((16#${caught:-0} >> 14) & 1)) && break
  sleep 0.05
done
kill -TERM "$agent_pid"
set +e
wait "$agent_pid"
rc=$?
set -e
agent_pid=
cat "$tmp/agent.log"
expect "agent drains and exits 0 on SIGTERM (exit code $rc)" test "$rc" -eq 0

step "upgrade path"
# The installed maintainer scripts (debhelper's snippets in them) on an upgrade, with stand-ins
# for systemd: a running agent is handed over (SIGUSR2, exit 0, start), never drained.
bash packaging/ci-deb-upgrade.sh /var/lib/dpkg/info/gryt-agent.postinst /usr/bin/gryt-agent \
  /var/lib/dpkg/info/gryt-agent.prerm

step "purge"
dpkg --purge gryt-agent
for path in /usr/bin/gryt-agent "$UNIT" /etc/gryt-agent /etc/default/gryt-agent /var/lib/gryt-agent \
  /etc/systemd/system/multi-user.target.wants/gryt-agent.service; do
  expect "purge removed $path" test ! -e "$path" -a ! -L "$path"
done
# Kept on purge, as Debian does for system users (docs/deploy.md).
expect "purge kept the gryt-agent user" getent passwd gryt-agent

step "done"
printf '\nci-deb: total %d ms\n' "$(ms_since "$started")"
