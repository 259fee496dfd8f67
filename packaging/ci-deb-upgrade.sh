#!/usr/bin/env bash
# CI piece for the .deb's upgrade path (packaging/deb/postinst), without a running systemd: the
# postinst runs as `configure <old version>` in a mount namespace where /run/systemd/system
# exists, with stand-ins on PATH for `systemctl` and `deb-systemd-invoke` (they record what they
# are asked; `systemctl kill` signals the stand-in service's main process) and for the user and
# directory set-up (done for real by the install). Checks, each case on a fresh record:
#   - an agent that catches SIGUSR2 (the real binary, push mode) is handed over: SIGUSR2 to it,
#     it exits 0 at once, then `start`; never a restart or stop (those drain);
#   - a main process that does not catch SIGUSR2 (an agent from before the hand-over) gets the
#     `try-restart` of earlier versions and no signal;
#   - a stopped service, and a first install, are not started;
#   - with PRERM (the installed one, which debhelper's snippet makes): `upgrade` touches nothing,
#     `remove` stops the service (a drain).
# Usage (as root):  bash packaging/ci-deb-upgrade.sh POSTINST GRYT_AGENT_BINARY [PRERM]
#   POSTINST: packaging/deb/postinst, or the installed one (/var/lib/dpkg/info/gryt-agent.postinst,
#   with debhelper's snippets in it).
set -euo pipefail
postinst=$(realpath "$1")
binary=$(realpath "$2")
prerm=${3:+$(realpath "$3")}

fail() { echo "ci-deb-upgrade: FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

stubs=$tmp/stubs
mkdir -p "$stubs"
# The service's main process is the pid in $tmp/main_pid (0: not running).
cat >"$stubs/systemctl" <<EOF
#!/bin/sh
echo "systemctl \$*" >>"$tmp/calls"
case "\$*" in
  "show --property=MainPID --value gryt-agent.service") cat "$tmp/main_pid" ;;
  "kill --signal=SIGUSR2 --kill-who=main gryt-agent.service") kill -USR2 "\$(cat "$tmp/main_pid")" ;;
esac
EOF
printf '#!/bin/sh\necho "deb-systemd-invoke $*" >>"%s/calls"\n' "$tmp" >"$stubs/deb-systemd-invoke"
for quiet in deb-systemd-helper getent groupadd useradd usermod install; do
  printf '#!/bin/sh\nexit 0\n' >"$stubs/$quiet"
done
printf '#!/bin/sh\necho gryt-agent docker\n' >"$stubs/id"
chmod +x "$stubs"/*

# run_script SCRIPT ARGS...: a maintainer script as dpkg runs it, in a namespace where systemd
# seems to run.
run_script() {
  : >"$tmp/calls"
  unshare --mount --propagation private sh -c \
    'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec "$@"' sh \
    env PATH="$stubs:$PATH" sh "$@" >"$tmp/script.out" 2>&1 ||
    { cat "$tmp/script.out"; fail "$* failed"; }
  cat "$tmp/script.out"
  sed 's/^/  called: /' "$tmp/calls"
}
run_postinst() { run_script "$postinst" "$@"; }
called() { grep -qxF "$1" "$tmp/calls"; }
not_called() { ! grep -qE "$1" "$tmp/calls"; }

echo "=== an agent that can hand over"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$tmp/state" "$tmp/work"
# A parent shell that reaps the agent as soon as it exits (as systemd would) and keeps its code.
(
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin NO_COLOR=1 GRYT_PUSH=true \
    AGENT_API_KEY=ci-deb-upgrade-key-0123456789abcdef0123 GRYT_STATE_DIR="$tmp/state" \
    GRYT_WORK_DIR="$tmp/work" AGENT_HOST=127.0.0.1 AGENT_PORT="$port" \
    "$binary" run >"$tmp/agent.log" 2>&1 &
  echo $! >"$tmp/main_pid"
  wait $!
  echo $? >"$tmp/agent.rc"
) &
pids+=($!)
disown $!
for _ in $(seq 100); do [ -s "$tmp/main_pid" ] && break; sleep 0.05; done
agent=$(cat "$tmp/main_pid")
pids+=("$agent")
# Wait until it catches SIGUSR2 (its SigCgt bit), as the postinst checks.
usr2=$(kill -l USR2)
for _ in $(seq 200); do
  caught=$(awk '/^SigCgt:/ { print $2 }' "/proc/$agent/status" 2>/dev/null || echo 0)
  (((16#${caught:-0} >> (usr2 - 1)) & 1)) && break
  kill -0 "$agent" 2>/dev/null || { cat "$tmp/agent.log"; fail "the agent did not start"; }
  sleep 0.05
done
started=$(date +%s%N)
run_postinst configure 0.0.1
took_ms=$((($(date +%s%N) - started) / 1000000))
for _ in $(seq 100); do [ -s "$tmp/agent.rc" ] && break; sleep 0.05; done
called "systemctl kill --signal=SIGUSR2 --kill-who=main gryt-agent.service" || fail "no SIGUSR2 sent"
called "deb-systemd-invoke start gryt-agent.service" || fail "the service was not started again"
not_called 'restart|stop' || fail "a restart or stop (a drain) was asked for"
[ "$(sed -n '/SIGUSR2/=' "$tmp/calls")" -lt "$(sed -n '/invoke start/=' "$tmp/calls")" ] ||
  fail "started before the hand-over"
[ "$(cat "$tmp/agent.rc" 2>/dev/null)" = 0 ] || { cat "$tmp/agent.log"; fail "the agent did not exit 0"; }
grep -q "handing over: exiting and leaving 0 running jobs" "$tmp/agent.log" ||
  { cat "$tmp/agent.log"; fail "no hand-over in the agent's log"; }
ok "handed over: SIGUSR2, the agent exited 0, then start (postinst took $took_ms ms)"

echo "=== an agent from before the hand-over (does not catch SIGUSR2)"
sleep 300 &
old=$!
disown "$old"
pids+=("$old")
echo "$old" >"$tmp/main_pid"
run_postinst configure 0.0.1
called "deb-systemd-invoke try-restart gryt-agent.service" || fail "no try-restart"
not_called 'SIGUSR2|invoke start' || fail "signalled or started"
kill -0 "$old" || fail "the old agent was signalled"
ok "restarted as before (try-restart), no signal"

echo "=== a stopped service"
echo 0 >"$tmp/main_pid"
run_postinst configure 0.0.1
not_called 'kill|start|restart|stop' || fail "a stopped service was touched"
ok "left stopped"

echo "=== a first install"
run_postinst configure ''
not_called 'show|kill|start|restart|stop' || fail "a first install started or signalled something"
ok "not started"

if [ -n "$prerm" ]; then
  echo "=== the prerm"
  run_script "$prerm" upgrade 9.9.9
  not_called '.' || fail "the prerm acted on an upgrade"
  ok "an upgrade: nothing"
  run_script "$prerm" remove
  called "deb-systemd-invoke stop gryt-agent.service" || fail "remove did not stop the service"
  ok "remove: stop (a drain)"
fi
