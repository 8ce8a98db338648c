#!/usr/bin/env bash
# Runs pacsgate's fuzz targets (fuzz/, cargo-fuzz + libFuzzer on nightly Rust) for a bounded time each.
#
#   scripts/fuzz.sh                  every target, 60 s each
#   scripts/fuzz.sh 600              every target, 10 minutes each
#   scripts/fuzz.sh 30 association   one target, 30 s
#   scripts/fuzz.sh --list           the targets
#
# Seeds: fuzz/corpus/<target>/ (from fuzz/seeds/capture.py, real DCMTK / pynetdicom / Orthanc traffic).
# What libFuzzer adds goes to fuzz/work/<target>/ (not committed). Crashes, OOMs (over 2 GiB) and hangs
# (over 10 s for one input) are written to fuzz/artifacts/<target>/ and fuzzing goes on (fork mode), so
# one known bug does not hide the next. Prints executions and findings per target; exits 1 when a run
# found something. Not in CI's default path: it needs nightly Rust and minutes per target.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(pdu_framing association user_identity jwt_claims dimse_command dimse_identifier identifier_structure pdv_reassembly)
if [ "${1:-}" = "--list" ]; then printf '%s\n' "${targets[@]}"; exit 0; fi
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
seconds="${1:-60}"
shift || true
[ $# -gt 0 ] && targets=("$@")
case "$seconds" in ''|*[!0-9]*) echo "scripts/fuzz.sh: seconds must be a number, got '$seconds'" >&2; exit 2;; esac

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "scripts/fuzz.sh: installing the nightly toolchain (libFuzzer needs -Z flags)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-fuzz/target}"
cargo +nightly fuzz build -O --fuzz-dir fuzz

summary="fuzz/work/summary-$(date +%Y%m%d-%H%M%S).txt"
mkdir -p fuzz/work
printf '%-18s %8s %12s %10s  %s\n' target seconds executions exec/s "oom/timeout/crash" | tee "$summary"
found=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
  before=$(find "fuzz/artifacts/$t" -type f | wc -l)
  log="fuzz/work/$t.log"
  start=$(date +%s)
  # Bounded twice: libFuzzer's own clock, and a hard kill a minute later.
  timeout --signal=INT --kill-after=30 $((seconds + 60)) \
    cargo +nightly fuzz run -O --fuzz-dir fuzz "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
      -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 -print_final_stats=1 \
      >"$log" 2>&1 || true
  took=$(( $(date +%s) - start ))
  last=$(grep -E '^#[0-9]+:' "$log" | tail -n1 || true)
  execs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$last")
  fails=$(sed -nE 's/.*oom\/timeout\/crash: ([0-9]+\/[0-9]+\/[0-9]+).*/\1/p' <<<"$last")
  after=$(find "fuzz/artifacts/$t" -type f | wc -l)
  [ "$after" -gt "$before" ] && found=1
  printf '%-18s %8s %12s %10s  %s\n' "$t" "$took" "${execs:-?}" "$(( ${execs:-0} / (took > 0 ? took : 1) ))" \
    "${fails:-0/0/0} (new artifacts: $((after - before)))" | tee -a "$summary"
done
echo "logs: fuzz/work/<target>.log; findings: fuzz/artifacts/<target>/; summary: $summary"
if [ "$found" = 1 ]; then
  echo "scripts/fuzz.sh: new findings; reproduce one with: cargo +nightly fuzz run -O --fuzz-dir fuzz TARGET fuzz/artifacts/TARGET/FILE"
  exit 1
fi
