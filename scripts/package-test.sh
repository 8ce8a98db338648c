#!/usr/bin/env bash
# Installs the Debian package on THIS machine and checks it the way an admin would use it:
#   build (scripts/package.sh), dpkg -i, files / owners / modes / conffile, the pacsgate user,
#   pacsgate --version (the commit), man -l, systemd-analyze verify, the shipped config refused by
#   `pacsgate check`, the installed binary run as the pacsgate user with a test config in /etc/pacsgate
#   in front of a pynetdicom archive, an upgrade to a rebuilt package with an association in flight and a
#   reload (SIGHUP) after it, the edited conffile and certificates kept, then dpkg --purge and what is left.
# It changes /etc, /usr, /var and the user database, so it runs only as root where dpkg exists, refuses
# to touch a pacsgate package that was installed before it, and purges what it installed on any exit.
# Skips (exit 0, one line saying why) otherwise. PACSGATE_SKIP_PACKAGE_TEST=1 skips it too.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

say() { echo "package-test: $*"; }
skip() { say "SKIPPED: $*"; exit 0; }

[ "${PACSGATE_SKIP_PACKAGE_TEST:-}" = 1 ] && skip "PACSGATE_SKIP_PACKAGE_TEST=1"
[ "$(id -u)" = 0 ] || skip "needs root (it installs the package into /etc, /usr and /var)"
command -v dpkg >/dev/null && command -v dpkg-deb >/dev/null || skip "no dpkg on this machine"
if dpkg-query -W -f='${Status}' pacsgate 2>/dev/null | grep -q 'installed'; then
  skip "a pacsgate package is already installed here; this test will not replace or purge it"
fi
getent passwd pacsgate >/dev/null && skip "a pacsgate user exists already; this test would delete it on purge"

passed=0
failed=0
ok() { passed=$((passed + 1)); say "ok: $*"; }
bad() { failed=$((failed + 1)); say "FAILED: $*"; }
check() { # check DESCRIPTION COMMAND...
  local what="$1"; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
contains() { grep -qF -- "$2" <<<"$1"; } # contains TEXT FIXED-STRING
mode_owner() { # mode_owner PATH MODE USER GROUP
  local got; got="$(stat -c '%a %U %G' "$1" 2>/dev/null || echo missing)"
  [ "$got" = "$2 $3 $4" ] || { say "  $1: $got, expected $2 $3 $4"; return 1; }
}

missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v man >/dev/null || missing+=(man-db)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
command -v adduser >/dev/null || missing+=(adduser)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -c "import pynetdicom, pydicom" 2>/dev/null || skip "pynetdicom / pydicom missing (scripts/test.sh installs them)"

work="$(mktemp -d /tmp/pacsgate-package-test.XXXXXX)"
archive_pid=""
gateway_pid=""
client_pid=""
installed=""
cleanup() {
  local rc=$?
  for pid in $client_pid $gateway_pid $archive_pid; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ -n "$installed" ] && dpkg-query -W -f='${Status}' pacsgate 2>/dev/null | grep -q 'installed\|config-files'; then
    dpkg --purge pacsgate >/dev/null 2>&1 || true
  fi
  if [ "${PACSGATE_KEEP_TMP:-}" = 1 ]; then say "kept $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { # wait_port PORT SECONDS
  local deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1).close()" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

say "building the package (scripts/package.sh), revision 1 and 2"
# cargo-deb removes other versions from target/debian: keep each in the work folder.
deb1="$(scripts/package.sh --fast --profile "${PACSGATE_PACKAGE_PROFILE:-release}" --revision 1 | tail -n1)"
cp "$deb1" "$work/" && deb1="$work/$(basename "$deb1")"
deb2="$(scripts/package.sh --fast --profile "${PACSGATE_PACKAGE_PROFILE:-release}" --revision 2 | tail -n1)"
cp "$deb2" "$work/" && deb2="$work/$(basename "$deb2")"
commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
version="$(dpkg-deb -f "$deb1" Version)"

# ---- install ---------------------------------------------------------------------------------------
say "dpkg -i $(basename "$deb1")"
installed=1
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb1" </dev/null >"$work/install.log" 2>&1 || { cat "$work/install.log"; bad "dpkg -i"; exit 1; }
ok "dpkg -i $(basename "$deb1")"
check "postinst says the service is installed, not enabled" grep -q "installed, not enabled" "$work/install.log"

check "/usr/bin/pacsgate 755 root" mode_owner /usr/bin/pacsgate 755 root root
check "/etc/pacsgate/pacsgate.toml 640 root:pacsgate" mode_owner /etc/pacsgate/pacsgate.toml 640 root pacsgate
check "/etc/pacsgate/certs 700 pacsgate:pacsgate" mode_owner /etc/pacsgate/certs 700 pacsgate pacsgate
check "/var/lib/pacsgate 750 pacsgate:pacsgate" mode_owner /var/lib/pacsgate 750 pacsgate pacsgate
check "/var/log/pacsgate 750 pacsgate:pacsgate" mode_owner /var/log/pacsgate 750 pacsgate pacsgate
check "the unit in /usr/lib/systemd/system" mode_owner /usr/lib/systemd/system/pacsgate.service 644 root root
check "/etc/pacsgate/pacsgate.toml is a conffile" \
  sh -c "dpkg-query -W -f='\${Conffiles}' pacsgate | grep -q '^ /etc/pacsgate/pacsgate.toml '"
man_ok=1
for cmd in "" -run -check -hash-password -certs -token -demo -echo -find -connect -probe; do
  [ -f "/usr/share/man/man1/pacsgate$cmd.1.gz" ] || { say "  missing man page pacsgate$cmd.1.gz"; man_ok=0; }
done
check "a man page per command" [ "$man_ok" = 1 ]
check "no man page of the hidden package-assets command" [ ! -e /usr/share/man/man1/pacsgate-package-assets.1.gz ]
check "bash, zsh and fish completions" test -s /usr/share/bash-completion/completions/pacsgate \
  -a -s /usr/share/zsh/vendor-completions/_pacsgate -a -s /usr/share/fish/vendor_completions.d/pacsgate.fish
check "the bash completion offers the commands" grep -q 'hash-password' /usr/share/bash-completion/completions/pacsgate
doc_ok=1
for f in README.md conformance.md security-overview.md configuration.md operations.md audit.md certs-README.md examples/pacsgate.toml; do
  [ -s "/usr/share/doc/pacsgate/$f" ] || { say "  missing /usr/share/doc/pacsgate/$f"; doc_ok=0; }
done
check "/usr/share/doc/pacsgate has the docs" [ "$doc_ok" = 1 ]

passwd="$(getent passwd pacsgate || true)"
uid="$(echo "$passwd" | cut -d: -f3)"
check "user pacsgate: a system user (uid $uid < 1000)" test "${uid:-1000}" -lt 1000
check "user pacsgate: home /var/lib/pacsgate, shell nologin" contains "$passwd" ":/var/lib/pacsgate:/usr/sbin/nologin"
check "group pacsgate exists" sh -c "getent group pacsgate >/dev/null"

out="$(/usr/bin/pacsgate --version)"
check "pacsgate --version names version and commit: $out" \
  grep -Eq "^pacsgate ${version%-*} \(commit ${commit}(-dirty)?\)$" <<<"$out"
check "man -l pacsgate-run.1.gz renders" sh -c "man -l /usr/share/man/man1/pacsgate-run.1.gz 2>/dev/null | grep -q 'pacsgate-run - Run the gateway'"
if systemd-analyze verify /usr/lib/systemd/system/pacsgate.service >"$work/verify.log" 2>&1; then
  ok "systemd-analyze verify pacsgate.service"
else
  cat "$work/verify.log"; bad "systemd-analyze verify pacsgate.service"
fi
check "the unit is not enabled by the install" sh -c '! ls /etc/systemd/system/*.wants/pacsgate.service 2>/dev/null'
if /usr/bin/pacsgate check --config /etc/pacsgate/pacsgate.toml >"$work/check0.log" 2>&1; then
  bad "pacsgate check accepts the shipped, unedited config"
else
  check "pacsgate check refuses the shipped config, naming the missing certificate" \
    grep -q "/etc/pacsgate/certs/server.crt" "$work/check0.log"
fi

# ---- configure it as an admin would, run the installed binary ------------------------------------------
archive_port="$(free_port)"
gw_port="$(free_port)"
admin_port="$(free_port)"
python3 tests/peers/archive.py --port "$archive_port" --aet PKGARCHIVE --record "$work/archive.jsonl" \
  >"$work/archive.log" 2>&1 &
archive_pid=$!
runuser -u pacsgate -- /usr/bin/pacsgate certs --out /etc/pacsgate/certs --host localhost --host 127.0.0.1 \
  >"$work/certs.log" 2>&1 || { cat "$work/certs.log"; bad "pacsgate certs as the pacsgate user"; exit 1; }
check "server key made by the pacsgate user: 600 pacsgate" mode_owner /etc/pacsgate/certs/server.key 600 pacsgate pacsgate
hash="$(printf '%s' 'package-test-password' | /usr/bin/pacsgate hash-password)"
python3 - "$gw_port" "$admin_port" "$archive_port" "$hash" <<'EOF'
import re, sys
gw, admin, archive, hash_ = sys.argv[1:]
path = "/etc/pacsgate/pacsgate.toml"
text = open(path).read()
text = text.replace('listen = "0.0.0.0:2762"', f'listen = "127.0.0.1:{gw}"')
text = text.replace('listen = "127.0.0.1:9090"', f'listen = "127.0.0.1:{admin}"')
text = text.replace('address = "archive.invalid:104"    # REPLACE: host:port of your archive',
                    f'address = "127.0.0.1:{archive}"')
text = text.replace('ae_title = "PACS"', 'ae_title = "PKGARCHIVE"')
text = text.replace('allow = ["echo", "find", "get", "move"]', 'allow = ["echo", "find", "get", "move", "store"]')
text += f'\n[[user]]\nname = "pkgtest"\npassword_hash = "{hash_}"\nroles = ["reader"]\n'
open(path, "w").write(text)
EOF
conf_sum="$(sha256sum /etc/pacsgate/pacsgate.toml | cut -d' ' -f1)"
certs_sum="$(cat /etc/pacsgate/certs/* | sha256sum | cut -d' ' -f1)"
wait_port "$archive_port" 30 || { cat "$work/archive.log"; bad "the test archive did not start"; exit 1; }
if runuser -u pacsgate -- /usr/bin/pacsgate check --config /etc/pacsgate/pacsgate.toml >"$work/check1.log" 2>&1; then
  ok "pacsgate check (as the pacsgate user) accepts the edited config"
else
  cat "$work/check1.log"; bad "pacsgate check of the edited config"
fi
# setpriv execs (runuser would stay the parent, and not pass SIGHUP on): $! is the gateway itself.
setpriv --reuid=pacsgate --regid=pacsgate --init-groups -- /usr/bin/pacsgate run --config /etc/pacsgate/pacsgate.toml \
  >"$work/gateway.log" 2>&1 &
gateway_pid=$!
if ! wait_port "$gw_port" 30; then cat "$work/gateway.log"; bad "the installed gateway did not listen"; exit 1; fi
ok "the installed binary runs as the pacsgate user with /etc/pacsgate/pacsgate.toml"

dcm="$(python3 tests/peers/make_dicom.py small --out "$work/dcm" --spec '[{"patient_id": "PKG1", "patient_name": "PACKAGE^TEST", "instances": 2}]')"
first="$(echo "$dcm" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["path"])')"
second="$(echo "$dcm" | python3 -c 'import json,sys; print(json.load(sys.stdin)[1]["path"])')"
first_uid="$(echo "$dcm" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["sop_uid"])')"
second_uid="$(echo "$dcm" | python3 -c 'import json,sys; print(json.load(sys.stdin)[1]["sop_uid"])')"
scu=(python3 tests/peers/scu.py)
out="$("${scu[@]}" store --port "$gw_port" --aec PACS --tls-ca /etc/pacsgate/certs/ca.crt \
  --user pkgtest --password package-test-password "$first")"
check "C-STORE through the installed gateway answered 0x0000" contains "$out" '"statuses": [0]'
check "the archive received that instance" grep -q "$first_uid" "$work/archive.jsonl"
out="$("${scu[@]}" echo --port "$gw_port" --aec PACS --tls-ca /etc/pacsgate/certs/ca.crt \
  --user pkgtest --password wrong-password)"
check "a wrong password is rejected 1/2/1" contains "$out" '"result": 1, "source": 2, "reason": 1'
check "audit trail written to /var/log/pacsgate/audit.jsonl, 600 pacsgate" \
  mode_owner /var/log/pacsgate/audit.jsonl 600 pacsgate pacsgate
check "the audit trail has the store" grep -q "\"sop_instance_uid\":\"$first_uid\"" /var/log/pacsgate/audit.jsonl

# ---- upgrade with an association in flight, then a reload -----------------------------------------------
# One association: C-STORE, wait for the go file (upgrade + SIGHUP happen meanwhile), C-STORE, release.
cat >"$work/inflight.py" <<'EOF'
import json, os, ssl, sys, time
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
port, ca, go, first, second = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
ds1, ds2 = dcmread(first), dcmread(second)
ae = AE(ae_title="INFLIGHT")
ae.add_requested_context(ds1.SOPClassUID, ds1.file_meta.TransferSyntaxUID)
ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
ctx.check_hostname = False
uid = UserIdentityNegotiation()
uid.user_identity_type = 2
uid.primary_field = b"pkgtest"
uid.secondary_field = b"package-test-password"
assoc = ae.associate("127.0.0.1", int(port), ae_title="PACS", ext_neg=[uid], tls_args=(ctx, None))
result = {"associated": assoc.is_established, "statuses": []}
if assoc.is_established:
    result["statuses"].append(int(assoc.send_c_store(ds1).Status))
    print("first store done", flush=True, file=sys.stderr)
    deadline = time.time() + 180
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.2)
    st = assoc.send_c_store(ds2)
    result["statuses"].append(int(st.Status) if "Status" in st else None)
    assoc.release()
    result["released"] = assoc.is_released
print(json.dumps(result), flush=True)
EOF
python3 "$work/inflight.py" "$gw_port" /etc/pacsgate/certs/ca.crt "$work/go" "$first" "$second" \
  >"$work/inflight.json" 2>"$work/inflight.log" &
client_pid=$!
deadline=$((SECONDS + 30))
until grep -q "first store done" "$work/inflight.log" 2>/dev/null || [ $SECONDS -ge $deadline ]; do sleep 0.2; done
check "an association is in flight (first C-STORE done)" grep -q "first store done" "$work/inflight.log"

say "dpkg -i $(basename "$deb2") (upgrade, the association still open)"
if DEBIAN_FRONTEND=noninteractive dpkg -i "$deb2" </dev/null >"$work/upgrade.log" 2>&1; then
  ok "dpkg -i $(basename "$deb2") upgrades without a conffile prompt"
else
  cat "$work/upgrade.log"; bad "dpkg -i of the rebuilt package"
fi
check "the package is now revision 2" sh -c "dpkg-query -W -f='\${Version}' pacsgate | grep -q -- '-2$'"
check "the edited conffile survived the upgrade" \
  sh -c "[ \"\$(sha256sum /etc/pacsgate/pacsgate.toml | cut -d' ' -f1)\" = '$conf_sum' ]"
check "the conffile is still 640 root:pacsgate" mode_owner /etc/pacsgate/pacsgate.toml 640 root pacsgate
check "the certificates and keys survived the upgrade" \
  sh -c "[ \"\$(cat /etc/pacsgate/certs/* | sha256sum | cut -d' ' -f1)\" = '$certs_sum' ]"
check "the gateway still runs after the upgrade" kill -0 "$gateway_pid"
check "the running gateway is the installed binary, as user pacsgate" \
  sh -c "[ \"\$(ps -o user=,comm= -p $gateway_pid)\" = 'pacsgate pacsgate' ]"
kill -HUP "$gateway_pid"
deadline=$((SECONDS + 20))
until grep -q "configuration reloaded" "$work/gateway.log" || [ $SECONDS -ge $deadline ]; do sleep 0.2; done
check "SIGHUP after the upgrade: configuration reloaded" grep -q "configuration reloaded" "$work/gateway.log"
touch "$work/go"
deadline=$((SECONDS + 60))
while kill -0 "$client_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
client_pid=""
say "  in-flight association: $(cat "$work/inflight.json")"
check "the association in flight stored its second instance and released" \
  contains "$(cat "$work/inflight.json")" '"statuses": [0, 0], "released": true'
check "the archive received the second instance" grep -q "$second_uid" "$work/archive.jsonl"
kill -TERM "$gateway_pid"
deadline=$((SECONDS + 60))
while kill -0 "$gateway_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
check "the gateway stopped on SIGTERM" sh -c "! kill -0 $gateway_pid 2>/dev/null"
gateway_pid=""

# ---- remove, then purge ----------------------------------------------------------------------------------
dpkg --remove pacsgate >"$work/remove.log" 2>&1 || { cat "$work/remove.log"; bad "dpkg --remove"; }
check "remove: the binary is gone" [ ! -e /usr/bin/pacsgate ]
check "remove: config, certificates, logs and user stay" \
  sh -c "[ -f /etc/pacsgate/pacsgate.toml ] && [ -f /etc/pacsgate/certs/server.key ] && [ -f /var/log/pacsgate/audit.jsonl ] && getent passwd pacsgate >/dev/null"
dpkg --purge pacsgate >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; bad "dpkg --purge"; }
left=()
for p in /usr/bin/pacsgate /etc/pacsgate /var/lib/pacsgate /var/log/pacsgate /usr/share/doc/pacsgate \
  /usr/lib/systemd/system/pacsgate.service /usr/share/man/man1/pacsgate.1.gz \
  /usr/share/bash-completion/completions/pacsgate; do
  [ -e "$p" ] && left+=("$p")
done
check "purge: no file or directory left (${left[*]:-none})" [ ${#left[@]} = 0 ]
check "purge: user and group pacsgate gone" sh -c '! getent passwd pacsgate && ! getent group pacsgate'
check "purge: no stat override left" sh -c '! dpkg-statoverride --list | grep -q pacsgate'
check "purge: dpkg knows no pacsgate package" sh -c "! dpkg-query -W -f='\${Status}' pacsgate 2>/dev/null | grep -q 'installed\|config-files'"
installed=""

echo "package-test: $passed passed, $failed failed"
[ "$failed" = 0 ]
