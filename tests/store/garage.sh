#!/usr/bin/env bash
# A single-node Garage (S3-compatible object store) on loopback for tests/it/store.rs. Garage is
# AGPL and only ever runs here as a separate test server; nothing links it.
#
#   bash tests/store/garage.sh start   starts it (if not already up), makes the bucket and a key,
#                                      and writes the connection to $GRYT_TEST_STORE_FILE
#                                      (default /tmp/gryt-test-garage/store.env)
#   bash tests/store/garage.sh stop    stops it
#
# The garage binary: $GARAGE, else `garage` on PATH, else /root/.cache/gryt-ci/garage/bin/garage
# (.ci/run builds it there once: `cargo install --locked garage --root /root/.cache/gryt-ci/garage`).
set -euo pipefail

dir=${GRYT_TEST_GARAGE_DIR:-/tmp/gryt-test-garage}
env_file=${GRYT_TEST_STORE_FILE:-$dir/store.env}
port=${GRYT_TEST_GARAGE_PORT:-39900}
garage=${GARAGE:-$(command -v garage || echo /root/.cache/gryt-ci/garage/bin/garage)}
bucket=gryt-test

g() { "$garage" -c "$dir/garage.toml" "$@"; }

write_config() {
  local secret
  secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((port + 1))"
rpc_public_addr = "127.0.0.1:$((port + 1))"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((port + 3))"
TOML
}

start() {
  if [ ! -x "$garage" ]; then
    echo "no garage binary at $garage (see the top of $0)" >&2
    return 1
  fi
  mkdir -p "$dir/meta" "$dir/data"
  [ -f "$dir/garage.toml" ] || write_config
  if ! g status >/dev/null 2>&1; then
    setsid nohup "$garage" -c "$dir/garage.toml" server >"$dir/server.log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
      g status >/dev/null 2>&1 && break
      sleep 1
    done
    if ! g status >/dev/null 2>&1; then
      echo "garage did not start:" >&2
      tail -30 "$dir/server.log" >&2
      return 1
    fi
  fi
  if g status 2>/dev/null | grep -q "NO ROLE ASSIGNED"; then
    local node
    node=$(g node id -q | cut -d@ -f1)
    g layout assign -z dc1 -c 1G "$node" >/dev/null
    g layout apply --version 1 >/dev/null
  fi
  g bucket info "$bucket" >/dev/null 2>&1 || g bucket create "$bucket" >/dev/null
  g key info gryt-test >/dev/null 2>&1 || g key create gryt-test >/dev/null
  g bucket allow --read --write --owner "$bucket" --key gryt-test >/dev/null
  local info key_id secret
  info=$(g key info gryt-test --show-secret)
  key_id=$(printf '%s\n' "$info" | sed -n 's/^Key ID: *//p' | head -1)
  secret=$(printf '%s\n' "$info" | sed -n 's/^Secret key: *//p' | head -1)
  if [ -z "$key_id" ] || [ -z "$secret" ]; then
    echo "cannot read the key from garage:" >&2
    printf '%s\n' "$info" >&2
    return 1
  fi
  (
    umask 077
    printf 'endpoint=http://127.0.0.1:%s\nregion=garage\nbucket=%s\naccess_key_id=%s\nsecret_access_key=%s\n' \
      "$port" "$bucket" "$key_id" "$secret" >"$env_file"
  )
  echo "garage up on 127.0.0.1:$port; connection in $env_file"
}

stop() {
  local pid
  pid=$(pgrep -f "garage -c $dir/garage.toml server" || true)
  if [ -n "$pid" ]; then kill $pid; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
