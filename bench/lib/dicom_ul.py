#!/usr/bin/env python3
"""A minimal DICOM upper layer (PS3.8) and DIMSE (PS3.7) client and server over raw sockets, for
pacsgate's benchmark (bench/run.sh). Plain TCP or TLS (Python's ssl, i.e. OpenSSL). No pynetdicom:
its threads and polling would add more latency than the gateway under test.

Client subcommands (each prints ONE JSON object on stdout):
  setup       N associations one after the other: connect (+TLS) + A-ASSOCIATE + C-ECHO, timed per
              association (release and close are not on the clock).
  find        one association, then N C-FIND requests one after the other, each timed from request to
              final response.
  concurrent  A associations at once (threads), each storing K instances; aggregate throughput, errors.
  idle        opens N associations (each does a C-ECHO, then stays idle), reads VmRSS of --pid before and
              after, then releases them all.
Server subcommand:
  hold        an asyncio acceptor that accepts every association, answers C-ECHO, and releases: the
              upstream for the idle-association test (storescp --fork would need a process per association).

Common client options: --host --port --called AE --calling AE --timeout S
  TLS: --tls-ca FILE [--tls-cert FILE --tls-key FILE]   Identity: --jwt-file FILE | --user U --password P
"""

import argparse
import asyncio
import json
import os
import socket
import ssl
import struct
import sys
import threading
import time

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.10.543.1"  # any UID; names this client in logs
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 1, 2, 3
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 4, 5, 6, 7

C_STORE_RQ, C_FIND_RQ, C_ECHO_RQ = 0x0001, 0x0020, 0x0030
NO_DATA_SET = 0x0101


class DicomError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Encoding


def item(kind, data):
    return struct.pack(">BBH", kind, 0, len(data)) + data


def pdu(kind, body):
    return struct.pack(">BBI", kind, 0, len(body)) + body


def ae(title):
    return title.encode().ljust(16)[:16]


def even(b):
    return b + b"\0" if len(b) % 2 else b


def associate_rq(called, calling, contexts, max_pdu, identity=None):
    """contexts: [(abstract_syntax, [transfer_syntax, ...])]; presentation context IDs 1, 3, 5, ...
    identity: (type, primary bytes, secondary bytes, positive_response_requested) or None."""
    items = item(0x10, APP_CONTEXT)
    for i, (abstract, syntaxes) in enumerate(contexts):
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
        items += item(0x20, bytes([2 * i + 1, 0, 0, 0]) + sub)
    user = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, IMPLEMENTATION_UID) + item(0x55, b"PACSGATE_BENCH")
    if identity is not None:
        kind, primary, secondary, positive = identity
        body = bytes([kind, 1 if positive else 0]) + struct.pack(">H", len(primary)) + primary
        body += struct.pack(">H", len(secondary)) + secondary
        user += item(0x58, body)
    items += item(0x50, user)
    body = struct.pack(">HH", 1, 0) + ae(called) + ae(calling) + bytes(32) + items
    return pdu(A_ASSOCIATE_RQ, body)


def parse_items(data):
    out = []
    pos = 0
    while pos + 4 <= len(data):
        kind = data[pos]
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((kind, data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out


def parse_associate(body):
    """Body of an A-ASSOCIATE-RQ or -AC (after the 6-byte PDU header)."""
    called = body[4:20].decode(errors="replace").strip()
    calling = body[20:36].decode(errors="replace").strip()
    contexts = []  # RQ: (pcid, abstract, [ts]); AC: (pcid, result, ts)
    max_pdu = 0
    for kind, data in parse_items(body[68:]):
        if kind == 0x20:
            abstract, syntaxes = None, []
            for k, d in parse_items(data[4:]):
                if k == 0x30:
                    abstract = d.rstrip(b"\0").decode()
                elif k == 0x40:
                    syntaxes.append(d.rstrip(b"\0").decode())
            contexts.append((data[0], abstract, syntaxes))
        elif kind == 0x21:
            syntaxes = [d.rstrip(b"\0").decode() for k, d in parse_items(data[4:]) if k == 0x40]
            contexts.append((data[0], data[2], syntaxes[0] if syntaxes else None))
        elif kind == 0x50:
            for k, d in parse_items(data):
                if k == 0x51 and len(d) == 4:
                    max_pdu = struct.unpack(">I", d)[0]
    return called, calling, contexts, max_pdu


def element(group, elem, value):
    return struct.pack("<HHI", group, elem, len(value)) + value


def command(fields):
    """fields: [(elem, bytes)] of group 0000, any order. Returns the command set with its group length."""
    body = b"".join(element(0, e, v) for e, v in sorted(fields))
    return element(0, 0, struct.pack("<I", len(body))) + body


def us(v):
    return struct.pack("<H", v)


def ui(uid):
    return even(uid.encode())


def parse_command(data):
    fields = {}
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack("<HHI", data[pos:pos + 8])
        fields[(group << 16) | elem] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return fields


def field_us(fields, elem):
    v = fields.get(elem)
    return struct.unpack("<H", v[:2])[0] if v and len(v) >= 2 else None


def pdata(pcid, payload, is_command, max_pdu):
    """P-DATA-TF PDUs carrying `payload` as one message part, each PDU one PDV within `max_pdu`."""
    limit = (max_pdu or (1 << 20)) - 6
    out = []
    pos = 0
    while True:
        frag = payload[pos:pos + limit]
        pos += len(frag)
        last = pos >= len(payload)
        header = (1 if is_command else 0) | (2 if last else 0)
        out.append(pdu(P_DATA_TF, struct.pack(">IBB", len(frag) + 2, pcid, header) + frag))
        if last:
            return b"".join(out)


# ---------------------------------------------------------------------------------------------
# Client


class Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise DicomError("connection closed by peer")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def pdu(self):
        header = self.exact(6)
        kind, _, length = struct.unpack(">BBI", header)
        return kind, self.exact(length)


def tls_context(ca, cert=None, key=None):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class Association:
    def __init__(self, host, port, called, calling, contexts, tls=None, identity=None,
                 max_pdu=16384, timeout=30.0, bind=""):
        self.contexts = contexts
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(bind, 0) if bind else None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.reader = Reader(sock)
        self.msg_id = 0
        sock.sendall(associate_rq(called, calling, contexts, max_pdu, identity))
        kind, body = self.reader.pdu()
        if kind == A_ASSOCIATE_RJ:
            self.close()
            raise DicomError(f"association rejected {body[1]}/{body[2]}/{body[3]}")
        if kind != A_ASSOCIATE_AC:
            self.close()
            raise DicomError(f"association answered with PDU type {kind:#x}")
        _, _, results, self.peer_max_pdu = parse_associate(body)
        self.accepted = {}  # abstract syntax -> (pcid, transfer syntax)
        for pcid, result, ts in results:
            if result == 0:
                abstract = contexts[(pcid - 1) // 2][0]
                self.accepted[abstract] = (pcid, ts)
        if not self.accepted:
            self.abort()
            raise DicomError("no presentation context accepted")

    def tls_info(self):
        if isinstance(self.sock, ssl.SSLSocket):
            return f"{self.sock.version()} {self.sock.cipher()[0]}"
        return "plain"

    def next_id(self):
        self.msg_id = (self.msg_id % 65535) + 1
        return self.msg_id

    def context(self, abstract):
        try:
            return self.accepted[abstract]
        except KeyError:
            raise DicomError(f"no accepted context for {abstract}") from None

    def read_message(self):
        """One whole DIMSE message: (command fields, data set bytes or None)."""
        cmd = bytearray()
        data = None
        fields = None
        while True:
            kind, body = self.reader.pdu()
            if kind == A_ABORT:
                raise DicomError("A-ABORT received")
            if kind != P_DATA_TF:
                raise DicomError(f"unexpected PDU type {kind:#x}")
            pos = 0
            while pos + 6 <= len(body):
                length = struct.unpack(">I", body[pos:pos + 4])[0]
                header = body[pos + 5]
                frag = body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if header & 1:
                    cmd += frag
                    if header & 2:
                        fields = parse_command(bytes(cmd))
                        if field_us(fields, 0x0800) == NO_DATA_SET:
                            return fields, None
                        data = bytearray()
                else:
                    if data is None:
                        data = bytearray()
                    data += frag
                    if header & 2 and fields is not None:
                        return fields, bytes(data)

    def echo(self):
        pcid, _ = self.context(VERIFICATION)
        cmd = command([(0x0002, ui(VERIFICATION)), (0x0100, us(C_ECHO_RQ)), (0x0110, us(self.next_id())),
                       (0x0800, us(NO_DATA_SET))])
        self.sock.sendall(pdata(pcid, cmd, True, self.peer_max_pdu))
        fields, _ = self.read_message()
        return field_us(fields, 0x0900)

    def store_pdus(self, sop_class, sop_instance, dataset):
        """The whole C-STORE-RQ (command and data set PDUs), ready to send. Message ID is fixed at 1:
        build once, send many times."""
        pcid, _ = self.context(sop_class)
        cmd = command([(0x0002, ui(sop_class)), (0x0100, us(C_STORE_RQ)), (0x0110, us(1)),
                       (0x0700, us(0)), (0x0800, us(0)), (0x1000, ui(sop_instance))])
        return pdata(pcid, cmd, True, self.peer_max_pdu) + pdata(pcid, dataset, False, self.peer_max_pdu)

    def send_and_status(self, wire):
        self.sock.sendall(wire)
        fields, _ = self.read_message()
        return field_us(fields, 0x0900)

    def find(self, identifier):
        """C-FIND-RQ with an Implicit VR LE identifier; returns (matches, final status)."""
        pcid, _ = self.context(STUDY_ROOT_FIND)
        cmd = command([(0x0002, ui(STUDY_ROOT_FIND)), (0x0100, us(C_FIND_RQ)), (0x0110, us(self.next_id())),
                       (0x0700, us(0)), (0x0800, us(0))])
        self.sock.sendall(pdata(pcid, cmd, True, self.peer_max_pdu) + pdata(pcid, identifier, False, self.peer_max_pdu))
        matches = 0
        while True:
            fields, _ = self.read_message()
            status = field_us(fields, 0x0900)
            if status in (0xFF00, 0xFF01):
                matches += 1
                continue
            return matches, status

    def release(self):
        try:
            self.sock.sendall(pdu(A_RELEASE_RQ, bytes(4)))
            while True:
                kind, _ = self.reader.pdu()
                if kind in (A_RELEASE_RP, A_ABORT):
                    break
        finally:
            self.close()

    def abort(self):
        try:
            self.sock.sendall(pdu(A_ABORT, bytes(4)))
        except OSError:
            pass
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def identity_of(args):
    if args.jwt_file:
        with open(args.jwt_file, "rb") as f:
            return (5, f.read().strip(), b"", False)
    if args.user:
        return (2, args.user.encode(), args.password.encode(), False)
    return None


def tls_of(args):
    return tls_context(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None


def connect(args, contexts, tls=None):
    return Association(args.host, args.port, args.called, args.calling, contexts,
                       tls=tls if tls is not None else tls_of(args), identity=identity_of(args),
                       timeout=args.timeout, bind=args.bind)


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------
# Client workloads


def cmd_setup(args):
    tls = tls_of(args)
    contexts = [(VERIFICATION, [IMPLICIT_LE])]
    lat, errors, info = [], [], None
    deadline = time.monotonic() + args.max_seconds
    for i in range(args.warmup + args.n):
        if time.monotonic() > deadline:
            errors.append("time limit reached")
            break
        t0 = time.perf_counter()
        try:
            a = connect(args, contexts, tls)
            status = a.echo()
            t1 = time.perf_counter()
            info = a.tls_info()
            a.release()
            if status != 0:
                raise DicomError(f"C-ECHO status {status}")
            if i >= args.warmup:
                lat.append((t1 - t0) * 1000.0)
        except (OSError, DicomError) as e:
            errors.append(str(e))
    return {"latencies_ms": lat, "errors": len(errors), "first_errors": errors[:3], "tls": info}


def find_identifier(patient_id):
    """Study-level C-FIND identifier, Implicit VR Little Endian, elements in tag order."""
    def el(group, elem, value):
        return struct.pack("<HHI", group, elem, len(value)) + value
    pid = patient_id.encode()
    pid += b" " * (len(pid) % 2)
    return b"".join([
        el(0x0008, 0x0020, b""),                      # StudyDate
        el(0x0008, 0x0052, b"STUDY "),                # QueryRetrieveLevel
        el(0x0010, 0x0010, b""),                      # PatientName
        el(0x0010, 0x0020, pid),                      # PatientID
        el(0x0020, 0x000D, b""),                      # StudyInstanceUID
    ])


def cmd_find(args):
    contexts = [(STUDY_ROOT_FIND, [IMPLICIT_LE])]
    lat, errors, matches = [], [], set()
    identifier = find_identifier(args.patient_id)
    deadline = time.monotonic() + args.max_seconds
    try:
        a = connect(args, contexts)
    except (OSError, DicomError) as e:
        return {"latencies_ms": [], "errors": 1, "first_errors": [str(e)]}
    try:
        for i in range(args.warmup + args.n):
            if time.monotonic() > deadline:
                errors.append("time limit reached")
                break
            t0 = time.perf_counter()
            n, status = a.find(identifier)
            t1 = time.perf_counter()
            if status != 0:
                errors.append(f"C-FIND status {status:#06x}")
            matches.add(n)
            if i >= args.warmup:
                lat.append((t1 - t0) * 1000.0)
        a.release()
    except (OSError, DicomError) as e:
        errors.append(str(e))
        a.close()
    return {"latencies_ms": lat, "errors": len(errors), "first_errors": errors[:3], "matches": sorted(matches)}


def read_part10(path):
    """(SOP class UID, SOP instance UID, transfer syntax, data set bytes) of a DICOM file."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[128:132] != b"DICM":
        raise DicomError(f"{path}: not a DICOM Part 10 file")
    pos = 132
    meta = {}
    # Group 0002 is always Explicit VR Little Endian.
    while pos + 8 <= len(raw):
        group, elem = struct.unpack("<HH", raw[pos:pos + 4])
        if group != 0x0002:
            break
        vr = raw[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = struct.unpack("<I", raw[pos + 8:pos + 12])[0]
            start = pos + 12
        else:
            length = struct.unpack("<H", raw[pos + 6:pos + 8])[0]
            start = pos + 8
        meta[elem] = raw[start:start + length]
        pos = start + length
    def text(e):
        return meta[e].rstrip(b"\0 ").decode()
    return text(0x0002), text(0x0003), text(0x0010), raw[pos:]


def cmd_concurrent(args):
    files = sorted(os.path.join(args.files, f) for f in os.listdir(args.files) if f.endswith(".dcm"))
    files = files[:max(1, args.per_assoc)]
    objects = [read_part10(p) for p in files]
    contexts = sorted({(o[0], o[2]) for o in objects})
    contexts = [(abstract, [ts]) for abstract, ts in contexts]
    tls = tls_of(args)
    identity = identity_of(args)
    start = threading.Barrier(args.assocs + 1)
    lock = threading.Lock()
    totals = {"stored": 0, "bytes": 0, "errors": 0, "failed_associations": 0, "first_errors": []}
    ends = []

    def note_error(msg, assoc_failed):
        with lock:
            totals["errors"] += 1
            totals["failed_associations"] += 1 if assoc_failed else 0
            if len(totals["first_errors"]) < 5:
                totals["first_errors"].append(msg)

    def worker():
        try:
            start.wait(timeout=60)
        except threading.BrokenBarrierError:
            note_error("start barrier broken", True)
            return
        stored = nbytes = 0
        try:
            a = Association(args.host, args.port, args.called, args.calling, contexts, tls=tls,
                            identity=identity, timeout=args.timeout, bind=args.bind)
        except (OSError, DicomError) as e:
            note_error(f"associate: {e}", True)
            return
        try:
            wires = [a.store_pdus(o[0], o[1], o[3]) for o in objects]
            for k in range(args.per_assoc):
                wire = wires[k % len(wires)]
                status = a.send_and_status(wire)
                if status == 0:
                    stored += 1
                    nbytes += len(objects[k % len(objects)][3])
                else:
                    note_error(f"C-STORE status {status}", False)
            a.release()
        except (OSError, DicomError) as e:
            note_error(f"store: {e}", True)
            a.close()
        with lock:
            totals["stored"] += stored
            totals["bytes"] += nbytes
            ends.append(time.perf_counter())

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.assocs)]
    for t in threads:
        t.start()
    if args.start_at:  # several client processes start together at this wall-clock time
        time.sleep(max(0.0, args.start_at - time.time()))
    start.wait(timeout=60)
    t0 = time.perf_counter()
    wall0 = time.time()
    for t in threads:
        t.join(timeout=max(1.0, args.max_seconds - (time.perf_counter() - t0)))
    hung = sum(1 for t in threads if t.is_alive())
    elapsed = (max(ends) if ends else time.perf_counter()) - t0
    totals["hung_associations"] = hung
    totals["wall_start"] = wall0
    totals["wall_end"] = wall0 + elapsed
    totals["errors"] += hung
    totals["seconds"] = elapsed
    totals["mb_per_s"] = totals["bytes"] / 1e6 / elapsed if elapsed > 0 else 0.0
    totals["instances_per_s"] = totals["stored"] / elapsed if elapsed > 0 else 0.0
    totals["expected"] = args.assocs * args.per_assoc
    return totals


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def cmd_idle(args):
    tls = tls_of(args)
    contexts = [(VERIFICATION, [IMPLICIT_LE])]
    held, errors = [], []
    # Warm up (first TLS handshakes, lazily built state), then take the baseline.
    for _ in range(args.warmup):
        try:
            a = connect(args, contexts, tls)
            a.echo()
            a.release()
        except (OSError, DicomError) as e:
            errors.append(f"warmup: {e}")
    time.sleep(args.settle)
    before = rss_kib(args.pid)
    deadline = time.monotonic() + args.max_seconds
    for _ in range(args.n):
        if time.monotonic() > deadline:
            errors.append("time limit reached")
            break
        try:
            a = connect(args, contexts, tls)
            if a.echo() != 0:
                raise DicomError("C-ECHO failed")
            held.append(a)
        except (OSError, DicomError) as e:
            errors.append(str(e))
    time.sleep(args.settle)
    after = rss_kib(args.pid)
    for a in held:
        try:
            a.release()
        except (OSError, DicomError):
            a.close()
    n = len(held)
    return {"held": n, "rss_before_kib": before, "rss_after_kib": after,
            "per_association_kib": (after - before) / n if n else None,
            "errors": len(errors), "first_errors": errors[:3]}


# ---------------------------------------------------------------------------------------------
# Server: accept everything, answer C-ECHO, release.


async def hold_connection(reader, writer):
    try:
        header = await reader.readexactly(6)
        kind, _, length = struct.unpack(">BBI", header)
        if kind != A_ASSOCIATE_RQ or length > 1 << 20:
            return
        body = await reader.readexactly(length)
        called, calling, contexts, _ = parse_associate(body)
        items = item(0x10, APP_CONTEXT)
        for pcid, _, syntaxes in contexts:
            ts = syntaxes[0] if syntaxes else IMPLICIT_LE
            items += item(0x21, bytes([pcid, 0, 0, 0]) + item(0x40, ts.encode()))
        items += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, IMPLEMENTATION_UID))
        writer.write(pdu(A_ASSOCIATE_AC, struct.pack(">HH", 1, 0) + ae(called) + ae(calling) + bytes(32) + items))
        await writer.drain()
        cmd = bytearray()
        while True:
            header = await reader.readexactly(6)
            kind, _, length = struct.unpack(">BBI", header)
            if length > 1 << 24:
                return
            body = await reader.readexactly(length)
            if kind == A_RELEASE_RQ:
                writer.write(pdu(A_RELEASE_RP, bytes(4)))
                await writer.drain()
                return
            if kind != P_DATA_TF:
                return
            pos = 0
            while pos + 6 <= len(body):
                plen = struct.unpack(">I", body[pos:pos + 4])[0]
                pcid, mch = body[pos + 4], body[pos + 5]
                if mch & 1:
                    cmd += body[pos + 6:pos + 4 + plen]
                    if mch & 2:
                        fields = parse_command(bytes(cmd))
                        cmd = bytearray()
                        if field_us(fields, 0x0100) == C_ECHO_RQ:
                            rsp = command([(0x0002, ui(VERIFICATION)), (0x0100, us(0x8030)),
                                           (0x0120, us(field_us(fields, 0x0110) or 0)),
                                           (0x0800, us(NO_DATA_SET)), (0x0900, us(0))])
                            writer.write(pdata(pcid, rsp, True, 16384))
                            await writer.drain()
                pos += 4 + plen
    except (asyncio.IncompleteReadError, OSError):
        pass
    finally:
        writer.close()


async def hold_main(args):
    server = await asyncio.start_server(hold_connection, "127.0.0.1", args.port, backlog=4096)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--bind", default="", help="local address to connect from (127.0.0.x)")
    common.add_argument("--port", type=int, required=True)
    common.add_argument("--called", default="ANY-SCP")
    common.add_argument("--calling", default="BENCHSCU")
    common.add_argument("--timeout", type=float, default=30.0)
    common.add_argument("--max-seconds", type=float, default=300.0, help="stop the loop after this long")
    common.add_argument("--tls-ca")
    common.add_argument("--tls-cert")
    common.add_argument("--tls-key")
    common.add_argument("--jwt-file")
    common.add_argument("--user")
    common.add_argument("--password")
    p = sub.add_parser("setup", parents=[common])
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3)
    p = sub.add_parser("find", parents=[common])
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--patient-id", required=True)
    p = sub.add_parser("concurrent", parents=[common])
    p.add_argument("--assocs", type=int, default=200)
    p.add_argument("--per-assoc", type=int, default=20)
    p.add_argument("--files", required=True, help="folder of .dcm files (the first --per-assoc are sent)")
    p.add_argument("--start-at", type=float, default=0.0, help="wall-clock time (time.time()) to start at")
    p = sub.add_parser("idle", parents=[common])
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--settle", type=float, default=1.0)
    p = sub.add_parser("hold")
    p.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    if args.cmd == "hold":
        asyncio.run(hold_main(args))
        return 0
    result = {"setup": cmd_setup, "find": cmd_find, "concurrent": cmd_concurrent, "idle": cmd_idle}[args.cmd](args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
