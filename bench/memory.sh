#!/usr/bin/env bash
# pacsgate resource figures (docs/security.md): the gateway's idle memory after rounds of password logins
# (argon2id) and stores, its memory with 1,000 idle authenticated associations and with 5,000 pending TLS
# handshakes (at the default max_pending_connections = 256 and with it raised), per-association memory, and
# a connection flood from one address while another address is served. Loopback only; about two minutes.
#
#   bench/memory.sh                              the figures above
#   bench/memory.sh --only rounds                idle RSS after load only (--rounds 3 --round-logins 24
#                                                --round-stores 10 --idle-seconds 15 are the defaults)
#   bench/memory.sh --idle 200 --pending 1000    smaller counts
#   bench/memory.sh --json out.json              also write the figures as JSON
#
# Environment: PACSGATE_BIN=/path/to/pacsgate uses that binary instead of `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PACSGATE_BIN:-}" ]; then
  bin="$PACSGATE_BIN"
else
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-target}/release/pacsgate"
fi
[ -x "$bin" ] || { echo "bench/memory.sh: no pacsgate binary at $bin" >&2; exit 1; }

# 1,000 associations hold 3,000 descriptors (client, gateway's two legs, archive); 5,000 pending
# handshakes 10,000 (both ends) in this one process tree.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" -lt 12000 ]; then
  echo "bench/memory.sh: ulimit -n is $(ulimit -n); the figures need about 12,000 descriptors" >&2
fi
exec python3 bench/memory/driver.py --bin "$bin" "$@"
