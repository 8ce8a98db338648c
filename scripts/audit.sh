#!/usr/bin/env bash
# Checks Cargo.lock against the RustSec advisory database snapshot at ../shared/advisory-db (relative to the
# project root), offline: `cargo audit --db ../shared/advisory-db --no-fetch`. Installs cargo-audit when it is
# missing. Exits non-zero on a vulnerability; warnings (unmaintained, unsound, yanked) are printed and listed,
# each with whether docs/security.md gives its reason, but are not fatal. Skips, saying so, when the snapshot
# is absent. Online, against the public database: `cargo audit` (see docs/security.md, "Dependencies").
set -euo pipefail
cd "$(dirname "$0")/.."

db=../shared/advisory-db
if [ ! -d "$db/crates" ]; then
  echo "scripts/audit.sh: skipped: no advisory database at $db (online, run \`cargo audit\` instead)"
  exit 0
fi

if ! cargo audit --version >/dev/null 2>&1; then
  echo "scripts/audit.sh: installing cargo-audit 0.22.2 (cargo install cargo-audit --version 0.22.2 --locked)"
  # --debug and no binary scanning: 3 min instead of 6 on 2 cores; the scan still takes ~2 s.
  cargo install --quiet --debug cargo-audit --version 0.22.2 --locked --no-default-features
fi

snapshot=$(grep -o '[0-9a-f]\{40\}' "$db/SNAPSHOT" 2>/dev/null | head -n1 || true)
echo "scripts/audit.sh: cargo audit $(cargo audit --version | awk '{print $NF}') against $db (snapshot ${snapshot:0:12})"
mkdir -p target
status=0
cargo audit --db "$db" --no-fetch --json > target/cargo-audit.json 2> target/cargo-audit.err || status=$?
if [ ! -s target/cargo-audit.json ]; then
  cat target/cargo-audit.err >&2
  echo "scripts/audit.sh: cargo audit did not run (exit $status)" >&2
  exit 1
fi

# One line per finding; vulnerabilities fail the run, warnings say whether docs/security.md explains them.
python3 - target/cargo-audit.json docs/security.md <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
try:
    security = open(sys.argv[2], encoding="utf-8").read()
except OSError:
    security = ""
vulns = report.get("vulnerabilities", {}).get("list", [])
for v in vulns:
    a, p = v["advisory"], v["package"]
    fixed = ", ".join(v.get("versions", {}).get("patched", [])) or "no fixed release"
    print(f"scripts/audit.sh: VULNERABILITY {a['id']} in {p['name']} {p['version']}: {a['title']} (fixed in {fixed})")
for kind, items in sorted(report.get("warnings", {}).items()):
    for w in items:
        p = w["package"]
        a = w.get("advisory") or {}
        ident = a.get("id", "-")
        listed = "listed in docs/security.md" if ident != "-" and ident in security else \
            "NOT listed in docs/security.md: add it there with its reason"
        print(f"scripts/audit.sh: warning ({kind}) {ident} {p['name']} {p['version']}: {a.get('title', '')}; {listed}")
print(f"scripts/audit.sh: {len(vulns)} vulnerabilities, "
      f"{sum(len(i) for i in report.get('warnings', {}).values())} warnings "
      f"in {report.get('lockfile', {}).get('dependency-count', '?')} crates")
sys.exit(1 if vulns else 0)
EOF
