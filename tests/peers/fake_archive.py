#!/usr/bin/env python3
"""A raw-socket DICOM archive that misbehaves on purpose, for pacsgate's hostile / failing-archive tests.

  fake_archive.py --port PORT --mode MODE --record FILE [--delay SECONDS]

It speaks just enough of PS3.8 by hand: it answers an A-ASSOCIATE-RQ with an A-ASSOCIATE-AC that accepts
every presentation context with its first transfer syntax, answers C-ECHO-RQ with success, and then:

  record          answers release with A-RELEASE-RP; otherwise only records
  drop-on-data    closes the TCP connection (no A-ABORT) when the first data set fragment arrives
  abort-on-data   sends A-ABORT when the first data set fragment arrives
  slow-accept     waits --delay seconds before answering the A-ASSOCIATE-RQ
  silent          accepts the association, then never answers anything (no C-ECHO-RSP, no release)
  no-release      on A-RELEASE-RQ, closes the TCP connection without A-RELEASE-RP
  find-stray-id   answers a C-FIND-RQ with a match, then a match for another message ID (ID + 100),
                  then the final response (the security review's hostile archive, 2026-12-02)
  find-after-final answers a C-FIND-RQ with a match, the final response, then one more match
  echo-stray-id   answers a C-ECHO-RQ for message ID ID + 100 instead of ID

C-FIND matches carry PatientName TRACKED^ONE / UNTRACKED^MID / AFTER^FINAL and RetrieveAETitle
ROGUE_A / ROGUE_B / ROGUE_C, so a test can tell which of them reached the client.

Every PDU received is recorded as one JSON line in FILE: {"conn": n, "type": t, "length": n}, and every
connection's end as {"conn": n, "closed": true}. Listens on 127.0.0.1 only; exits when killed.
"""

import argparse
import json
import socket
import struct
import threading
import time

LOCK = threading.Lock()


def read_exact(conn, n):
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def items(body, start):
    out, i = [], start
    while i + 4 <= len(body):
        t, n = body[i], struct.unpack(">H", body[i + 2:i + 4])[0]
        out.append((t, body[i + 4:i + 4 + n]))
        i += 4 + n
    return out


def item(t, value):
    return bytes([t, 0]) + struct.pack(">H", len(value)) + value


def associate_ac(rq_body):
    """An A-ASSOCIATE-AC for the request body: every context accepted with its first transfer syntax."""
    fixed = rq_body[:68]  # version, reserved, called AE, calling AE, reserved: echoed back
    out = b""
    for t, v in items(rq_body, 68):
        if t == 0x10:
            out += item(0x10, v)
        elif t == 0x20:
            pc_id = v[0]
            ts = [sv for st, sv in items(v, 4) if st == 0x40]
            out += item(0x21, bytes([pc_id, 0, 0, 0]) + item(0x40, ts[0] if ts else b"1.2.840.10008.1.2"))
    out += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    body = fixed + out
    return bytes([2, 0]) + struct.pack(">I", len(body)) + body


def element(group, elem, value):
    return struct.pack("<HHI", group, elem, len(value)) + value


def echo_rsp(message_id, sop_class=b"1.2.840.10008.1.1\0"):
    rest = (element(0x0000, 0x0002, sop_class) + element(0x0000, 0x0100, struct.pack("<H", 0x8030))
            + element(0x0000, 0x0120, struct.pack("<H", message_id))
            + element(0x0000, 0x0800, struct.pack("<H", 0x0101)) + element(0x0000, 0x0900, struct.pack("<H", 0)))
    return element(0x0000, 0x0000, struct.pack("<I", len(rest))) + rest


def pdata(pc_id, command, header=0x03):
    pdv = struct.pack(">I", len(command) + 2) + bytes([pc_id, header]) + command
    return bytes([4, 0]) + struct.pack(">I", len(pdv)) + pdv


def even(value):
    return value + b" " if len(value) % 2 else value


def find_rsp(message_id, status, has_data):
    rest = (element(0x0000, 0x0002, b"1.2.840.10008.5.1.4.1.2.2.1\0")
            + element(0x0000, 0x0100, struct.pack("<H", 0x8020))
            + element(0x0000, 0x0120, struct.pack("<H", message_id))
            + element(0x0000, 0x0800, struct.pack("<H", 0x0000 if has_data else 0x0101))
            + element(0x0000, 0x0900, struct.pack("<H", status)))
    return element(0x0000, 0x0000, struct.pack("<I", len(rest))) + rest


def match(pid, name, aet):
    return (element(0x0008, 0x0052, b"STUDY ") + element(0x0008, 0x0054, even(aet))
            + element(0x0010, 0x0010, even(name)) + element(0x0010, 0x0020, even(pid))
            + element(0x0020, 0x000D, even(b"1.2.3.4")))


def find_answers(mode, pc_id, mid):
    def pending(m, pid, name, aet):
        return pdata(pc_id, find_rsp(m, 0xFF00, True)) + pdata(pc_id, match(pid, name, aet), 0x02)
    out = pending(mid, b"P1", b"TRACKED^ONE", b"ROGUE_A")
    if mode == "find-stray-id":
        out += pending((mid + 100) & 0xFFFF, b"P2", b"UNTRACKED^MID", b"ROGUE_B")
        out += pdata(pc_id, find_rsp(mid, 0x0000, False))
    else:
        out += pdata(pc_id, find_rsp(mid, 0x0000, False))
        out += pending(mid, b"P3", b"AFTER^FINAL", b"ROGUE_C")
    return out


def command_field(cmd):
    i = 0
    fields = {}
    while i + 8 <= len(cmd):
        g, e, n = struct.unpack("<HHI", cmd[i:i + 8])
        fields[(g, e)] = cmd[i + 8:i + 8 + n]
        i += 8 + n
    return fields


def serve(conn, n, args, record):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    command = b""
    find = None  # (presentation context, message ID) of a C-FIND-RQ whose identifier is coming
    try:
        while True:
            header = read_exact(conn, 6)
            if header is None:
                break
            length = struct.unpack(">I", header[2:6])[0]
            body = read_exact(conn, length) if length <= 1 << 24 else None
            if body is None:
                break
            kind = header[0]
            record({"conn": n, "type": kind, "length": length})
            if kind == 1:
                if args.mode == "slow-accept":
                    time.sleep(args.delay)
                conn.sendall(associate_ac(body))
            elif kind == 4:
                i = 0
                while i + 6 <= len(body):
                    plen = struct.unpack(">I", body[i:i + 4])[0]
                    pc_id, mch, value = body[i + 4], body[i + 5], body[i + 6:i + 4 + plen]
                    i += 4 + plen
                    if not mch & 1:
                        if args.mode == "drop-on-data":
                            conn.shutdown(socket.SHUT_RDWR)
                            conn.close()
                            return
                        if args.mode == "abort-on-data":
                            conn.sendall(bytes([7, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
                            time.sleep(0.5)
                            conn.close()
                            return
                        if find is not None and mch & 2:
                            conn.sendall(find_answers(args.mode, *find))
                            find = None
                        continue
                    command += value
                    if mch & 2:
                        fields = command_field(command)
                        command = b""
                        if args.mode == "silent":
                            continue
                        mid = struct.unpack("<H", fields.get((0, 0x110), b"\0\0"))[0]
                        if fields.get((0, 0x100)) == struct.pack("<H", 0x0030):
                            if args.mode == "echo-stray-id":
                                mid = (mid + 100) & 0xFFFF
                            conn.sendall(pdata(pc_id, echo_rsp(mid)))
                        elif (fields.get((0, 0x100)) == struct.pack("<H", 0x0020)
                              and args.mode in ("find-stray-id", "find-after-final")):
                            find = (pc_id, mid)
            elif kind == 5:
                if args.mode == "no-release":
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                    return
                if args.mode != "silent":
                    conn.sendall(bytes([6, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
            elif kind == 7:
                break
    except OSError:
        pass
    finally:
        record({"conn": n, "closed": True})
        try:
            conn.close()
        except OSError:
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", required=True,
                    choices=["record", "drop-on-data", "abort-on-data", "slow-accept", "silent", "no-release",
                             "find-stray-id", "find-after-final", "echo-stray-id"])
    ap.add_argument("--record", required=True)
    ap.add_argument("--delay", type=float, default=10.0)
    args = ap.parse_args()
    out = open(args.record, "a", encoding="utf-8")

    def record(obj):
        with LOCK:
            out.write(json.dumps(obj) + "\n")
            out.flush()

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(64)
    n = 0
    while True:
        conn, _ = srv.accept()
        n += 1
        threading.Thread(target=serve, args=(conn, n, args, record), daemon=True).start()


if __name__ == "__main__":
    main()
