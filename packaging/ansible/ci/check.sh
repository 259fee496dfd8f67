#!/usr/bin/env bash
# CI piece for packaging/ansible: installs ansible-core and ansible-lint (pinned, from PyPI, into
# a venv under ~/.cache, only when missing), syntax-checks and lints the playbooks, then runs the
# role against this machine (local connection, no systemd: ci/local.yml) with the .deb that
# packaging/ci-deb.sh built, checks what it wrote, runs it again to prove it changes nothing, and
# purges the package. Run as root on Debian from .ci/run, after packaging/ci-deb.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

ANSIBLE_CORE_VERSION=2.19.14
ANSIBLE_LINT_VERSION=26.10.1
venv="${XDG_CACHE_HOME:-$HOME/.cache}/gryt-agent-ansible-$ANSIBLE_CORE_VERSION-$ANSIBLE_LINT_VERSION"

fail() { echo "ansible-ci: FAIL: $*" >&2; exit 1; }
expect() { # expect DESCRIPTION COMMAND...
  "${@:2}" || fail "$1"
  echo "ok: $1"
}

# python3-venv for the venv (Debian's Python), python3-apt for the apt module on this host.
missing=()
for p in python3-venv python3-apt; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/ansible-lint" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "ansible-core==$ANSIBLE_CORE_VERSION" "ansible-lint==$ANSIBLE_LINT_VERSION"
fi
export PATH="$venv/bin:$PATH" ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_LOCALHOST_WARNING=0
# Whole outputs, then their first lines: `| head` would end them early (a broken pipe).
version=$(ansible-playbook --version) && echo "${version%%$'\n'*}"
version=$(ansible-lint --offline --version) && echo "${version%%$'\n'*}"

echo "=== syntax and lint"
for playbook in site.yml upgrade.yml rotate-keys.yml ci/local.yml; do
  ansible-playbook -i inventory.example.yml --syntax-check "$playbook"
done
ansible-lint --offline   # every playbook and the role; settings in .ansible-lint

echo "=== the role on this machine"
deb=$(ls ../../target/debian/gryt-agent_*.deb 2>/dev/null | head -n 1 || true)
[ -n "$deb" ] || fail "no target/debian/gryt-agent_*.deb: run packaging/ci-deb.sh first"
deb=$(readlink -f "$deb")
if dpkg-query -W -f='${Status}' gryt-agent 2>/dev/null | grep -q installed; then
  fail "gryt-agent is installed on this machine already: this check installs and purges it"
fi
cleanup() {
  if dpkg-query -W -f='${Status}' gryt-agent 2>/dev/null | grep -q installed; then
    dpkg --purge gryt-agent >/dev/null 2>&1 || true
  fi
  rm -f "/var/cache/$(basename "$deb")"
}
trap cleanup EXIT
CI_AGENT_API_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
CI_ENCRYPTION_KEY=$(python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')
export CI_AGENT_API_KEY CI_ENCRYPTION_KEY
ansible-playbook -i localhost, ci/local.yml -e "gryt_agent_deb=$deb"

owner_mode() { stat -c '%U:%G %a' "$1"; }
expect "package installed" dpkg-query -W gryt-agent
expect "api-key root 600" test "$(owner_mode /etc/gryt-agent/credentials/api-key)" = "root:root 600"
expect "api-key holds the key" test "$(cat /etc/gryt-agent/credentials/api-key)" = "$CI_AGENT_API_KEY"
expect "encryption-key holds the key" \
  test "$(cat /etc/gryt-agent/credentials/encryption-key)" = "$CI_ENCRYPTION_KEY"
expect "/etc/default/gryt-agent root 600" test "$(owner_mode /etc/default/gryt-agent)" = "root:root 600"
for line in "GRYT_PUSH='true'" "AGENT_HOST='127.0.0.1'" "AGENT_PORT='18080'" \
  "GRYT_AGENT_LABELS='ci,linux'" "GRYT_GC_IMAGES='agent'" \
  "AGENT_API_KEY_PREVIOUS='previous-key-0123456789abcdef0123456789'"; do
  expect "env file: $line" grep -qxF "$line" /etc/default/gryt-agent
done

echo "=== again: nothing changes"
out=$(ansible-playbook -i localhost, ci/local.yml -e "gryt_agent_deb=$deb")
echo "$out" | tail -n 4
expect "second run changed nothing" grep -qE 'localhost +: ok=[0-9]+ +changed=0 ' <<<"$out"

echo "=== undo"
cleanup
expect "purged" test ! -e /etc/gryt-agent -a ! -e /etc/default/gryt-agent -a ! -e /usr/bin/gryt-agent
echo "ansible-ci: ok"
