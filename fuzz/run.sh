#!/usr/bin/env bash
# Builds the fuzz targets once and runs each for a short, fixed time (CI's fuzz smoke run).
# Fails when any target crashes, panics, runs out of memory (-rss_limit_mb) or hangs (-timeout).
#
#   bash fuzz/run.sh                       every target, FUZZ_SECONDS (default 20) each
#   FUZZ_SECONDS=300 bash fuzz/run.sh log_chunks
#
# Runs on stable Rust: `--sanitizer none` makes cargo-fuzz pass only stable flags (SanitizerCoverage
# via -Cpasses=sancov-module and -Cllvm-args), so libFuzzer still gets coverage feedback; what is
# lost is AddressSanitizer, which safe Rust needs least. The corpus grows in fuzz/corpus/<target>
# (git-ignored) from the committed seeds in fuzz/seeds/<target>; a failing input is saved in
# fuzz/artifacts/<target>/ and can be replayed with `fuzz/target/<triple>/release/<target> FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

seconds=${FUZZ_SECONDS:-20}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(job_spec_json yaml_pipeline token_decrypt log_chunks)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  t0=$SECONDS
  cargo install cargo-fuzz --locked
  echo "cargo-fuzz installed in $((SECONDS - t0)) s"
fi

# One build for all targets (they share fuzz/target). The library is built without its `runtime`
# feature (no Docker, HTTP or git crates), so only the pure modules and their few dependencies get
# coverage instrumentation; `--codegen-units 16` (cargo-fuzz defaults to 1) and opt-level 1 for
# dependencies (fuzz/Cargo.toml) keep that affordable on 2 cores.
t0=$SECONDS
cargo fuzz build --sanitizer none --codegen-units 16
echo "fuzz build: $((SECONDS - t0)) s"

triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$triple/release
failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log=fuzz/artifacts/$t/last-run.log
  rc=0
  "$bin_dir/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" \
    -max_total_time="$seconds" -rss_limit_mb=512 -max_len=65536 \
    -timeout=10 -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  corpus=$(ls "fuzz/corpus/$t" | wc -l)
  if [ $rc -eq 0 ]; then
    summary+=("fuzz $t: ok, ${runs:-? runs}, $cov, corpus $corpus")
  else
    failed+=("$t")
    summary+=("fuzz $t: FAILED (exit $rc), see $log")
    echo "--- $t failed; the end of its log:"
    tail -40 "$log"
  fi
done
printf '%s\n' "${summary[@]}"
[ ${#failed[@]} -eq 0 ] || { echo "fuzz targets failed: ${failed[*]}"; exit 1; }
