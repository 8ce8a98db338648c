#!/usr/bin/env bash
# Builds the Debian package: target/debian/pacsgate_VERSION-REVISION_ARCH.deb (path printed last).
#   scripts/package.sh                  release build, man pages, completions, then cargo-deb
#   scripts/package.sh --revision 2     another Debian revision of the same version (e.g. an upgrade test)
#   scripts/package.sh --fast           quicker, larger compression (tests)
# Needs cargo-deb (installed with `cargo install cargo-deb --locked` when missing) and dpkg-dev
# (dpkg-shlibdeps, for the Depends line). PACSGATE_COMMIT overrides the commit in --version (a build
# outside git).
set -euo pipefail
cd "$(dirname "$0")/.."

revision=1
fast=()
while [ $# -gt 0 ]; do
  case "$1" in
    --revision) revision="${2:?--revision needs a value}"; shift 2 ;;
    --fast) fast=(--fast); shift ;;
    *) echo "scripts/package.sh: unknown argument $1 (use --revision N, --fast)" >&2; exit 2 ;;
  esac
done

if ! cargo deb --version >/dev/null 2>&1; then
  echo "scripts/package.sh: installing cargo-deb (cargo install cargo-deb --locked)"
  cargo install cargo-deb --locked --quiet
fi
if ! command -v dpkg-shlibdeps >/dev/null; then
  echo "scripts/package.sh: dpkg-shlibdeps missing: apt-get install dpkg-dev" >&2
  exit 1
fi

target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
cargo build --release --locked --quiet
assets="$target_dir/release/package-assets"
rm -rf "$assets"
"$target_dir/release/pacsgate" package-assets --out "$assets" >/dev/null
# Man pages gzipped, without a timestamp (Debian policy 12.1; reproducible).
gzip -9n "$assets"/man/*.1

# The binary stripped; its line tables (profile.release debug) go to a -dbgsym .ddeb beside it.
cargo deb --no-build --dbgsym "${fast[@]}" --deb-revision "$revision" --output "$target_dir/debian/" >/dev/null
version="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')"
arch="$(dpkg --print-architecture)"
deb="$target_dir/debian/pacsgate_${version}-${revision}_${arch}.deb"
[ -f "$deb" ] || { echo "scripts/package.sh: cargo-deb did not write $deb" >&2; exit 1; }
echo "$deb"
