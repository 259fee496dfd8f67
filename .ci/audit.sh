#!/usr/bin/env bash
# Dependency audit with cargo-deny (deny.toml): advisories, licenses, bans, sources.
#
# CI cannot fetch the RustSec advisory DB, so this uses the plain-file copy in
# ../shared/advisory-db (override with GRYT_ADVISORY_DB=DIR): cargo-deny only reads a DB that is a
# git repo at the place where it keeps its clone, so a throwaway git repo of the copy is made
# there (under target/, fresh on every run), and cargo-deny runs with --offline.
#
#   bash .ci/audit.sh               the audit; fails on any advisory, banned crate, license or source
#   bash .ci/audit.sh --self-test   first proves that a new advisory fails the audit (a fake one for
#                                   a crate in the tree, in a copy of the DB), then the audit
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

db_src=${GRYT_ADVISORY_DB:-../shared/advisory-db}
self_test=
case "${1:-}" in
  "") ;;
  --self-test) self_test=1 ;;
  *) echo "usage: $0 [--self-test]" >&2; exit 2 ;;
esac

if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "installing cargo-deny"
  t0=$SECONDS
  cargo install cargo-deny --locked
  echo "cargo-deny installed in $((SECONDS - t0)) s"
fi
cargo deny --version

[ -d "$db_src/crates" ] || { echo "no advisory DB at $db_src (expected a crates/ directory)" >&2; exit 1; }

# cargo-deny reads the crate graph with `cargo metadata --offline`: the sources must be local.
cargo fetch --locked --quiet

deny() { cargo deny --offline --locked "$@"; }

# Where cargo-deny looks for its clone of the DB URL in deny.toml (`<db-path>/<name>-<hash>`):
# asked of cargo-deny itself rather than re-implementing its hashing.
db_dir=$(deny -L debug check advisories 2>&1 |
  sed -n "s/.*Opening advisory database at '\(.*\)'.*/\1/p" || true)
db_dir=${db_dir%%$'\n'*}
case "$db_dir" in
  target/*) ;;
  *) echo "cannot tell where cargo-deny expects its advisory DB (got '$db_dir')" >&2; exit 1 ;;
esac

snapshot_date=$(sed -n 's/^date //p' "$db_src/SNAPSHOT" 2>/dev/null || true)

# make_db SRC: installs a git repo holding SRC's files at $db_dir.
make_db() {
  rm -rf "$db_dir"
  mkdir -p "$db_dir"
  cp -R "$1/." "$db_dir/"
  chmod -R u+w "$db_dir"
  (
    cd "$db_dir"
    export GIT_AUTHOR_DATE="${snapshot_date:-now}" GIT_COMMITTER_DATE="${snapshot_date:-now}"
    git init -q -b main
    git add -A
    git -c user.name=audit -c user.email=audit@localhost -c commit.gpgsign=false \
      commit -q -m "advisory-db snapshot"
  )
}

if [ -n "$self_test" ]; then
  echo "=== self-test: a new advisory must fail the audit"
  crate=itoa
  version=$(awk -v c="$crate" '$1=="name" && $3=="\""c"\"" {getline; gsub(/"/,"",$3); print $3; exit}' Cargo.lock)
  [ -n "$version" ] || { echo "self-test: $crate is not in Cargo.lock" >&2; exit 1; }
  fake_id=RUSTSEC-2099-0001
  fake=$(mktemp -d)
  trap 'rm -rf "$fake"' EXIT
  cp -R "$db_src/." "$fake/"
  chmod -R u+w "$fake"
  mkdir -p "$fake/crates/$crate"
  cat >"$fake/crates/$crate/$fake_id.md" <<EOF
\`\`\`toml
[advisory]
id = "$fake_id"
package = "$crate"
date = "$(date -u +%Y-%m-%d)"
url = "https://example.invalid/$fake_id"
categories = ["memory-corruption"]

[versions]
patched = ["> $version"]
\`\`\`

# Fake advisory for the audit's self-test

Affects $crate up to and including $version, the version in Cargo.lock.
EOF
  make_db "$fake"
  set +e
  out=$(deny check advisories 2>&1)
  rc=$?
  set -e
  if [ $rc -eq 0 ] || ! grep -q "$fake_id" <<<"$out"; then
    echo "$out"
    echo "self-test FAILED: the audit passed with a fake advisory for $crate $version" >&2
    exit 1
  fi
  grep -E "error\[vulnerability\]|$fake_id" <<<"$out" | head -3
  echo "self-test ok: a new advisory for $crate $version fails the audit (exit $rc)"
  echo "=== the audit, with the real DB"
fi

make_db "$db_src"
# cargo-deny's staleness check sees a fresh clone; say how old the snapshot really is.
age=$(( ($(date -u +%s) - $(git -C "$db_dir" log -1 --format=%ct)) / 86400 ))
echo "advisory DB: $db_src, snapshot of ${snapshot_date:-unknown date} ($age days old)," \
  "$(find "$db_src/crates" -name '*.md' | wc -l) advisories"

set +e
out=$(deny check 2>&1)
rc=$?
set -e
echo "$out"
dups=$(grep -c 'warning\[duplicate\]' <<<"$out" || true)
echo "audit: exit $rc; $dups crates with duplicate versions (warned, not denied)"
exit $rc
