#!/usr/bin/env python3
"""pacsgate benchmark: the gateway side by side with direct access, a TLS tunnel (stunnel4) and a plain
TCP relay (socat), interleaved in one run. Called by bench/run.sh (which installs the peers and builds
the gateway); run `bench/run.sh --help` for the options.

Paths (columns of the table):
  direct TCP   the client talks to the receiver's plain port
  direct TLS   the client talks TLS to a TLS-capable receiver (storescp +tls, Orthanc DicomTlsEnabled)
  stunnel      stunnel4 terminates TLS in front of the plain receiver
  socat        a plain TCP relay in front of the plain receiver
  pacsgate     the gateway: TLS + JWT (User Identity type 5), policy on, in front of the plain receiver

Receivers: DCMTK storescp --ignore (receives and discards; single-process for one-at-a-time workloads,
--fork for the concurrent one), Orthanc 1.10 (a real archive: C-FIND, and C-STORE onto disk), and an
asyncio acceptor (dicom_ul.py hold) for the idle-association memory test.

Every child process is started here, recorded by PID, and killed by PID on exit (also on Ctrl-C / TERM).
Everything listens and connects on 127.0.0.1 only, except that storescp and Orthanc have no bind-address
option and listen on all interfaces: nothing but loopback clients ever connect to them.
"""

import argparse
import concurrent.futures
import datetime
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DICOM_UL = os.path.join(HERE, "dicom_ul.py")
MAKE_DICOM = os.path.join(REPO, "tests", "peers", "make_dicom.py")
MEMORY_DRIVER = os.path.join(REPO, "bench", "memory", "driver.py")

CLIENT_PROCESSES = 4  # for workload (5)
PATHS = ["direct", "direct_tls", "stunnel", "socat", "pacsgate"]
PATH_NAMES = {"direct": "direct TCP", "direct_tls": "direct TLS", "stunnel": "stunnel",
              "socat": "socat", "pacsgate": "pacsgate"}
# The gateways under test: "pacsgate" (--bin), and "pacsgate_base" when --base-bin (PACSGATE_BASE_BIN) names an
# earlier build to compare against, side by side in the same run (same config, same peers, interleaved).
GATEWAYS = ["pacsgate"]


def add_base_gateway():
    PATHS.append("pacsgate_base")
    PATH_NAMES["pacsgate_base"] = "pacsgate (base)"
    GATEWAYS.append("pacsgate_base")

# The smoke run's concurrent workloads open more associations at once from one address than any default
# per-address bound of the gateway (max_pending_per_address: at most 32), so that a default that resets a
# burst fails scripts/test.sh. (A password burst in a debug build is kept small: argon2id takes ~0.6 s there.)
FULL = dict(small=1000, large_mb=200, setup=500, password=100, finds=500, concurrent=200,
            per_assoc=20, idle=1000, archive_small=300, rounds=5, memory_rounds=3, memory_logins=24,
            burst=1000, burst_per_assoc=5, burst_rounds=3, password_burst=100)
SMOKE = dict(small=20, large_mb=4, setup=20, password=4, finds=20, concurrent=48,
             per_assoc=2, idle=20, archive_small=10, rounds=1, memory_rounds=1, memory_logins=4,
             burst=80, burst_per_assoc=1, burst_rounds=1, password_burst=4)
# The largest default per-address bound of the gateway; the smoke run checks that it opens more than this.
DEFAULT_PER_ADDRESS_BOUND = 32
BURST_ADDRESSES = 8  # workload (8): 127.0.0.1 .. 127.0.0.8


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


# ---------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Children started by the benchmark, killed by PID (and their own process group) on exit."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []  # (name, Popen)

    def start(self, name, argv, env=None, cwd=None, drop_env=()):
        logf = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        for k in drop_env:
            full_env.pop(k, None)
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=full_env, cwd=cwd or self.workdir, start_new_session=True)
        logf.close()
        self.procs.append((name, p))
        return p

    def log_tail(self, name, lines=20):
        try:
            with open(os.path.join(self.workdir, f"{name}.log"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def stop(self, p, grace=5.0):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        # Children a forking server left behind (storescp --fork, socat fork): the process group
        # this script created for it, named by the child's own PID.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self):
        for name, p in reversed(self.procs):
            try:
                self.stop(p, grace=8.0 if name.startswith("orthanc") else 3.0)
            except Exception as e:  # keep cleaning up
                log(f"stopping {name} (pid {p.pid}): {e}")
        self.procs = []


def free_port():
    # Asked of the wildcard address, so that the port is free on every address: storescp (DCMTK)
    # listens on all of them, and a port free on 127.0.0.1 may be some 127.0.x.y client's local
    # port ("Address already in use" then, seen once). Nothing is sent; the socket closes at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def listening_ports():
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A":  # LISTEN
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def wait_listening(procs, name, p, ports, timeout=30.0):
    """Wait until every port listens (read from /proc: no probe connection reaches the server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{procs.log_tail(name)}")
        if set(ports) <= listening_ports():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {ports} within {timeout}s:\n{procs.log_tail(name)}")


def run(argv, timeout, env=None, input_bytes=None, check=True):
    full_env = dict(os.environ)
    full_env.update(env or {})
    r = subprocess.run(argv, capture_output=True, timeout=timeout, env=full_env, input=input_bytes)
    if check and r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")
    return r


def first_line(argv):
    try:
        r = subprocess.run(argv, capture_output=True, timeout=20)
        text = (r.stdout + r.stderr).decode(errors="replace")
        for line in text.splitlines():
            line = line.strip().strip("$").strip()
            if line and not line.startswith("Initializing"):
                return line
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "?"


# ---------------------------------------------------------------------------------------------
# Setup: certificates, token, data, configurations


class Env:
    pass


def make_credentials(e):
    certs = os.path.join(e.dir, "certs")
    run([e.bin, "certs", "--out", certs, "--client", "benchuser"], 60)
    e.ca = os.path.join(certs, "ca.crt")
    e.server_crt = os.path.join(certs, "server.crt")
    e.server_key = os.path.join(certs, "server.key")
    e.client_crt = os.path.join(certs, "benchuser.crt")
    e.client_key = os.path.join(certs, "benchuser.key")
    e.jwt_key = os.path.join(certs, "jwt-signing.key")
    e.jwt_pub = os.path.join(certs, "jwt-public.pem")
    ec = run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout"], 30).stdout
    pk8 = run(["openssl", "pkcs8", "-topk8", "-nocrypt"], 30, input_bytes=ec).stdout
    with open(e.jwt_key, "wb") as f:
        f.write(pk8)
    os.chmod(e.jwt_key, 0o600)
    pub = run(["openssl", "ec", "-pubout"], 30, input_bytes=pk8).stdout
    with open(e.jwt_pub, "wb") as f:
        f.write(pub)
    token = run([e.bin, "token", "--key", e.jwt_key, "--sub", "bench.jwt", "--roles", "bench",
                 "--iss", "pacsgate-bench", "--aud", "pacsgate", "--ttl", "6h"], 60).stdout.decode().strip()
    e.jwt_file = os.path.join(e.dir, "token.jwt")
    with open(e.jwt_file, "w") as f:
        f.write(token)  # no newline: DCMTK sends the file as it is
    e.password = "bench-password-0123456789"
    e.password_hash = run([e.bin, "hash-password"], 60, input_bytes=e.password.encode()).stdout.decode().strip()


def make_data(e, p):
    e.small_dir = os.path.join(e.dir, "small")
    e.large_dir = os.path.join(e.dir, "large")
    e.find_dir = os.path.join(e.dir, "find")
    e.archive_dir = os.path.join(e.dir, "archive_small")
    spec = [{"patient_id": "BENCHSMALL", "patient_name": "BENCH^SMALL", "instances": p.small}]
    run([sys.executable, MAKE_DICOM, "small", "--out", e.small_dir, "--spec", json.dumps(spec)], 600)
    run([sys.executable, MAKE_DICOM, "large", "--out", e.large_dir, "--mb", str(p.large_mb)], 600)
    spec = [{"patient_id": f"BENCHP{i:02d}", "patient_name": f"BENCH^P{i:02d}", "instances": 1} for i in range(20)]
    run([sys.executable, MAKE_DICOM, "small", "--out", e.find_dir, "--spec", json.dumps(spec)], 120)
    os.makedirs(e.archive_dir)
    for name in sorted(os.listdir(e.small_dir))[:p.archive_small]:
        shutil.copy(os.path.join(e.small_dir, name), e.archive_dir)
    e.small_files = len(os.listdir(e.small_dir))
    e.archive_files = len(os.listdir(e.archive_dir))
    (large,) = os.listdir(e.large_dir)
    e.large_bytes = os.path.getsize(os.path.join(e.large_dir, large))


def orthanc_config(e, name, dicom_port, http_port, tls):
    storage = os.path.join(e.dir, name)
    cfg = {
        "Name": f"pacsgate-bench-{name}", "StorageDirectory": storage, "IndexDirectory": storage,
        "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True, "Plugins": [],
        "DicomScpTimeout": 60, "MaximumPduLength": e.pdu, "OverwriteInstances": True,
        "SaveJobs": False, "SyncStorageArea": False, "StoreMD5ForAttachments": False,
        "StorageCompression": False, "DicomAssociationCloseDelay": 0, "OrthancExplorerEnabled": False,
        "WebDavEnabled": False, "MetricsEnabled": False, "LoadPrivateDictionary": False, "HttpProxy": "",
    }
    if tls:
        cfg.update({"DicomTlsEnabled": True, "DicomTlsCertificate": e.server_crt,
                    "DicomTlsPrivateKey": e.server_key, "DicomTlsTrustedCertificates": e.ca,
                    "DicomTlsRemoteCertificateRequired": False})
    path = os.path.join(e.dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def http(method, url, body=None, timeout=60):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=body, method=method)
    with opener.open(req, timeout=timeout) as rsp:
        return json.loads(rsp.read() or b"null")


def wait_orthanc(procs, name, p, http_port, dicom_port, timeout=60.0):
    wait_listening(procs, name, p, [dicom_port, http_port], timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            http("GET", f"http://127.0.0.1:{http_port}/system", timeout=5)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} REST API did not answer:\n{procs.log_tail(name)}")


STUNNEL_SERVICE = """
[{name}]
accept = 127.0.0.1:{accept}
connect = 127.0.0.1:{connect}
cert = {cert}
key = {key}
sslVersionMin = TLSv1.2
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""

GATEWAY_CONFIG = """# written by bench/lib/bench.py
[gateway]
listen = "127.0.0.1:{port}"
ae_title = "PACSGATE"

[tls]
certificate = "{server_crt}"
private_key = "{server_key}"
client_ca = "{ca}"
require_client_certificate = false

[timeouts]
idle = 900

[[upstream]]
called_ae = "SINK"
address = "127.0.0.1:{sink}"
ae_title = "SINK"

[[upstream]]
called_ae = "SINKF"
address = "127.0.0.1:{sinkf}"
ae_title = "SINKF"

[[upstream]]
called_ae = "ORTHANC"
address = "127.0.0.1:{orthanc}"
ae_title = "ORTHANC"

[[upstream]]
called_ae = "HOLD"
address = "127.0.0.1:{hold}"
ae_title = "HOLD"

[auth.jwt]
issuer = "pacsgate-bench"
audience = "pacsgate"
public_key = "{jwt_pub}"

[[role]]
name = "bench"
allow = ["echo", "find", "get", "move", "store"]

[[user]]
name = "benchuser"
password_hash = "{password_hash}"
roles = ["bench"]
"""

# The benchmark opens 1,000 associations at once as one user and thousands a minute: rate limits off,
# occupancy caps raised. The admission bounds (max_pending_connections, max_pending_per_address) are
# left at their defaults on purpose: the burst workloads show what a default does with a burst.
# Keys the gateway build does not know are dropped (see write_gateway_config).
GATEWAY_LIMITS = {
    "associations_per_minute": "0",
    "queries_per_minute": "0",
    "retrievals_per_minute": "0",
    "max_associations": "5000",
    "max_associations_per_user": "5000",
    "max_query_results": "5000",
}
GATEWAY_DEFAULTS_KEPT = ["max_pending_connections", "max_pending_per_address"]


def write_gateway_config(e, path, port, binary=None):
    """Write the gateway config; `pacsgate check` it and drop [limits] keys this build does not know."""
    base = GATEWAY_CONFIG.format(port=port, server_crt=e.server_crt, server_key=e.server_key, ca=e.ca,
                                 sink=e.ports["sink"], sinkf=e.ports["sinkf"], orthanc=e.ports["orthanc"],
                                 hold=e.ports["hold"], jwt_pub=e.jwt_pub, password_hash=e.password_hash)
    limits = dict(GATEWAY_LIMITS)
    for _ in range(len(GATEWAY_LIMITS) + 2):
        text = base
        if limits:
            text += "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
        with open(path, "w") as f:
            f.write(text)
        r = run([binary or e.bin, "check", "--config", path], 60, check=False)
        out = (r.stdout + r.stderr).decode(errors="replace")
        if r.returncode == 0:
            return sorted(limits)
        m = re.search(r"unknown (?:field|key)[^`'\"]*[`'\"]([a-z_]+)[`'\"]", out)
        if m and m.group(1) == "limits":
            limits = {}
            continue
        if m and m.group(1) in limits:
            limits.pop(m.group(1))
            continue
        raise RuntimeError(f"pacsgate check failed:\n{out}")
    raise RuntimeError("could not write a gateway configuration this build accepts")


def start_everything(e, procs, p):
    names = ["sink", "sink_tls", "sinkf", "sinkf_tls", "orthanc", "orthanc_http", "orthanc_tls",
             "orthanc_tls_http", "hold", "stunnel_sink", "stunnel_sinkf", "stunnel_orthanc",
             "stunnel_hold", "socat_sink", "socat_sinkf", "socat_orthanc"] + GATEWAYS
    e.ports = {}
    used = set()
    for n in names:
        port = free_port()
        while port in used:
            port = free_port()
        used.add(port)
        e.ports[n] = port
    dcmtk_env = {"TCP_NODELAY": "1"}
    pdu = str(e.pdu)
    starts = []

    def storescp(name, port, tls, fork):
        argv = ["/usr/bin/storescp", "--ignore", "-pdu", pdu, "-ta", "60", "-td", "60"]
        argv += ["--fork"] if fork else ["--single-process"]
        if tls:
            argv += ["+tls", e.server_key, e.server_crt, "-ic"]
        starts.append((name, procs.start(name, argv + [str(port)], env=dcmtk_env), [port]))

    storescp("sink", e.ports["sink"], False, False)
    storescp("sink_tls", e.ports["sink_tls"], True, False)
    storescp("sinkf", e.ports["sinkf"], False, True)
    storescp("sinkf_tls", e.ports["sinkf_tls"], True, True)

    orthancs = []
    for name, tls in (("orthanc", False), ("orthanc_tls", True)):
        cfg = orthanc_config(e, name, e.ports[name], e.ports[name + "_http"], tls)
        # Orthanc's DICOM side is DCMTK: without TCP_NODELAY each response waits for a delayed ACK (~40 ms).
        orthancs.append((name, procs.start(name, ["/usr/sbin/Orthanc", cfg], env=dcmtk_env)))

    starts.append(("hold", procs.start("hold", [sys.executable, DICOM_UL, "hold", "--port", str(e.ports["hold"])]),
                   [e.ports["hold"]]))

    stunnel_conf = os.path.join(e.dir, "stunnel.conf")
    with open(stunnel_conf, "w") as f:
        f.write("foreground = yes\npid =\ndebug = 4\n")
        for svc, target in (("sink", "sink"), ("sinkf", "sinkf"), ("orthanc", "orthanc"), ("hold", "hold")):
            f.write(STUNNEL_SERVICE.format(name=svc, accept=e.ports["stunnel_" + svc], connect=e.ports[target],
                                           cert=e.server_crt, key=e.server_key))
    stunnel_bin = shutil.which("stunnel4") or shutil.which("stunnel")
    e.stunnel_bin = stunnel_bin
    starts.append(("stunnel", procs.start("stunnel", [stunnel_bin, stunnel_conf]),
                   [e.ports["stunnel_" + s] for s in ("sink", "sinkf", "orthanc", "hold")]))

    for svc in ("sink", "sinkf", "orthanc"):
        argv = ["socat", "-b", str(e.socat_buffer),
                f"TCP4-LISTEN:{e.ports['socat_' + svc]},bind=127.0.0.1,reuseaddr,fork,nodelay,backlog=1024",
                f"TCP4:127.0.0.1:{e.ports[svc]},nodelay"]
        starts.append((f"socat_{svc}", procs.start(f"socat_{svc}", argv), [e.ports["socat_" + svc]]))

    for name, proc, ports in starts:
        wait_listening(procs, name, proc, ports)
    for name, proc in orthancs:
        wait_orthanc(procs, name, proc, e.ports[name + "_http"], e.ports[name])

    # The gateway last: `pacsgate check` connects to every upstream.
    e.gateways = {}
    for g in GATEWAYS:
        binary = e.base_bin if g == "pacsgate_base" else e.bin
        conf = os.path.join(e.dir, g + ".toml")
        limits = write_gateway_config(e, conf, e.ports[g], binary)
        if g == "pacsgate":
            e.gateway_conf, e.gateway_limits = conf, limits
        # As deployed: RUST_BACKTRACE unset (with it set, every error value a dependency creates, even one
        # that is handled, captures a stack trace; see docs/performance.md).
        argv = [binary, "run", "--config", conf]
        if e.callgrind:
            # Counts instructions (repeatable whatever else the machine does); ~50x slower. Zeroed and
            # dumped around each measured workload by callgrind_control (callgrind_zero, callgrind_dump).
            argv = ["valgrind", "--tool=callgrind", "--collect-atstart=yes",
                    f"--callgrind-out-file={os.path.join(e.dir, 'callgrind.' + g)}.%p"] + argv
        e.gateways[g] = procs.start(g, argv,
                                    env={"RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1"},
                                    drop_env=("RUST_BACKTRACE", "RUST_LIB_BACKTRACE"))
        wait_listening(procs, g, e.gateways[g], [e.ports[g]], 120.0 if e.callgrind else 30.0)
    e.gateway = e.gateways["pacsgate"]
    e.stunnel = dict(procs.procs)["stunnel"]

    # C-FIND data in both archives (REST upload), then the archive store set once into each, so that
    # every measured round overwrites instances rather than the first one creating them.
    for name in ("orthanc", "orthanc_tls"):
        for f in sorted(os.listdir(e.find_dir)):
            with open(os.path.join(e.find_dir, f), "rb") as fh:
                http("POST", f"http://127.0.0.1:{e.ports[name + '_http']}/instances", fh.read())


# ---------------------------------------------------------------------------------------------
# Workloads


def endpoint(e, path, service):
    """(port, called AE, TLS?) of `path` in front of `service` (sink, sinkf, orthanc, hold)."""
    if path == "direct":
        return e.ports[service], service.upper(), False
    if path == "direct_tls":
        return e.ports[service + "_tls"], service.upper(), True
    if path in ("stunnel", "socat"):
        return e.ports[f"{path}_{service}"], service.upper(), path == "stunnel"
    return e.ports[path], service.upper(), True


LOG_CONFIG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%Q} %p: %m%n
"""


def stamp(line):
    """Seconds since midnight from DCMTK's log time stamp 'HH:MM:SS.mmm.uuu'."""
    m = re.match(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)\.(\d\d\d) ", line)
    if not m:
        return None
    h, mi, s, ms, us = (int(x) for x in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1e3 + us / 1e6


def cpu_ns(pid):
    """CPU time of every live thread of `pid` (ns, from /proc/PID/task/*/schedstat)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
    except OSError:
        return None
    return total


def storescu(e, path, service, folder, expected, timeout):
    """Send every file of `folder` over one association with DCMTK storescu. The clock runs from
    'Association Accepted' to 'Releasing Association' in storescu's own log (file reading included,
    process start, file scan and the TLS handshake not)."""
    port, called, tls = endpoint(e, path, service)
    argv = ["/usr/bin/storescu", "-lc", e.log_config, "-aec", called, "-aet", "BENCHSCU",
            "-to", "30", "-ta", "30", "-td", "60", "-pdu", "131072"]
    if tls:
        argv += ["+tla", "+cf", e.ca]
    if path in GATEWAYS:
        argv += ["--jwt", e.jwt_file]
    argv += ["127.0.0.1", str(port), "+sd", folder]
    gw0 = cpu_ns(e.gateways[path].pid) if path in GATEWAYS else None
    t0 = time.perf_counter()
    r = run(argv, timeout, env={"TCP_NODELAY": "1"}, check=False)
    wall = time.perf_counter() - t0
    gw1 = cpu_ns(e.gateways[path].pid) if path in GATEWAYS else None
    gateway_cpu = (gw1 - gw0) / 1e9 if gw0 is not None and gw1 is not None else None
    text = (r.stdout + r.stderr).decode(errors="replace")
    accepted = released = None
    ok = 0
    for line in text.splitlines():
        if "Association Accepted" in line:
            accepted = stamp(line)
        elif "Releasing Association" in line:
            released = stamp(line)
        elif "Received Store Response (Success)" in line:
            ok += 1
    errors = expected - ok
    if accepted is None or released is None or released <= accepted:
        return {"seconds": None, "wall": wall, "ok": ok, "errors": max(1, errors),
                "detail": text[-800:], "gateway_cpu": gateway_cpu}
    if released < accepted:  # across midnight
        released += 86400
    return {"seconds": released - accepted, "wall": wall, "ok": ok, "errors": errors,
            "detail": "" if errors == 0 else text[-800:], "gateway_cpu": gateway_cpu}


def ul_client(e, sub, path, service, extra, timeout, identity="jwt"):
    port, called, tls = endpoint(e, path, service)
    argv = [sys.executable, DICOM_UL, sub, "--port", str(port), "--called", called,
            "--max-seconds", str(max(5, timeout - 10))]
    if tls:
        argv += ["--tls-ca", e.ca]
    if path in GATEWAYS:
        if identity == "jwt":
            argv += ["--jwt-file", e.jwt_file]
        elif identity == "certificate":
            argv += ["--tls-cert", e.client_crt, "--tls-key", e.client_key]
        elif identity == "password":
            argv += ["--user", "benchuser", "--password", e.password]
    r = run(argv + extra, timeout, check=False)
    try:
        return json.loads(r.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"errors": 1, "first_errors": [r.stderr.decode(errors="replace")[-800:]]}


def rotation(round_no):
    k = round_no % len(PATHS)
    return PATHS[k:] + PATHS[:k]


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Results:
    def __init__(self):
        self.raw = {}

    def add(self, key, path, value):
        self.raw.setdefault(key, {}).setdefault(path, []).append(value)

    def get(self, key, path):
        return self.raw.get(key, {}).get(path, [])


def chunks(total, parts):
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def callgrind_zero(e):
    """--callgrind: zero every gateway's instruction counters before a measured workload."""
    for g, proc in e.gateways.items():
        run(["callgrind_control", "-z", str(proc.pid)], 120)


def callgrind_dump(e, key):
    """--callgrind: dump every gateway's counters after workload `key`; returns {gateway: instructions}."""
    counts = {}
    for g, proc in e.gateways.items():
        stem = os.path.join(e.dir, f"callgrind.{g}.{proc.pid}")
        before = set(glob.glob(stem + ".*"))
        run(["callgrind_control", "-d", key, str(proc.pid)], 300)
        deadline = time.monotonic() + 120
        new = []
        while time.monotonic() < deadline and not new:
            new = sorted(set(glob.glob(stem + ".*")) - before)
            time.sleep(0.2)
        if not new:
            raise RuntimeError(f"callgrind_control wrote no dump for {g} after {key}")
        with open(new[-1], errors="replace") as f:
            for line in f:
                if line.startswith("summary:") or line.startswith("totals:"):
                    counts[g] = int(line.split()[1])
                    break
    return counts


def workload_store(e, p, res, key, service, folder, expected, timeout):
    for rnd in range(p.rounds):
        for path in rotation(rnd):
            r = storescu(e, path, service, folder, expected, timeout)
            res.add(key, path, r)
            rate = f"{r['seconds']:.3f}s" if r["seconds"] else "FAILED"
            log(f"  {key} round {rnd + 1} {path}: {rate} errors={r['errors']} {r['detail'][:300] if r['errors'] else ''}")


def workload_setup(e, p, res):
    for rnd, n in enumerate(chunks(p.setup, p.rounds)):
        for path in rotation(rnd):
            r = ul_client(e, "setup", path, "sink", ["-n", str(n), "--warmup", "3"], 300)
            res.add("setup", path, r)
            log(f"  setup round {rnd + 1} {path}: n={len(r.get('latencies_ms', []))} errors={r['errors']} "
                f"{r.get('tls')} {r.get('first_errors', '')}")
        for ident, n_id in (("certificate", n), ("password", chunks(p.password, p.rounds)[rnd])):
            for g in GATEWAYS:
                r = ul_client(e, "setup", g, "sink", ["-n", str(n_id), "--warmup", "1"], 300, identity=ident)
                res.add("setup_" + ident, g, r)
                log(f"  setup round {rnd + 1} {g} ({ident}): n={len(r.get('latencies_ms', []))} "
                    f"errors={r['errors']} {r.get('first_errors', '')}")


def workload_find(e, p, res):
    for rnd, n in enumerate(chunks(p.finds, p.rounds)):
        for path in rotation(rnd):
            r = ul_client(e, "find", path, "orthanc", ["-n", str(n), "--warmup", "5", "--patient-id", "BENCHP07"], 300)
            res.add("find", path, r)
            log(f"  find round {rnd + 1} {path}: n={len(r.get('latencies_ms', []))} errors={r['errors']} "
                f"matches={r.get('matches')} {r.get('first_errors', '')}")


def process_cpu_s(pid):
    """CPU time of process `pid`, every thread it ever had included (utime + stime in /proc/PID/stat:
    stunnel's per-connection threads are gone by the time a workload ends)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def concurrent_clients(e, p, path, assocs=None, per_assoc=None, sources=("",), identity="jwt", processes=None):
    """`assocs` associations (default p.concurrent) from Python client processes (threads each: one GIL per
    process would otherwise cap the load), started together, each storing `per_assoc` instances; from the
    source addresses `sources` (one process per address at least). Aggregate throughput over the union of
    their runs, and the CPU time of the relay process (pacsgate or stunnel) meanwhile."""
    assocs = p.concurrent if assocs is None else assocs
    per_assoc = p.per_assoc if per_assoc is None else per_assoc
    n = min(max(processes or CLIENT_PROCESSES, len(sources)), assocs)
    start_at = time.time() + 0.5 + 0.01 * assocs
    relay = dict({g: proc.pid for g, proc in e.gateways.items()}, stunnel=e.stunnel.pid).get(path)
    cpu0 = process_cpu_s(relay) if relay else None
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        futures = []
        for i, k in enumerate(chunks(assocs, n)):
            extra = ["--assocs", str(k), "--per-assoc", str(per_assoc), "--files", e.small_dir,
                     "--start-at", f"{start_at:.3f}"]
            if sources[i % len(sources)]:
                extra += ["--bind", sources[i % len(sources)]]
            futures.append(pool.submit(ul_client, e, "concurrent", path, "sinkf", extra, 600, identity=identity))
        results = [f.result() for f in futures]
    cpu1 = process_cpu_s(relay) if relay else None
    total = {"stored": 0, "bytes": 0, "errors": 0, "failed_associations": 0, "first_errors": [], "expected": 0}
    for r in results:
        for k in ("stored", "bytes", "errors", "failed_associations", "expected"):
            total[k] += r.get(k, 0) or 0
        total["first_errors"] += r.get("first_errors", [])[:2]
        if "wall_end" not in r:
            total["errors"] += 1 if not r.get("errors") else 0
    ends = [r["wall_end"] for r in results if "wall_end" in r]
    starts = [r["wall_start"] for r in results if "wall_start" in r]
    elapsed = (max(ends) - min(starts)) if ends and starts else 0
    total["seconds"] = elapsed
    total["mb_per_s"] = total["bytes"] / 1e6 / elapsed if elapsed > 0 else 0.0
    total["instances_per_s"] = total["stored"] / elapsed if elapsed > 0 else 0.0
    total["client_processes"] = n
    total["sources"] = len(sources)
    if cpu0 is not None and cpu1 is not None and total["stored"]:
        total["relay_cpu_s"] = cpu1 - cpu0
        total["relay_cpu_us_per_instance"] = (cpu1 - cpu0) / total["stored"] * 1e6
    return total


def workload_burst(e, p, res):
    """(8) p.burst associations at once, each storing p.burst_per_assoc instances into storescp --fork,
    from one address and from BURST_ADDRESSES addresses, through stunnel and through pacsgate (its
    admission bounds at their defaults); then (3d) p.password_burst password sign-ins at once from one
    address, each storing one instance."""
    eight = tuple(f"127.0.0.{i}" for i in range(1, BURST_ADDRESSES + 1))
    for rnd in range(p.burst_rounds):
        for label, sources in (("one", ("127.0.0.1",)), ("eight", eight)):
            order = ["stunnel"] + GATEWAYS
            for path in (order if rnd % 2 == 0 else order[::-1]):
                r = concurrent_clients(e, p, path, p.burst, p.burst_per_assoc, sources,
                                       processes=max(CLIENT_PROCESSES, len(sources)))
                res.add(f"burst_{label}", path, r)
                log(f"  burst ({label} address{'es' if len(sources) > 1 else ''}) round {rnd + 1} {path}: "
                    f"{r.get('mb_per_s', 0):.1f} MB/s stored={r.get('stored')}/{r.get('expected')} "
                    f"errors={r['errors']} cpu/instance={r.get('relay_cpu_us_per_instance', 0):.0f} µs "
                    f"{r.get('first_errors', '')}")
        for g in GATEWAYS:
            r = concurrent_clients(e, p, g, p.password_burst, 1, ("127.0.0.1",), identity="password")
            res.add("password_burst", g, r)
            log(f"  password burst round {rnd + 1} {g}: {r.get('stored')}/{r.get('expected')} in "
                f"{r.get('seconds', 0):.2f} s errors={r['errors']} {r.get('first_errors', '')}")


def workload_concurrent(e, p, res):
    for rnd in range(p.rounds):
        for path in rotation(rnd):
            r = concurrent_clients(e, p, path)
            res.add("concurrent", path, r)
            log(f"  concurrent round {rnd + 1} {path}: {r.get('mb_per_s', 0):.1f} MB/s "
                f"stored={r.get('stored')}/{r.get('expected')} errors={r['errors']} {r.get('first_errors', '')}")


def workload_memory(e, p, res):
    """(7) Idle RSS after rounds of load: bench/memory/driver.py on a gateway of its own (password logins with
    argon2id, ~19 MiB each, plus C-STOREs), then idle; start, after each round, after the idle time."""
    out = os.path.join(e.dir, "memory-rounds.json")
    idle_seconds = 3 if p.smoke else 15
    argv = [sys.executable, MEMORY_DRIVER, "--bin", e.bin, "--only", "rounds", "--rounds", str(p.memory_rounds),
            "--round-logins", str(p.memory_logins), "--idle-seconds", str(idle_seconds), "--json", out]
    r = run(argv, 600, check=False)
    try:
        with open(out) as f:
            fig = json.load(f)["idle_after_load"]
        fig["errors"] = fig.get("failed", 0)
    except (OSError, KeyError, ValueError):
        fig = {"errors": 1, "first_errors": [(r.stdout + r.stderr).decode(errors="replace")[-800:]]}
    res.add("idle_after_load", "pacsgate", fig)
    log(f"  idle RSS after load: start {fig.get('rss_start_kib')} KiB, after rounds {fig.get('rss_after_round_kib')} KiB, "
        f"after {idle_seconds} s idle {fig.get('rss_idle_after_load_kib')} KiB; errors={fig['errors']} "
        f"{fig.get('first_errors', '')}")


def workload_idle(e, p, res):
    for path, pid in [(g, proc.pid) for g, proc in e.gateways.items()] + [("stunnel", e.stunnel.pid)]:
        r = ul_client(e, "idle", path, "hold", ["-n", str(p.idle), "--pid", str(pid), "--warmup", "10"], 600)
        res.add("idle", path, r)
        log(f"  idle {path}: held={r.get('held')} per association {r.get('per_association_kib')} KiB "
            f"errors={r['errors']} {r.get('first_errors', '')}")


# ---------------------------------------------------------------------------------------------
# Report


def summarize(e, p, res):
    """rows: (label, unit, better, {path: value}, note)."""
    rows = []

    def store_rate(key, count):
        vals = {}
        errs = 0
        for path in PATHS:
            runs = res.get(key, path)
            errs += sum(r["errors"] for r in runs)
            rates = [count / r["seconds"] for r in runs if r["seconds"]]
            vals[path] = max(rates) if rates else None  # best round: interference only ever slows a run
        return vals, errs

    v, errs = store_rate("small", e.small_files)
    rows.append((f"(1) {e.small_files} small instances (~40 kB), one association, storescp --ignore",
                 "instances/s", "higher", v, errs))
    v, errs = store_rate("large", e.large_bytes / 1e6)
    rows.append((f"(2) one large instance ({e.large_bytes / 1e6:.0f} MB), storescp --ignore", "MB/s", "higher", v, errs))

    def gateway_cpu(key, per):
        out = {}
        for g in GATEWAYS:
            vals = [r["gateway_cpu"] / per for r in res.get(key, g) if r.get("gateway_cpu") is not None]
            out[g] = min(vals) if vals else None
        return out

    rows.append(("(1) pacsgate CPU time per small instance (all gateway threads)", "µs", "lower",
                 {k: (v * 1e6 if v is not None else None) for k, v in gateway_cpu("small", e.small_files).items()}, 0))
    rows.append(("(2) pacsgate CPU time per MB of the large instance", "ms", "lower",
                 {k: (v * 1e3 if v is not None else None) for k, v in gateway_cpu("large", e.large_bytes / 1e6).items()}, 0))

    def latency_rows(key, label, paths, pct_list=(50, 99)):
        out = []
        lat = {path: [x for r in res.get(key, path) for x in r.get("latencies_ms", [])] for path in paths}
        errs = sum(r.get("errors", 0) for path in paths for r in res.get(key, path))
        n = max((len(v) for v in lat.values()), default=0)
        for pct in pct_list:
            out.append((f"{label} p{pct} (n={n} per path)", "ms", "lower",
                        {path: percentile(lat[path], pct) for path in paths}, errs))
        return out

    rows += latency_rows("setup", "(3) association setup: connect + TLS + auth + upstream + C-ECHO, JWT", PATHS)
    rows += latency_rows("setup_certificate", "(3b) association setup, pacsgate with client certificate", GATEWAYS)
    rows += latency_rows("setup_password", "(3c) association setup, pacsgate with password (argon2id)", GATEWAYS)
    rows += latency_rows("find", "(4) C-FIND latency, Orthanc, study level, 1 match", PATHS)

    vals, ivals, errs = {}, {}, 0
    for path in PATHS:
        runs = res.get("concurrent", path)
        errs += sum(r.get("errors", 0) for r in runs)
        vals[path] = max([r.get("mb_per_s") or 0 for r in runs], default=None)
        ivals[path] = max([r.get("instances_per_s") or 0 for r in runs], default=None)
    total = p.concurrent * p.per_assoc
    rows.append((f"(5) {p.concurrent} concurrent associations x {p.per_assoc} C-STORE (~40 kB), storescp --fork --ignore, "
                 f"{min(CLIENT_PROCESSES, p.concurrent)} client processes",
                 "MB/s", "higher", vals, errs))
    rows.append(("(5) same, errors (failed stores + failed associations, all rounds)", f"of {total * p.rounds}",
                 "lower", {path: sum(r.get("errors", 0) for r in res.get("concurrent", path))
                           if res.get("concurrent", path) else None for path in PATHS}, None))

    v, errs = store_rate("archive", e.archive_files)
    rows.append((f"(1b) {e.archive_files} small instances into Orthanc (real archive, disk), one association",
                 "instances/s", "higher", v, errs))

    idle = {}
    errs = 0
    for path in GATEWAYS + ["stunnel"]:
        runs = res.get("idle", path)
        errs += sum(r.get("errors", 0) for r in runs)
        idle[path] = median([r.get("per_association_kib") for r in runs])
    held = median([r.get("held") for r in res.get("idle", "pacsgate")]) or 0
    rows.append((f"(6) RSS per idle authenticated association ({held:.0f} held; process RSS delta / count)",
                 "KiB", "lower", idle, errs))

    runs = res.get("idle_after_load", "pacsgate")
    fig = runs[-1] if runs else {}
    mib = lambda kib: kib / 1024 if kib is not None else None
    after = fig.get("rss_after_round_kib") or [None]
    rows.append((f"(7) idle RSS after {p.memory_rounds} round{'s' if p.memory_rounds != 1 else ''} of "
                 f"{p.memory_logins} password logins x "
                 f"{fig.get('stores_per_login', '?')} C-STOREs, {fig.get('idle_seconds', '?')} s idle "
                 f"(start {fmt(mib(fig.get('rss_start_kib')), 'MiB')} MiB, after the last round "
                 f"{fmt(mib(after[-1]), 'MiB')} MiB)", "MiB", "lower",
                 {"pacsgate": mib(fig.get("rss_idle_after_load_kib"))}, sum(r.get("errors", 0) for r in runs)))

    for label, what in (("one", "one client address"), ("eight", f"{BURST_ADDRESSES} client addresses")):
        key = f"burst_{label}"
        vals, cpu, errs = {}, {}, 0
        for path in PATHS:
            runs = res.get(key, path)
            if not runs:
                continue
            errs += sum(r.get("errors", 0) for r in runs)
            vals[path] = max(r.get("mb_per_s") or 0 for r in runs)
            cpu[path] = median([r.get("relay_cpu_us_per_instance") for r in runs])
        rows.append((f"(8) {p.burst:,} associations at once x {p.burst_per_assoc} C-STORE (~40 kB), {what}, "
                     f"storescp --fork --ignore", "MB/s", "higher", vals, errs))
        rows.append((f"(8) same, {what}: relay process CPU time per instance (median of rounds)", "µs", "lower",
                     cpu, 0))
        rows.append((f"(8) same, {what}: errors (all rounds)", f"of {p.burst * p.burst_per_assoc * p.burst_rounds}",
                     "lower", {path: sum(r.get("errors", 0) for r in res.get(key, path)) if res.get(key, path) else None
                               for path in PATHS}, None))
    rows.append((f"(3d) {p.password_burst} password (argon2id) sign-ins at once from one address, + 1 C-STORE each: "
                 f"seconds until the last was done (best round)", "s", "lower",
                 {g: min([r["seconds"] for r in res.get("password_burst", g) if r.get("seconds")], default=None)
                  for g in GATEWAYS},
                 sum(r.get("errors", 0) for g in GATEWAYS for r in res.get("password_burst", g))))
    return rows


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "ms" and v < 1:
        return f"{v:.3f}"
    if isinstance(v, int) or unit.startswith("of "):
        return f"{v:.0f}"
    if unit == "ms":
        return f"{v:.2f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def targets(rows_by_key):
    """[(target, met?, detail)]"""
    out = []

    def v(key, path):
        return rows_by_key[key][3].get(path)

    for key, what in (("small", "small-instance rate"), ("large", "large-instance throughput")):
        pg, st, tls = v(key, "pacsgate"), v(key, "stunnel"), v(key, "direct_tls")
        if None in (pg, st, tls):
            out.append((f"{what} > stunnel and >= 0.9 x direct TLS", None, "not measured"))
            continue
        ok = pg > st and pg >= 0.9 * tls
        out.append((f"{what} > stunnel and >= 0.9 x direct TLS", ok,
                    f"pacsgate {pg:,.1f}, stunnel {st:,.1f} ({pg / st:.2f}x), direct TLS {tls:,.1f} ({pg / tls:.2f}x)"))
    pg, st = v("setup_p50", "pacsgate"), v("setup_p50", "stunnel")
    if None not in (pg, st):
        out.append(("association setup p50 <= stunnel + 1 ms (JWT)", pg - st <= 1.0,
                    f"pacsgate {pg:.2f} ms, stunnel {st:.2f} ms: {pg - st:+.2f} ms"))
    pg, d, dt = v("find_p99", "pacsgate"), v("find_p99", "direct"), v("find_p99", "direct_tls")
    if None not in (pg, d):
        out.append(("C-FIND p99 <= direct + 1 ms", pg - d <= 1.0,
                    f"pacsgate {pg:.2f} ms, direct TCP {d:.2f} ms: {pg - d:+.2f} ms"
                    + (f"; direct TLS {dt:.2f} ms: {pg - dt:+.2f} ms" if dt is not None else "")))
    pg = v("idle", "pacsgate")
    if pg is not None:
        out.append(("< 64 KiB per idle association", pg < 64, f"{pg:.1f} KiB"))
    for key, what in (("concurrent_errors", "(5) concurrent associations"),
                      ("burst_one_errors", "(8) burst from one address"),
                      ("burst_eight_errors", f"(8) burst from {BURST_ADDRESSES} addresses")):
        vals = rows_by_key[key][3]
        pg = vals.get("pacsgate")
        if pg is not None:
            out.append((f"{what}: 0 errors through pacsgate, default admission limits", pg == 0,
                        f"{pg} errors; stunnel {vals.get('stunnel')}"))
    label, _, _, vals, errs = rows_by_key["password_burst"]
    if vals.get("pacsgate") is not None or errs:
        out.append(("(3d) password sign-ins at once from one address: 0 errors", errs == 0, f"{errs} errors"))
    return out


def report(e, p, res, started, finished):
    rows = summarize(e, p, res)
    keys = ["small", "large", "cpu_small", "cpu_large", "setup_p50", "setup_p99", "setup_certificate_p50", "setup_certificate_p99",
            "setup_password_p50", "setup_password_p99", "find_p50", "find_p99", "concurrent", "concurrent_errors",
            "archive", "idle", "idle_after_load", "burst_one", "burst_one_cpu", "burst_one_errors",
            "burst_eight", "burst_eight_cpu", "burst_eight_errors", "password_burst"]
    by_key = dict(zip(keys, rows))
    lines = []
    lines.append(f"# pacsgate benchmark, {started.strftime('%Y-%m-%d %H:%M')}{' (smoke)' if p.smoke else ''}")
    lines.append("")
    lines.append(f"Machine: {os.cpu_count()} cores ({e.cpu}), {e.mem_gib:.0f} GiB RAM, Linux {platform.release()}; "
                 f"loopback only. Load average (1 min) before the run: {e.load_start}"
                 + (" (**other work was running: figures are noisier**)" if e.load_start > 1.0 else "") + ".")
    lines.append("")
    lines.append("Versions: " + "; ".join(f"{k} {v}" for k, v in e.versions.items()))
    lines.append("")
    lines.append(f"Parameters: rounds {p.rounds} (paths interleaved, order rotated per round), receiver max PDU {e.pdu} "
                 f"(storescp -pdu, Orthanc MaximumPduLength), socat -b {e.socat_buffer}, "
                 f"gateway [limits] set: {', '.join(f'{k} = {GATEWAY_LIMITS[k]}' for k in e.gateway_limits) or 'none (this build has no [limits])'}; "
                 f"left at their defaults: {', '.join(GATEWAY_DEFAULTS_KEPT)}. "
                 f"Run time {(finished - started).total_seconds():.0f} s.")
    lines.append("")
    if e.callgrind:
        lines.append("**Under --callgrind the gateways run ~50x slower: their rates, CPU figures and ratios in this "
                     "table mean nothing; the instruction counts at the end are this run's figures.**")
        lines.append("")
    base = "pacsgate_base" in GATEWAYS
    head = ["workload", "unit"] + [PATH_NAMES[x] for x in PATHS] + ["pacsgate / direct TLS", "pacsgate / stunnel",
                                                                     "pacsgate / socat"] + (["pacsgate / base"] if base else [])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for label, unit, better, vals, errs in rows:
        cells = [label + (f" **({errs} errors)**" if errs else ""), unit]
        cells += [fmt(vals.get(x), unit) for x in PATHS]
        if unit.startswith("of "):
            cells += ["", "", ""] + ([""] if base else [])
        else:
            pg = vals.get("pacsgate")
            cells += [ratio(pg, vals.get("direct_tls")), ratio(pg, vals.get("stunnel")), ratio(pg, vals.get("socat"))]
            cells += [ratio(pg, vals.get("pacsgate_base"))] if base else []
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Throughput: higher is better; latency and memory: lower is better. "
                 "(1), (1b), (2), (5): best round (the others only differ by interference from other processes; "
                 "every round is listed below); (1), (1b), (2): DCMTK storescu, timed from 'Association Accepted' to "
                 "'Releasing Association' in its log; CPU rows: least CPU time of a round, from /proc/PID/task/*/schedstat. "
                 "(3), (4): percentiles over all rounds' samples. (3)-(6): bench/lib/dicom_ul.py (raw sockets + Python ssl/OpenSSL, TLS 1.3). "
                 "pacsgate signs in with a JWT (type 5) unless the row says otherwise; direct TLS and stunnel "
                 "use anonymous-client TLS. (6): stunnel's figure is for comparison (one thread per connection).")
    lines.append("")
    lines.append("Every round (seconds from association accepted to release, in run order; (5): MB/s), and the median of the "
                 "rate over rounds, pacsgate / direct TLS and pacsgate / stunnel:")
    lines.append("")
    lines.append("| workload | " + " | ".join(PATH_NAMES[x] for x in PATHS) + " | median: pacsgate / direct TLS | "
                 "median: pacsgate / stunnel |" + (" median: pacsgate / base |" if base else ""))
    lines.append("|" + "---|" * (len(PATHS) + 3 + (1 if base else 0)))
    tail = (lambda meds: f" {med_ratio(meds, 'pacsgate_base')} |") if base else (lambda meds: "")

    def med_ratio(meds, other):
        return ratio(meds.get("pacsgate"), meds.get(other))

    for key in ("small", "large", "archive"):
        cells, meds = [], {}
        for path in PATHS:
            runs = res.get(key, path)
            cells.append(" ".join(f"{r['seconds']:.3f}" if r["seconds"] else "fail" for r in runs) or "-")
            meds[path] = median([1 / r["seconds"] for r in runs if r["seconds"]])
        lines.append(f"| ({key}) | " + " | ".join(cells) + f" | {med_ratio(meds, 'direct_tls')} | {med_ratio(meds, 'stunnel')} |" + tail(meds))
    cells, meds = [], {}
    for path in PATHS:
        runs = res.get("concurrent", path)
        cells.append(" ".join(f"{r.get('mb_per_s', 0):.0f}" for r in runs) or "-")
        meds[path] = median([r.get("mb_per_s") for r in runs])
    lines.append("| (concurrent, MB/s) | " + " | ".join(cells) + f" | {med_ratio(meds, 'direct_tls')} | {med_ratio(meds, 'stunnel')} |" + tail(meds))
    for key in ("burst_one", "burst_eight", "password_burst"):
        if not res.raw.get(key):
            continue
        cells, meds = [], {}
        for path in PATHS:
            runs = res.get(key, path)
            if key == "password_burst":
                cells.append(" ".join(f"{r.get('seconds', 0):.2f}s" for r in runs) or "-")
            else:
                cells.append(" ".join(f"{r.get('mb_per_s', 0):.0f}" for r in runs) or "-")
            meds[path] = median([r.get("mb_per_s") for r in runs])
        lines.append(f"| ({key}{'' if key == 'password_burst' else ', MB/s'}) | " + " | ".join(cells)
                     + f" | - | {med_ratio(meds, 'stunnel')} |" + tail(meds))
    lines.append("")
    lines.append("## Targets")
    lines.append("")
    if e.callgrind:
        lines.append("Not judged: under --callgrind the gateways run ~50x slower, so their rates above mean nothing; "
                     "the instruction counts below are the figures of this run.")
    for name, ok, detail in ([] if e.callgrind else targets(by_key)):
        mark = "not measured" if ok is None else ("met" if ok else "**missed**")
        lines.append(f"- {name}: {mark} ({detail})")
    lines.append("")
    if e.callgrind_counts:
        lines += callgrind_table(e, p)
    return "\n".join(lines)


def callgrind_table(e, p):
    """--callgrind: instructions each gateway executed per workload (zeroed before it, dumped after)."""
    units = dict(small=(e.small_files * p.rounds, "instance"), large=(e.large_bytes / 1e6 * p.rounds, "MB"),
                 archive=(e.archive_files * p.rounds, "instance"), find=(p.finds, "C-FIND"))
    gws = list(e.gateways)
    lines = ["## Instructions (callgrind, gateway process only)", "",
             "Counted by valgrind's callgrind: the same binary and input give the same figure on a busy machine. "
             "Every association of the workload through that gateway, TLS and sign-in included; a per-unit "
             "figure divides that whole count (warm-up requests too) by the measured units.", "",
             "| workload | " + " | ".join(f"{g} total" for g in gws) + " | per unit | "
             + ("pacsgate / base |" if "pacsgate_base" in gws else ""),
             "|---|" + "---:|" * len(gws) + "---|" + ("---:|" if "pacsgate_base" in gws else "")]
    for key, counts in e.callgrind_counts.items():
        n, unit = units.get(key, (None, None))
        per = "; ".join(f"{g} {counts[g] / n:,.0f}" for g in gws if g in counts) + f" per {unit}" if n else "-"
        row = f"| {key} | " + " | ".join(f"{counts.get(g, 0):,}" for g in gws) + f" | {per} |"
        if "pacsgate_base" in gws and counts.get("pacsgate_base"):
            row += f" {counts.get('pacsgate', 0) / counts['pacsgate_base']:.3f} |"
        lines.append(row)
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------


def versions(e):
    v = {}
    # PACSGATE_BENCH_LABEL names a binary built elsewhere (PACSGATE_BIN); else the repo's state.
    v["pacsgate"] = os.environ.get("PACSGATE_BENCH_LABEL") or first_line(["git", "-C", REPO, "describe", "--always", "--dirty"])
    if "pacsgate_base" in GATEWAYS:
        v["pacsgate (base)"] = os.environ.get("PACSGATE_BASE_LABEL") or first_line([e.base_bin, "--version"])
    v["rustc"] = first_line(["rustc", "-V"]).replace("rustc ", "")
    v["DCMTK"] = first_line(["/usr/bin/storescu", "--version"]).replace("dcmtk: ", "")
    v["Orthanc"] = first_line(["/usr/sbin/Orthanc", "--version"]).split()[-1]
    v["stunnel"] = first_line([e.stunnel_bin, "-version"]).split(" on ")[0].replace("stunnel ", "")
    r = subprocess.run(["socat", "-V"], capture_output=True, timeout=20)
    m = re.search(r"socat version (\S+)", r.stdout.decode(errors="replace"))
    v["socat"] = m.group(1) if m else "?"
    v["OpenSSL"] = first_line(["openssl", "version"]).replace("OpenSSL ", "").split(" (")[0]
    v["Python"] = platform.python_version()
    return v


def rounded(x):
    """Floats to 4 significant decimals (µs for latencies in ms) to keep the JSON small."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return 0.0


def machine(e):
    e.cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    e.cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            e.mem_gib = int(f.readline().split()[1]) / 1024 / 1024
    except OSError:
        e.mem_gib = 0


def main():
    ap = argparse.ArgumentParser(description="pacsgate benchmark (see bench/run.sh --help)")
    ap.add_argument("--smoke", action="store_true", help="tiny counts: checks that the benchmark works")
    ap.add_argument("--bin", required=True, help="pacsgate binary")
    ap.add_argument("--base-bin", default=os.environ.get("PACSGATE_BASE_BIN") or None,
                    help="an earlier pacsgate binary measured side by side as 'pacsgate (base)' (env PACSGATE_BASE_BIN)")
    what = dict(small="(1) small instances over one association", large_mb="(2) size of the large instance, MB (50-500)",
                setup="(3) associations per path", password="(3c) password logins", finds="(4) C-FIND requests per path",
                concurrent="(5) concurrent associations", per_assoc="(5) C-STOREs per concurrent association",
                idle="(6) idle associations held", archive_small="(1b) instances stored into Orthanc",
                memory_rounds="(7) rounds of password logins + stores before the idle RSS",
                memory_logins="(7) password logins per round, all at once",
                burst="(8) associations at once from one address and from 8", burst_per_assoc="(8) C-STOREs each",
                burst_rounds="(8) rounds", password_burst="(3d) password sign-ins at once from one address",
                rounds="rounds: each workload is repeated, paths interleaved, order rotated")
    for k, default in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, metavar="N",
                        help=f"{what[k]}; default {default} (smoke {SMOKE[k]})")
    ap.add_argument("--pdu", type=int, default=16384, help="receivers' max PDU (DCMTK and Orthanc default: 16384)")
    ap.add_argument("--socat-buffer", type=int, default=131072, help="socat -b (its default, 8192, is slower)")
    ap.add_argument("--only", default="", help="comma list of workloads: small,large,setup,find,concurrent,burst,archive,idle,memory")
    ap.add_argument("--results", default=os.path.join(REPO, "bench", "results"),
                    help="folder for <date>-<time>.md and .json (default bench/results; a smoke run writes none "
                         "unless this is given)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    ap.add_argument("--callgrind", action="store_true",
                    help="run each gateway under valgrind's callgrind (about 50x slower: use with --only and "
                         "--rounds 1) and report the instructions it executed per workload, a figure that "
                         "repeats whatever else the machine does; with --base-bin, side by side")
    ap.add_argument("--perf", action="store_true",
                    help="record the gateway with `perf record -g` during the workloads (use with --only) and "
                         "write perf.data + a flat report next to the results")
    args = ap.parse_args()
    base = SMOKE if args.smoke else FULL
    p = argparse.Namespace(smoke=args.smoke, **{k: getattr(args, k) if getattr(args, k) is not None else v
                                                 for k, v in base.items()})
    if not 50 <= p.large_mb <= 500 and not args.smoke:
        log(f"note: --large-mb {p.large_mb} is outside the issue's 50-500 MB range")
    only = set(x for x in args.only.split(",") if x)
    if args.smoke and min(p.concurrent, p.burst) <= DEFAULT_PER_ADDRESS_BOUND:
        # The smoke run exists to catch a default that breaks bursts from one address.
        ap.error(f"a smoke run must open more than {DEFAULT_PER_ADDRESS_BOUND} associations at once from one "
                 f"address (--concurrent {p.concurrent}, --burst {p.burst})")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = datetime.datetime.now()
    e = Env()
    e.bin = os.path.abspath(args.bin)
    e.base_bin = os.path.abspath(args.base_bin) if args.base_bin else None
    if e.base_bin:
        add_base_gateway()
    e.pdu = args.pdu
    e.callgrind, e.callgrind_counts = args.callgrind, {}
    if e.callgrind and not shutil.which("callgrind_control"):
        ap.error("--callgrind needs valgrind (Debian package valgrind)")
    e.socat_buffer = args.socat_buffer
    e.dir = tempfile.mkdtemp(prefix="pacsgate-bench-")
    e.log_config = os.path.join(e.dir, "dcmtk-log.cfg")
    with open(e.log_config, "w") as f:
        f.write(LOG_CONFIG)
    machine(e)
    e.load_start = loadavg()
    procs = Procs(e.dir)
    res = Results()
    ok = False
    try:
        log(f"work dir {e.dir}; {'smoke' if p.smoke else 'full'} run: {vars(p)}")
        make_credentials(e)
        log("making test data")
        make_data(e, p)
        log("starting receivers, relays and the gateway")
        start_everything(e, procs, p)
        e.versions = versions(e)
        log("versions: " + "; ".join(f"{k} {v}" for k, v in e.versions.items()))
        want = lambda w: not only or w in only
        # Warm every path once (page cache, first handshakes), unmeasured.
        for path in PATHS:
            storescu(e, path, "sink", e.archive_dir, e.archive_files, 120)
        for path in ("direct", "direct_tls"):  # create the archive set in both Orthancs once
            storescu(e, path, "orthanc", e.archive_dir, e.archive_files, 300)
        perf = None
        if args.perf:
            e.perf_data = os.path.join(e.dir, "perf.data")
            perf = subprocess.Popen(["perf", "record", "-F", "1999", "-g", "-p", str(e.gateway.pid), "-o", e.perf_data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            procs.procs.append(("perf", perf))
            time.sleep(0.5)
        # Idle first: the gateway's memory is then not what earlier workloads left in its allocator.
        workloads = [
            ("idle", f"(6) idle associations: {p.idle}", lambda: workload_idle(e, p, res)),
            ("small", f"(1) small instances: {e.small_files} per association",
             lambda: workload_store(e, p, res, "small", "sink", e.small_dir, e.small_files, 600)),
            ("large", f"(2) large instance: {e.large_bytes / 1e6:.0f} MB",
             lambda: workload_store(e, p, res, "large", "sink", e.large_dir, 1, 600)),
            ("setup", f"(3) association setup: {p.setup} per path", lambda: workload_setup(e, p, res)),
            ("find", f"(4) C-FIND: {p.finds} per path", lambda: workload_find(e, p, res)),
            ("concurrent", f"(5) concurrent: {p.concurrent} associations x {p.per_assoc} instances",
             lambda: workload_concurrent(e, p, res)),
            ("burst", f"(8) burst: {p.burst} associations at once x {p.burst_per_assoc} instances, from 1 and "
                      f"{BURST_ADDRESSES} addresses; (3d) {p.password_burst} password sign-ins at once",
             lambda: workload_burst(e, p, res)),
            ("archive", f"(1b) into Orthanc: {e.archive_files} instances",
             lambda: workload_store(e, p, res, "archive", "orthanc", e.archive_dir, e.archive_files, 600)),
            ("memory", f"(7) idle RSS after {p.memory_rounds} rounds of {p.memory_logins} password logins + stores",
             lambda: workload_memory(e, p, res)),
        ]
        for key, what, workload in workloads:
            if not want(key):
                continue
            log(what)
            if e.callgrind:
                callgrind_zero(e)
            workload()
            if e.callgrind:
                e.callgrind_counts[key] = callgrind_dump(e, key)
                log(f"  callgrind {key}: " + ", ".join(f"{g} {n:,} instructions" for g, n in e.callgrind_counts[key].items()))
        gateway_alive = all(proc.poll() is None for proc in e.gateways.values())
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=60)
        finished = datetime.datetime.now()
        text = report(e, p, res, started, finished)
        if not gateway_alive:
            text += "\n**A gateway exited during the run** (" + ", ".join(
                f"{g}: {proc.returncode}" for g, proc in e.gateways.items() if proc.poll() is not None) + ").\n"
        # Any error anywhere fails the run, loudly: in the report, on stderr, and in the exit status.
        failures = sorted({f"{k} ({path})" for k, by_path in res.raw.items() for path, runs in by_path.items()
                           for r in runs if r.get("errors")})
        if failures:
            text += ("\n**FAILED: errors in " + ", ".join(failures) + "** (see the log lines above each table "
                     "row's figures; every error counts, on every path).\n")
        print(text)
        # A smoke run writes files only when --results names a folder (scripts/test.sh must not litter).
        explicit = any(a == "--results" or a.startswith("--results=") for a in sys.argv)
        results_dir = args.results if (not args.smoke or explicit) else e.dir
        os.makedirs(results_dir, exist_ok=True)
        stem = started.strftime("%Y-%m-%d-%H%M") + ("-smoke" if p.smoke else "")
        with open(os.path.join(results_dir, stem + ".md"), "w") as f:
            f.write(text)
        with open(os.path.join(results_dir, stem + ".json"), "w") as f:
            json.dump(rounded({"params": vars(p), "versions": e.versions, "raw": res.raw}), f)
        if results_dir != e.dir or args.keep:
            log(f"wrote {os.path.join(results_dir, stem + '.md')}")
        if perf is not None:
            shutil.copy(e.perf_data, os.path.join(results_dir, stem + ".perf.data"))
            for sort, suffix in (("dso", "dso"), ("symbol", "symbols")):
                r = run(["perf", "report", "-i", e.perf_data, "--no-children", "-g", "none", "--sort", sort, "--stdio"], 300, check=False)
                with open(os.path.join(results_dir, f"{stem}.perf-{suffix}.txt"), "wb") as f:
                    f.write(r.stdout)
            log(f"wrote {stem}.perf.data and {stem}.perf-dso.txt / .perf-symbols.txt (gateway only) in {results_dir}")
        ok = gateway_alive and not failures
        if failures:
            log("FAILED: errors in " + ", ".join(failures))
    except Interrupted as ex:
        log(f"interrupted ({ex}); cleaning up")
    except Exception as ex:
        log(f"FAILED: {ex}")
        for name, _ in procs.procs:
            if name in GATEWAYS:
                log(f"{name} log tail:\n" + procs.log_tail(name, 30))
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if args.keep or not ok:
            log(f"kept {e.dir}")
        else:
            shutil.rmtree(e.dir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
