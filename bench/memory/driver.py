#!/usr/bin/env python3
"""pacsgate resource figures: gateway memory idle after rounds of password logins and stores, with idle
authenticated associations and with pending TLS handshakes, and a connection flood from one address while
another client is served. Run by bench/memory.sh (which builds the binary and raises `ulimit -n`); see
docs/security.md.

  driver.py --bin target/release/pacsgate [--idle 1000] [--pending 5000] [--flood-seconds 10]
            [--rounds 3 --round-logins 24 --round-stores 10 --idle-seconds 15] [--only rounds,idle,pending,flood]

Everything runs on loopback: the gateway, a tiny asyncio archive (accepts every association, answers
C-ECHO), and the clients. Authenticated associations sign in with a client certificate (no argon2id cost
per login, so the figures are the association's own memory), except in the rounds of load, which sign in
with a password on purpose (argon2id's 19 MiB per check is what an allocator may keep). Memory is the gateway's VmRSS from
/proc/PID/status. Every process started here is killed by its own PID on exit.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


# ---- PDUs (PS3.8), by hand ----

def item(t, value):
    return bytes([t, 0]) + struct.pack(">H", len(value)) + value


VERIFICATION = b"1.2.840.10008.1.1"
CT_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = b"1.2.840.10008.1.2.1"


def associate_rq(called=b"ARCHIVE", calling=b"MEMBENCH", password=None):
    """Presentation contexts 1 (Verification) and 3 (CT Image Storage); with `password` = (user, pw), a
    User Identity item of type 2 (PS3.7 D.3.3.7)."""
    fixed = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, VERIFICATION) + item(0x40, b"1.2.840.10008.1.2"))
    pc += item(0x20, bytes([3, 0, 0, 0]) + item(0x30, CT_IMAGE_STORAGE) + item(0x40, EXPLICIT_LE))
    sub = item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.7433.2")
    if password is not None:
        user, pw = (x.encode() for x in password)
        sub += item(0x58, bytes([2, 0]) + struct.pack(">H", len(user)) + user + struct.pack(">H", len(pw)) + pw)
    body = fixed + item(0x10, b"1.2.840.10008.3.1.1.1") + pc + item(0x50, sub)
    return bytes([1, 0]) + struct.pack(">I", len(body)) + body


def items(body, start):
    out, i = [], start
    while i + 4 <= len(body):
        t, n = body[i], struct.unpack(">H", body[i + 2:i + 4])[0]
        out.append((t, body[i + 4:i + 4 + n]))
        i += 4 + n
    return out


def associate_ac(rq_body):
    out = b""
    for t, v in items(rq_body, 68):
        if t == 0x10:
            out += item(0x10, v)
        elif t == 0x20:
            ts = [sv for st, sv in items(v, 4) if st == 0x40]
            out += item(0x21, bytes([v[0], 0, 0, 0]) + item(0x40, ts[0]))
    out += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    body = rq_body[:68] + out
    return bytes([2, 0]) + struct.pack(">I", len(body)) + body


def element(g, e, v):
    return struct.pack("<HHI", g, e, len(v)) + v


def uid(value):
    return value + b"\0" * (len(value) % 2)


def command(field, mid_tag, mid, status=None, sop_class=VERIFICATION, data_set=False, sop_instance=None):
    """A command set (Implicit VR LE, tags ascending). Responses carry `status`; C-STORE-RQ the priority
    and affected SOP instance."""
    rest = (element(0, 2, uid(sop_class)) + element(0, 0x100, struct.pack("<H", field))
            + element(0, mid_tag, struct.pack("<H", mid)))
    if field == 0x0001:
        rest += element(0, 0x700, struct.pack("<H", 0))
    rest += element(0, 0x800, struct.pack("<H", 0x0000 if data_set else 0x0101))
    if status is not None:
        rest += element(0, 0x900, struct.pack("<H", status))
    if sop_instance is not None:
        rest += element(0, 0x1000, uid(sop_instance))
    return element(0, 0, struct.pack("<I", len(rest))) + rest


def pdata(pc, cmd, header=3):
    pdv = struct.pack(">I", len(cmd) + 2) + bytes([pc, header]) + cmd
    return bytes([4, 0]) + struct.pack(">I", len(pdv)) + pdv


def store_rq(mid, data, fragment=16000):
    """A C-STORE-RQ on presentation context 3: the command PDU, then the data set in PDUs of `fragment` bytes."""
    sop_instance = f"2.25.{os.getpid()}.{mid}.{time.monotonic_ns()}".encode()
    out = pdata(3, command(0x0001, 0x110, mid, sop_class=CT_IMAGE_STORAGE, data_set=True,
                           sop_instance=sop_instance))
    for at in range(0, len(data), fragment):
        last = at + fragment >= len(data)
        out += pdata(3, data[at:at + fragment], header=2 if last else 0)
    return out


def command_field_and_id(cmd):
    """(command field, message ID) of an Implicit VR LE command set."""
    field, mid, i = None, None, 0
    while i + 8 <= len(cmd):
        _, e, n = struct.unpack("<HHI", cmd[i:i + 8])
        if e == 0x100:
            field = struct.unpack("<H", cmd[i + 8:i + 10])[0]
        elif e == 0x110:
            mid = struct.unpack("<H", cmd[i + 8:i + 10])[0]
        i += 8 + n
    return field, mid


ECHO_RQ = pdata(1, command(0x0030, 0x110, 1))
RELEASE_RQ = bytes([5, 0, 0, 0, 0, 4, 0, 0, 0, 0])
BENCH_PASSWORD = "memory bench passphrase"


async def read_pdu(reader):
    header = await reader.readexactly(6)
    n = struct.unpack(">I", header[2:6])[0]
    return header[0], await reader.readexactly(n)


# ---- the archive: accepts everything, answers C-ECHO, C-STORE (after the data set's last fragment) and release ----

async def archive_conn(reader, writer):
    store = None  # (pc, message ID) of a C-STORE whose data set is still coming
    try:
        while True:
            kind, body = await read_pdu(reader)
            if kind == 1:
                writer.write(associate_ac(body))
            elif kind == 4:
                i = 0
                while i + 6 <= len(body):
                    n = struct.unpack(">I", body[i:i + 4])[0]
                    pc, header, value = body[i + 4], body[i + 5], body[i + 6:i + 4 + n]
                    i += 4 + n
                    if header & 1:
                        field, mid = command_field_and_id(value)
                        if field == 0x0001:
                            store = (pc, mid)
                        else:
                            writer.write(pdata(pc, command(0x8030, 0x120, mid or 1, 0)))
                    elif header & 2 and store is not None:
                        writer.write(pdata(store[0], command(0x8001, 0x120, store[1], 0,
                                                             sop_class=CT_IMAGE_STORAGE)))
                        store = None
            elif kind == 5:
                writer.write(bytes([6, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
            else:
                break
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


# ---- clients ----

class Pki:
    def __init__(self, d):
        self.ca, self.cert, self.key = f"{d}/ca.crt", f"{d}/bench.crt", f"{d}/bench.key"

    def context(self, client_cert=True):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        if client_cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


async def associate(port, pki, source="127.0.0.1", timeout=30):
    """An authenticated association (client certificate), kept open; returns (reader, writer)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=pki.context(), server_hostname="localhost", local_addr=(source, 0)), timeout)
    writer.write(associate_rq())
    await writer.drain()
    kind, _ = await asyncio.wait_for(read_pdu(reader), timeout)
    if kind != 2:
        writer.close()
        raise RuntimeError(f"association answered with PDU type {kind}")
    return reader, writer


async def echo_once(port, pki, timeout=10):
    """A whole legitimate exchange: TLS, association, C-ECHO, release. Returns seconds or raises."""
    t = time.monotonic()
    reader, writer = await associate(port, pki, timeout=timeout)
    try:
        writer.write(ECHO_RQ)
        await writer.drain()
        kind, _ = await asyncio.wait_for(read_pdu(reader), timeout)
        if kind != 4:
            raise RuntimeError(f"echo answered with PDU type {kind}")
        writer.write(RELEASE_RQ)
        await writer.drain()
        await asyncio.wait_for(read_pdu(reader), timeout)
    finally:
        writer.close()
    return time.monotonic() - t


async def login_and_store(port, pki, password, stores, data, timeout=60):
    """A password login (User Identity type 2, no client certificate), `stores` C-STOREs of `data`, release."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=pki.context(client_cert=False), server_hostname="localhost"), timeout)
    try:
        writer.write(associate_rq(password=password))
        await writer.drain()
        kind, _ = await asyncio.wait_for(read_pdu(reader), timeout)
        if kind != 2:
            raise RuntimeError(f"password login answered with PDU type {kind}")
        for mid in range(1, stores + 1):
            writer.write(store_rq(mid, data))
            await writer.drain()
            kind, _ = await asyncio.wait_for(read_pdu(reader), timeout)
            if kind != 4:
                raise RuntimeError(f"C-STORE answered with PDU type {kind}")
        writer.write(RELEASE_RQ)
        await writer.drain()
        await asyncio.wait_for(read_pdu(reader), timeout)
    finally:
        writer.close()


async def load_rounds(args, workdir, pki_dir, pki, archive_port):
    """Idle RSS after rounds of load: each round, `round_logins` password logins at once (argon2id, ~19 MiB
    per check, in the blocking pool) with `round_stores` C-STOREs of ~40 kB each; then the gateway idles."""
    hashed = subprocess.run([args.bin, "hash-password"], input=BENCH_PASSWORD.encode(), check=True,
                            capture_output=True).stdout.decode().strip()
    gw = Gateway(args.bin, workdir, pki_dir, archive_port, "associations_per_minute = 0\n"
                 "max_associations_per_user = 500",
                 "idle = 600", password_hash=hashed)
    await echo_once(gw.port, pki)
    await settle()
    start = gw.rss()
    data = os.urandom(40 * 1024)
    after = []
    failed = 0
    for _ in range(args.rounds):
        results = await asyncio.gather(*(login_and_store(gw.port, pki, ("bench", BENCH_PASSWORD), args.round_stores,
                                                         data) for _ in range(args.round_logins)),
                                       return_exceptions=True)
        failed += sum(isinstance(r, BaseException) for r in results)
        await settle()
        after.append(gw.rss())
    await asyncio.sleep(args.idle_seconds)
    idle = gw.rss()
    gw.stop()
    figures = {"rounds": args.rounds, "logins_per_round": args.round_logins, "stores_per_login": args.round_stores,
               "failed": failed, "rss_start_kib": start, "rss_after_round_kib": after,
               "idle_seconds": args.idle_seconds, "rss_idle_after_load_kib": idle}
    print(f"idle RSS after {args.rounds} rounds of load ({args.round_logins} password logins x "
          f"{args.round_stores} C-STOREs each, {failed} failed): start {start} KiB; after each round "
          f"{', '.join(str(a) for a in after)} KiB; after {args.idle_seconds} s idle {idle} KiB "
          f"({idle - start:+d} KiB over start)")
    return figures


async def silent_tcp(port, source="127.0.0.1"):
    """A TCP connection that sends nothing (a TLS handshake that never starts)."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    s.bind((source, 0))
    await loop.sock_connect(s, ("127.0.0.1", port))
    return s


async def hello_then_silent(port, pki):
    """A TCP connection that sends a TLS ClientHello and nothing else (a handshake in progress)."""
    loop = asyncio.get_running_loop()
    s = await silent_tcp(port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = pki.context(client_cert=False).wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    await loop.sock_sendall(s, outgoing.read())
    return s


async def open_many(n, make, batch=200):
    """Open n connections with `make`, `batch` at a time; returns (opened, failures)."""
    opened, failures = [], 0
    for start in range(0, n, batch):
        results = await asyncio.gather(*(make() for _ in range(min(batch, n - start))), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                failures += 1
            else:
                opened.append(r)
    return opened, failures


def close_all(conns):
    for c in conns:
        try:
            if isinstance(c, tuple):
                c[1].close()
            else:
                c.close()
        except Exception:
            pass


# ---- the gateway ----

class Gateway:
    def __init__(self, binary, workdir, pki_dir, archive_port, limits, timeouts, password_hash=None):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(dir=workdir)
        cfg = f"""
[gateway]
listen = "127.0.0.1:{self.port}"
[tls]
certificate = "{pki_dir}/server.crt"
private_key = "{pki_dir}/server.key"
client_ca = "{pki_dir}/ca.crt"
[timeouts]
{timeouts}
[[upstream]]
called_ae = "ARCHIVE"
address = "127.0.0.1:{archive_port}"
ae_title = "ARCHIVE"
[limits]
{limits}
[[role]]
name = "bench"
allow = ["echo", "store"]
[[user]]
name = "bench"
roles = ["bench"]
"""
        if password_hash is not None:
            cfg += f'password_hash = "{password_hash}"\n'
        path = f"{self.dir}/pacsgate.toml"
        with open(path, "w") as f:
            f.write(cfg)
        self.log = open(f"{self.dir}/pacsgate.log", "w")
        self.proc = subprocess.Popen([binary, "run", "--config", path], stdout=self.log, stderr=self.log,
                                     env=dict(os.environ, RUST_LOG="warn", NO_COLOR="1"))
        PROCS.append(self.proc)
        end = time.time() + 20
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit(f"the gateway did not listen; log: {self.dir}/pacsgate.log")
        time.sleep(0.3)

    def rss(self):
        return rss_kib(self.proc.pid)

    def stop(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()


async def settle():
    await asyncio.sleep(1.0)


async def main_async(args):
    workdir = tempfile.mkdtemp(prefix="pacsgate-memory-")
    results = {}
    try:
        pki_dir = f"{workdir}/certs"
        subprocess.run([args.bin, "certs", "--out", pki_dir, "--client", "bench"], check=True,
                       stdout=subprocess.DEVNULL)
        pki = Pki(pki_dir)
        archive = await asyncio.start_server(archive_conn, "127.0.0.1", 0, backlog=4096)
        archive_port = archive.sockets[0].getsockname()[1]
        big = (f"max_associations = {args.idle + 100}\nmax_associations_per_user = {args.idle + 100}\n"
               "associations_per_minute = 0\n")
        long_timeouts = "tls_handshake = 120\nassociation_request = 120\nidle = 600"

        want = lambda section: not args.only or section in args.only.split(",")
        # 0. Idle RSS after rounds of password logins and stores (first: a fresh gateway, nothing else run).
        if want("rounds"):
            results["idle_after_load"] = await load_rounds(args, workdir, pki_dir, pki, archive_port)
        if want("idle"):
            await idle_associations(args, workdir, pki_dir, pki, archive_port, big, long_timeouts, results)
        if want("pending"):
            await pending_handshakes(args, workdir, pki_dir, pki, archive_port, big, long_timeouts, results)
        if want("flood"):
            await floods(args, workdir, pki_dir, pki, archive_port, results)
        archive.close()
    finally:
        for p in PROCS:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


async def idle_associations(args, workdir, pki_dir, pki, archive_port, big, long_timeouts, results):
    # 1. Idle authenticated associations.
    gw = Gateway(args.bin, workdir, pki_dir, archive_port, big, long_timeouts)
    await echo_once(gw.port, pki)
    await settle()
    base = gw.rss()
    t = time.monotonic()
    conns, failed = await open_many(args.idle, lambda: associate(gw.port, pki), batch=100)
    took = time.monotonic() - t
    await settle()
    held = gw.rss()
    per = (held - base) / max(len(conns), 1)
    results["idle"] = {"associations": len(conns), "failed": failed, "open_seconds": round(took, 1),
                       "rss_before_kib": base, "rss_kib": held, "per_association_kib": round(per, 1),
                       "gateway_fds": fds(gw.proc.pid)}
    print(f"idle authenticated associations: {len(conns)} open ({failed} failed) in {took:.1f} s; "
          f"gateway RSS {base} -> {held} KiB = {per:.1f} KiB per association "
          f"(client leg + archive leg + relay); {fds(gw.proc.pid)} fds")
    close_all(conns)
    await settle()
    results["idle"]["rss_after_close_kib"] = gw.rss()
    gw.stop()


async def pending_handshakes(args, workdir, pki_dir, pki, archive_port, big, long_timeouts, results):

    # 2. Pending handshakes with the limit raised, silent and ClientHello-then-silent; a fresh gateway each.
    raised = max(args.pending, 256) + 100
    for label, key in (("silent TCP", "silent"), ("ClientHello, then silent", "hello")):
        gw = Gateway(args.bin, workdir, pki_dir, archive_port, big + f"max_pending_connections = {raised}",
                     long_timeouts)
        await echo_once(gw.port, pki)
        await settle()
        base = gw.rss()
        make = (lambda: silent_tcp(gw.port)) if key == "silent" else (lambda: hello_then_silent(gw.port, pki))
        conns, failed = await open_many(args.pending, make)
        await settle()
        held = gw.rss()
        per = (held - base) / max(len(conns), 1)
        try:
            await echo_once(gw.port, pki, timeout=5)
            served = "served"
        except Exception as e:
            served = f"NOT served ({type(e).__name__})"
        results["pending_raised_" + key] = {"connections": len(conns), "failed": failed, "rss_before_kib": base,
                                            "rss_kib": held, "per_connection_kib": round(per, 2),
                                            "gateway_fds": fds(gw.proc.pid), "legitimate_client": served}
        print(f"pending handshakes ({label}), max_pending_connections = {raised}: "
              f"{len(conns)} open; gateway RSS {base} -> {held} KiB = {per:.2f} KiB each; "
              f"{fds(gw.proc.pid)} fds; a legitimate client meanwhile: {served}")
        close_all(conns)
        gw.stop()

    # 3. Pending handshakes at the default limit (256): the rest are closed at once.
    gw = Gateway(args.bin, workdir, pki_dir, archive_port, big, long_timeouts)
    await echo_once(gw.port, pki)
    await settle()
    base = gw.rss()
    conns, failed = await open_many(args.pending, lambda: hello_then_silent(gw.port, pki))
    await settle()
    held = gw.rss()
    gw_fds = fds(gw.proc.pid)
    try:
        await echo_once(gw.port, pki, timeout=5)
        served = "served"
    except Exception as e:
        served = f"NOT served ({type(e).__name__})"
    results["pending_default"] = {"attempted": args.pending, "rss_before_kib": base, "rss_kib": held,
                                  "gateway_fds": gw_fds, "legitimate_client": served}
    print(f"pending handshakes at the default max_pending_connections = 256: {args.pending} attempted; "
          f"gateway RSS {base} -> {held} KiB; {gw_fds} fds held; a legitimate client meanwhile: {served}")
    close_all(conns)
    gw.stop()


async def floods(args, workdir, pki_dir, pki, archive_port, results):
    # 4. Floods from one address (127.0.0.2) while 127.0.0.1 is served; default limits and timeouts.
    for mode in ("connect-close", "hold-silent"):
        gw = Gateway(args.bin, workdir, pki_dir, archive_port, "", "")
        stop = asyncio.Event()
        flood_count = [0]

        async def flood():
            held = []
            end = time.monotonic() + args.flood_seconds
            while not stop.is_set() and time.monotonic() < end and flood_count[0] < 200_000:
                try:
                    s = await silent_tcp(gw.port, source="127.0.0.2")
                except OSError:
                    await asyncio.sleep(0.01)
                    continue
                flood_count[0] += 1
                if mode == "connect-close":
                    s.close()
                else:
                    held.append(s)
                    if len(held) > 2000:  # bounded: keep the newest 2000 open
                        held.pop(0).close()
                if flood_count[0] % 50 == 0:
                    await asyncio.sleep(0)
            close_all(held)

        async def legit():
            ok, fail, times = 0, 0, []
            await asyncio.sleep(1.0)
            end = time.monotonic() + args.flood_seconds - 1.5
            while time.monotonic() < end:
                try:
                    times.append(await echo_once(gw.port, pki, timeout=5))
                    ok += 1
                except Exception:
                    fail += 1
                await asyncio.sleep(0.2)
            stop.set()
            return ok, fail, times

        base = gw.rss()
        _, (ok, fail, times) = await asyncio.gather(flood(), legit())
        times.sort()
        p50 = times[len(times) // 2] * 1000 if times else float("nan")
        worst = times[-1] * 1000 if times else float("nan")
        results[f"flood_{mode}"] = {"flood_connections": flood_count[0], "legit_ok": ok, "legit_failed": fail,
                                    "legit_p50_ms": round(p50, 1), "legit_max_ms": round(worst, 1),
                                    "rss_before_kib": base, "rss_peak_kib": gw.rss()}
        print(f"flood ({mode}) from 127.0.0.2: {flood_count[0]} connections in {args.flood_seconds} s; "
              f"127.0.0.1 meanwhile: {ok} echoes served, {fail} failed (p50 {p50:.0f} ms, max {worst:.0f} ms)")
        gw.stop()


def main():
    ap = argparse.ArgumentParser(description="pacsgate memory and flood figures")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--pending", type=int, default=5000)
    ap.add_argument("--flood-seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of password logins + stores before idling")
    ap.add_argument("--round-logins", type=int, default=24, help="password logins per round, all at once")
    ap.add_argument("--round-stores", type=int, default=10, help="C-STOREs (~40 kB) per login")
    ap.add_argument("--idle-seconds", type=int, default=15, help="idle time after the last round before measuring")
    ap.add_argument("--only", default="", help="comma list of sections: rounds,idle,pending,flood (default: all)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
