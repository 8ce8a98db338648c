#!/usr/bin/env bash
# pacsgate benchmark: the gateway against direct access (plain TCP and TLS), stunnel4 and socat, measured
# side by side and interleaved in one run, on loopback. Prints a table and writes it to
# bench/results/<date>-<time>.md (and the raw figures to .json). See docs/performance.md.
#
#   bench/run.sh                 full run (a few minutes)
#   bench/run.sh --smoke         tiny counts, well under a minute: checks that the benchmark still works
#   bench/run.sh --help          every option (counts, large-instance size, receiver PDU size, ...)
#
# Environment: PACSGATE_BIN=/path/to/pacsgate uses that binary instead of `cargo build --release`;
# PACSGATE_BASE_BIN=/path/to/older/pacsgate measures that build too, side by side ("pacsgate (base)").
# Installs what is missing first (as root or with sudo): Debian's dcmtk, orthanc, stunnel4, socat,
# openssl, python3; pynetdicom + pydicom from PyPI (make_dicom.py uses pydicom).
set -euo pipefail
cd "$(dirname "$0")/.."

for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    echo
    exec python3 bench/lib/bench.py --bin /bin/true --help
  fi
done

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "bench/run.sh: need root (or sudo) to install: $*" >&2; exit 1; fi
}

missing=()
[ -x /usr/bin/storescu ] || missing+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || missing+=(stunnel4)
command -v socat >/dev/null || missing+=(socat)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
command -v openssl >/dev/null || missing+=(openssl)
for arg in "$@"; do
  if [ "$arg" = "--callgrind" ] && ! command -v callgrind_control >/dev/null; then missing+=(valgrind); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench/run.sh: installing Debian packages: ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! python3 -c 'import pydicom' 2>/dev/null; then
  echo "bench/run.sh: installing pynetdicom and pydicom from PyPI"
  pkgs=("pynetdicom>=3,<4" "pydicom>=3,<4")
  python3 -m pip install -q "${pkgs[@]}" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "${pkgs[@]}"
fi

if [ -n "${PACSGATE_BIN:-}" ]; then
  bin="$PACSGATE_BIN"
else
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-target}/release/pacsgate"
fi
[ -x "$bin" ] || { echo "bench/run.sh: no pacsgate binary at $bin" >&2; exit 1; }

# 1,000 idle associations hold ~3,000 descriptors across client, gateway and relays.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true

# bench.py starts every process itself, records its PID, and kills it by PID on exit, Ctrl-C or TERM.
exec python3 bench/lib/bench.py --bin "$bin" "$@"
