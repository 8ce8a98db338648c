#!/usr/bin/env python3
"""A raw DIMSE requestor for pacsgate's bypass tests: sends command sets and data sets exactly as given
(repeated or out-of-order tags, deep nesting, reused message IDs, a command on the wrong presentation
context), over TLS with a User Identity, and reports what came back. Built on bench/lib/dicom_ul.py.

Usage: raw_dimse.py PLAN.json   (prints ONE JSON object on stdout)
PLAN: {"port": N, "ca": PATH, "user": U, "password": P, "called": AE, "calling": AE,
       "contexts": [abstract syntax, ...]            (IDs 1, 3, 5, ... ; Implicit VR Little Endian only)
       "messages": [{"context": index, "command": HEX, "data": HEX or null}, ...],
       "send_all_first": bool,                         (else: one message, its final response, the next)
       "then_echo": bool}                              (a C-ECHO on context 0 at the end, if Verification)
Report: {"accepted": bool, "rejection": [r, s, reason] | null, "responses": [{"field", "responded_to",
         "status", "has_data"}], "aborted": bool, "closed": bool, "echo": status | null, "error": text}
"""

import json
import os
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "lib"))
import dicom_ul as ul  # noqa: E402

IMPLICIT_LE = "1.2.840.10008.1.2"
PENDING = (0xFF00, 0xFF01)


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    report = {"accepted": False, "rejection": None, "responses": [], "aborted": False,
              "closed": False, "echo": None, "error": None}
    contexts = [(a, [IMPLICIT_LE]) for a in plan["contexts"]]
    identity = (2, plan["user"].encode(), plan["password"].encode(), False)
    try:
        assoc = ul.Association("127.0.0.1", plan["port"], plan.get("called", "ARCHIVE"),
                               plan.get("calling", "RAWSCU"), contexts,
                               tls=ul.tls_context(plan["ca"]), identity=identity,
                               timeout=plan.get("timeout", 30))
    except ul.DicomError as e:
        text = str(e)
        report["error"] = text
        if text.startswith("association rejected"):
            report["rejection"] = [int(x) for x in text.split()[-1].split("/")]
        print(json.dumps(report))
        return
    report["accepted"] = True
    wire = []
    for m in plan["messages"]:
        pcid = 2 * m["context"] + 1
        out = ul.pdata(pcid, bytes.fromhex(m["command"]), True, assoc.peer_max_pdu)
        if m.get("data") is not None:
            out += ul.pdata(pcid, bytes.fromhex(m["data"]), False, assoc.peer_max_pdu)
        wire.append(out)

    def read_until_final(count):
        finals = 0
        while finals < count:
            fields, _ = assoc.read_message()
            status = ul.field_us(fields, 0x0900)
            report["responses"].append({
                "field": ul.field_us(fields, 0x0100),
                "responded_to": ul.field_us(fields, 0x0120),
                "status": status,
                "has_data": ul.field_us(fields, 0x0800) != ul.NO_DATA_SET,
            })
            if status not in PENDING:
                finals += 1

    try:
        if plan.get("send_all_first"):
            assoc.sock.sendall(b"".join(wire))
            read_until_final(len(wire))
        else:
            for w in wire:
                assoc.sock.sendall(w)
                read_until_final(1)
        if plan.get("then_echo"):
            report["echo"] = assoc.echo()
        assoc.release()
    except ul.DicomError as e:
        report["error"] = str(e)
        report["aborted"] = "A-ABORT" in str(e)
        report["closed"] = "closed" in str(e)
        assoc.close()
    except (socket.timeout, OSError) as e:
        report["error"] = f"{type(e).__name__}: {e}"
        report["closed"] = True
        assoc.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
