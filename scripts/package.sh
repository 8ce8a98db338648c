#!/usr/bin/env bash
# Builds the Debian package: target/debian/pacsgate_VERSION-REVISION_ARCH.deb (path printed last).
#   scripts/package.sh                  release build, man pages, completions, then cargo-deb
#   scripts/package.sh --revision 2     another Debian revision of the same version (e.g. an upgrade test)
#   scripts/package.sh --fast           quicker, larger compression (tests)
#   scripts/package.sh --profile dev    package the debug build (tests: no release build; never ship it)
# Needs cargo-deb (installed with `cargo install cargo-deb --version 3.8.0 --locked` when missing) and dpkg-dev
# (dpkg-shlibdeps, for the Depends line). PACSGATE_COMMIT overrides the commit in --version (a build
# outside git).
set -euo pipefail
cd "$(dirname "$0")/.."

revision=1
fast=()
profile=release
while [ $# -gt 0 ]; do
  case "$1" in
    --revision) revision="${2:?--revision needs a value}"; shift 2 ;;
    --fast) fast=(--fast); shift ;;
    --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
    *) echo "scripts/package.sh: unknown argument $1 (use --revision N, --fast, --profile P)" >&2; exit 2 ;;
  esac
done

if ! cargo deb --version >/dev/null 2>&1; then
  echo "scripts/package.sh: installing cargo-deb 3.8.0 (cargo install cargo-deb --version 3.8.0 --locked)"
  cargo install cargo-deb --version 3.8.0 --locked --quiet
fi
if ! command -v dpkg-shlibdeps >/dev/null; then
  echo "scripts/package.sh: dpkg-shlibdeps missing: apt-get install dpkg-dev" >&2
  exit 1
fi

target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
cargo build --profile "$profile" --locked --quiet
out_dir="$target_dir/$([ "$profile" = dev ] && echo debug || echo "$profile")"
assets="$out_dir/package-assets"
rm -rf "$assets"
"$out_dir/pacsgate" package-assets --out "$assets" >/dev/null
# Man pages gzipped, without a timestamp (Debian policy 12.1; reproducible).
gzip -9n "$assets"/man/*.1

# The binary stripped; its line tables (profile.release debug) go to a -dbgsym .ddeb beside it.
cargo deb --no-build --profile "$profile" --dbgsym "${fast[@]}" --deb-revision "$revision" --output "$target_dir/debian/" >/dev/null
version="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')"
arch="$(dpkg --print-architecture)"
deb="$target_dir/debian/pacsgate_${version}-${revision}_${arch}.deb"
[ -f "$deb" ] || { echo "scripts/package.sh: cargo-deb did not write $deb" >&2; exit 1; }
echo "$deb"
