#!/usr/bin/env python3
"""A C-MOVE requestor that makes `pacsgate connect` hold identifiers: on each of ASSOCIATIONS plain
associations to connect, on each of CONTEXTS Study Root MOVE presentation contexts, a C-MOVE-RQ to
DESTINATION whose identifier arrives as CHUNK bytes in fragments that are not the last; then, after
all are sent, the last (empty) fragment of each, and the C-MOVE responses. Built on bench/lib/dicom_ul.py.

Usage: move_hold.py PORT ASSOCIATIONS CONTEXTS CHUNK DESTINATION
Prints ONE JSON object: {"statuses": [[status, ...] per association], "error": text | null}
"""

import json
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "lib"))
import dicom_ul as ul  # noqa: E402

MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
C_MOVE_RQ = 0x0021
DEADLINE = 90.0


def move_command(msg_id, destination):
    return ul.command([
        (0x0002, ul.ui(MOVE)),
        (0x0100, ul.us(C_MOVE_RQ)),
        (0x0110, ul.us(msg_id)),
        (0x0600, ul.even(destination.encode()).replace(b"\0", b" ")),
        (0x0700, ul.us(0)),
        (0x0800, ul.us(0)),
    ])


def fragments(pcid, payload, max_pdu):
    """P-DATA-TFs carrying `payload` as data set fragments, none of them the last."""
    limit = (max_pdu or (1 << 20)) - 6
    out = []
    for pos in range(0, len(payload), limit):
        frag = payload[pos:pos + limit]
        out.append(ul.pdu(ul.P_DATA_TF, struct.pack(">IBB", len(frag) + 2, pcid, 0) + frag))
    return b"".join(out)


def main():
    port, n_assoc, n_ctx, chunk, destination = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                                 int(sys.argv[4]), sys.argv[5])
    report = {"statuses": [], "error": None}
    started = time.monotonic()
    assocs = []
    try:
        for a in range(n_assoc):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            contexts = [(MOVE, [IMPLICIT_LE])] * n_ctx
            sock.sendall(ul.associate_rq("ARCHIVE", "HOLDSCU", contexts, 1 << 20))
            reader = ul.Reader(sock)
            kind, body = reader.pdu()
            if kind != ul.A_ASSOCIATE_AC:
                raise ul.DicomError(f"association {a}: PDU type {kind}")
            _, _, results, max_pdu = ul.parse_associate(body)
            accepted = [pcid for pcid, result, _ in results if result == 0]
            assocs.append((sock, reader, accepted, max_pdu))
        payload = bytes(chunk)
        for sock, _, accepted, max_pdu in assocs:
            for i, pcid in enumerate(accepted):
                sock.sendall(ul.pdata(pcid, move_command(i + 1, destination), True, max_pdu))
                sock.sendall(fragments(pcid, payload, max_pdu))
        time.sleep(1.0)
        for sock, reader, accepted, _ in assocs:
            for pcid in accepted:
                sock.sendall(ul.pdu(ul.P_DATA_TF, struct.pack(">IBB", 2, pcid, 2)))
            statuses = []
            while len(statuses) < len(accepted) and time.monotonic() - started < DEADLINE:
                kind, body = reader.pdu()
                if kind != ul.P_DATA_TF:
                    raise ul.DicomError(f"PDU type {kind} while waiting for C-MOVE responses")
                pos = 0
                while pos + 6 <= len(body):
                    length = struct.unpack(">I", body[pos:pos + 4])[0]
                    header = body[pos + 5]
                    data = body[pos + 6:pos + 4 + length]
                    pos += 4 + length
                    if header & 1:
                        fields = ul.parse_command(data)
                        status = ul.field_us(fields, 0x0900)
                        if status not in (0xFF00, 0xFF01):
                            statuses.append(status)
            report["statuses"].append(statuses)
    except (OSError, ul.DicomError) as e:
        report["error"] = str(e)
    for sock, _, _, _ in assocs:
        try:
            sock.sendall(ul.pdu(ul.A_ABORT, bytes(4)))
            sock.close()
        except OSError:
            pass
    print(json.dumps(report))


if __name__ == "__main__":
    main()
