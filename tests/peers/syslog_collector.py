#!/usr/bin/env python3
"""A syslog collector for pacsgate's audit tests: RFC 5425 (octet-counted frames over TLS) or RFC 5426 (UDP).

  tls   --port P --cert F --key F --out FILE [--stall-after N] [--rcvbuf BYTES] [--maxseg BYTES]
        Accepts TLS connections; appends one JSON line per message to FILE: {"conn": i, "msg": "..."}.
        With --stall-after N the first connection stops reading after N messages and is held open, never
        read again (a collector that stops reading); later connections are read normally. --rcvbuf and
        --maxseg (the MSS it announces) keep the sender's socket buffers small, so that they fill soon.
  udp   --port P --out FILE
        Appends one JSON line per datagram: {"conn": 0, "msg": "..."}.
  drop  --port P --out FILE
        Accepts TCP connections and closes each at once (a collector that is unreachable for TLS);
        appends one JSON line per accepted connection: {"accepted": monotonic seconds}.

  parse --out FILE
        Reads FILE (as written by the modes above) and prints ONE JSON array on stdout, one object per
        message: {"conn", "header": [PRI+VERSION, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID],
        "parsed": bool, "error": str | null, "event_id", "outcome", "user_id", "alternative_user_id",
        "source_id"}; the XML is parsed by Python's xml.etree (expat), which refuses what XML 1.0 does not allow.

Every serving mode binds 127.0.0.1, writes "listening" to FILE's sibling FILE.ready once bound, and exits after
--max-seconds (default 120).
"""

import argparse
import json
import socket
import ssl
import sys
import threading
import time

lock = threading.Lock()


def emit(out, record):
    with lock:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_frames(conn, index, out, stall_after):
    """Reads octet-counted frames until the peer closes; with stall_after, stops reading after that many."""
    buf = b""
    count = 0
    try:
        while True:
            if stall_after is not None and count >= stall_after:
                while True:  # never read again; the gateway's writes back up into the socket buffers
                    time.sleep(3600)
            while b" " not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            length, _, rest = buf.partition(b" ")
            n = int(length)
            while len(rest) < n:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                rest += chunk
            emit(out, {"conn": index, "msg": rest[:n].decode("utf-8", "replace")})
            buf = rest[n:]
            count += 1
    except (OSError, ValueError, ssl.SSLError):
        return


def serve_tls(args):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    if args.maxseg:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, args.maxseg)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(16)
    sock.settimeout(1.0)
    ready(args)
    index = 0
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        try:
            raw, _ = sock.accept()
        except socket.timeout:
            continue
        try:
            raw.settimeout(10.0)
            conn = ctx.wrap_socket(raw, server_side=True)
            conn.settimeout(None)
        except (OSError, ssl.SSLError):
            raw.close()
            continue
        stall = args.stall_after if index == 0 else None
        threading.Thread(target=read_frames, args=(conn, index, args.out, stall), daemon=True).start()
        index += 1


def serve_udp(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", args.port))
    sock.settimeout(1.0)
    ready(args)
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        emit(args.out, {"conn": 0, "msg": data.decode("utf-8", "replace")})


def serve_drop(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(64)
    sock.settimeout(1.0)
    ready(args)
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        try:
            conn, _ = sock.accept()
        except socket.timeout:
            continue
        emit(args.out, {"accepted": time.monotonic()})
        conn.close()


def parse(args):
    import xml.etree.ElementTree as ET

    out = []
    with open(args.out, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            msg = record.get("msg")
            if msg is None:
                continue
            header, _, xml = msg.partition("<?xml")
            item = {"conn": record["conn"], "header": header.split(" ")[:6], "parsed": False, "error": None,
                    "event_id": None, "outcome": None, "user_id": None, "alternative_user_id": None,
                    "source_id": None}
            try:
                root = ET.fromstring(("<?xml" + xml).encode("utf-8"))
                item["parsed"] = True
                ident = root.find("EventIdentification")
                item["outcome"] = ident.get("EventOutcomeIndicator")
                item["event_id"] = ident.find("EventID").get("csd-code")
                requestor = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
                if requestor:
                    item["user_id"] = requestor[0].get("UserID")
                    item["alternative_user_id"] = requestor[0].get("AlternativeUserID")
                item["source_id"] = root.find("AuditSourceIdentification").get("AuditSourceID")
            except ET.ParseError as e:
                item["error"] = str(e)
            out.append(item)
    json.dump(out, sys.stdout)
    return 0


def ready(args):
    with open(args.out + ".ready", "w", encoding="utf-8") as f:
        f.write("listening\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["tls", "udp", "drop", "parse"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--stall-after", type=int)
    parser.add_argument("--rcvbuf", type=int)
    parser.add_argument("--maxseg", type=int)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    if args.mode == "parse":
        return parse(args)
    {"tls": serve_tls, "udp": serve_udp, "drop": serve_drop}[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
