#!/usr/bin/env python3
"""Seed corpus for pacsgate's fuzz targets, from real traffic on loopback.

  fuzz/seeds/capture.py [--out fuzz/corpus]

Starts Orthanc (/usr/sbin/Orthanc) and the pynetdicom test archive (tests/peers/archive.py), puts a
recording TCP tee in front of each, and runs real clients through the tees: DCMTK echoscu / findscu /
storescu (with -usr/-pwd) and the pynetdicom client tests/peers/scu.py (echo, find, store, a password,
a JWT). Every byte each way is recorded, cut into PDUs, and written as seeds:

  pdu_framing/       [2-byte limit] + the start of each recorded byte stream
  association/       each A-ASSOCIATE-RQ / -AC / -RJ PDU
  user_identity/     the value of each User Identity sub-item (0x58)
  jwt_claims/        0x00 + a token as sent; 0x01 + header JSON + 0x00 + claims JSON
  dimse_command/     each reassembled command set
  dimse_identifier/  [0 implicit | 1 explicit] + each reassembled C-FIND identifier / match
  pdv_reassembly/    [role] + the P-DATA-TF PDUs of one association, both ways, in arrival order

Every process started here is killed by its own handle on exit. Loopback only.
"""

import argparse
import base64
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PEERS = os.path.join(ROOT, "tests", "peers")
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


class Tee:
    """Accepts on a free port, connects each client to 127.0.0.1:upstream, records both directions."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sessions = []  # [(direction 'c'|'a', time, bytes)]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            a = socket.create_connection(("127.0.0.1", self.upstream))
            chunks = []
            self.sessions.append(chunks)
            lock = threading.Lock()
            for src, dst, d in ((c, a, "c"), (a, c, "a")):
                threading.Thread(target=self.pump, args=(src, dst, d, chunks, lock), daemon=True).start()

    @staticmethod
    def pump(src, dst, d, chunks, lock):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with lock:
                chunks.append((d, time.monotonic(), data))
            try:
                dst.sendall(data)
            except OSError:
                return


def start(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    PROCS.append(p)
    return p


def run(cmd, env=None):
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
                   env=dict(os.environ, TCP_NODELAY="1", **(env or {})))


def pdus(stream):
    out = []
    while len(stream) >= 6:
        n = struct.unpack(">I", stream[2:6])[0]
        if len(stream) < 6 + n:
            break
        out.append(stream[: 6 + n])
        stream = stream[6 + n:]
    return out


def split_directions(chunks):
    """Both streams, and the PDUs of both directions in arrival order."""
    streams = {"c": b"", "a": b""}
    ordered = []
    pending = {"c": b"", "a": b""}
    for d, _, data in chunks:
        streams[d] += data
        pending[d] += data
        while len(pending[d]) >= 6:
            n = struct.unpack(">I", pending[d][2:6])[0]
            if len(pending[d]) < 6 + n:
                break
            ordered.append((d, pending[d][: 6 + n]))
            pending[d] = pending[d][6 + n:]
    return streams, ordered


def sub_items(body, start):
    """Items of an association PDU body from `start`: (type, value)."""
    items, i = [], start
    while i + 4 <= len(body):
        t, n = body[i], struct.unpack(">H", body[i + 2: i + 4])[0]
        items.append((t, body[i + 4: i + 4 + n]))
        i += 4 + n
    return items


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "fuzz", "corpus"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pacsgate-capture-")
    try:
        capture(args.out, tmp)
    finally:
        for p in PROCS:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def capture(out_dir, tmp):
    py = sys.executable
    # The archives.
    arch_port = free_port()
    start([py, os.path.join(PEERS, "archive.py"), "--port", str(arch_port), "--aet", "PYARCHIVE",
           "--record", os.path.join(tmp, "record.jsonl"), "--find-matches", "3"])
    o_dicom, o_http = free_port(), free_port()
    cfg = {"Name": "capture", "StorageDirectory": f"{tmp}/orthanc", "IndexDirectory": f"{tmp}/orthanc",
           "DicomAet": "ORTHANC", "DicomPort": o_dicom, "HttpPort": o_http, "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
           "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True,
           "DicomAlwaysAllowMove": True, "Plugins": [], "DicomAssociationCloseDelay": 0}
    with open(f"{tmp}/orthanc.json", "w") as f:
        json.dump(cfg, f)
    start(["/usr/sbin/Orthanc", f"{tmp}/orthanc.json"], cwd=tmp)
    wait_port(arch_port)
    wait_port(o_dicom)
    py_tee, o_tee = Tee(arch_port), Tee(o_dicom)

    # Data.
    spec = json.dumps([{"patient_id": "SEED1", "patient_name": "SEED^ONE", "instances": 2}])
    made = json.loads(subprocess.run([py, os.path.join(PEERS, "make_dicom.py"), "small", "--out", tmp,
                                      "--spec", spec], capture_output=True, check=True).stdout)
    files = [m["path"] for m in made]
    token = ("eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9." + base64.urlsafe_b64encode(json.dumps(
        {"iss": "https://idp.fuzz", "aud": "pacsgate", "sub": "carol", "exp": 4102444800,
         "realm_access": {"roles": ["clinician"]}}).encode()).decode().rstrip("=") + ".c2ln")

    # The clients.
    scu = [py, os.path.join(PEERS, "scu.py")]
    for port, aec in ((py_tee.port, "PYARCHIVE"), (o_tee.port, "ORTHANC")):
        p = str(port)
        run(scu + ["echo", "--port", p, "--aec", aec, "--user", "alice", "--password", "pw",
                   "--positive-response"])
        run(scu + ["echo", "--port", p, "--aec", aec, "--jwt", token])
        run(scu + ["store", "--port", p, "--aec", aec, "--user", "alice", "--password", "pw"] + files)
        run(scu + ["find", "--port", p, "--aec", aec, "-k", "PatientName=SEED*", "-k", "PatientID=",
                   "-k", "StudyInstanceUID="])
        run(scu + ["find", "--port", p, "--aec", aec, "--model", "patient", "--level", "PATIENT",
                   "-k", "PatientID=SEED1", "-k", "PatientName="])
        run(["/usr/bin/echoscu", "-aec", aec, "127.0.0.1", p])
        run(["/usr/bin/storescu", "-aec", aec, "-usr", "alice", "-pwd", "pw", "-xi", "127.0.0.1", p, files[0]])
        run(["/usr/bin/findscu", "-aec", aec, "-S", "-k", "QueryRetrieveLevel=STUDY", "-k",
             "PatientID=SEED1", "-k", "StudyInstanceUID", "-k", "PatientName", "127.0.0.1", p])
        run(["/usr/bin/findscu", "-aec", aec, "-P", "-xe", "-k", "QueryRetrieveLevel=PATIENT", "-k",
             "PatientID=SEED*", "-k", "PatientName", "127.0.0.1", p])
    time.sleep(1)

    seeds = {t: {} for t in ("pdu_framing", "association", "user_identity", "jwt_claims",
                             "dimse_command", "dimse_identifier", "pdv_reassembly")}

    def add(target, data):
        if data:
            seeds[target][hashlib.sha1(data).hexdigest()[:16]] = data

    for chunks in py_tee.sessions + o_tee.sessions:
        streams, ordered = split_directions(chunks)
        for d in ("c", "a"):
            add("pdu_framing", struct.pack("<H", 0x4000) + streams[d][:24_000])
        ts = {}  # presentation context id -> transfer syntax (from the A-ASSOCIATE-AC)
        seq = bytearray([0])
        cmd = {"c": b"", "a": b""}
        data = {"c": b"", "a": b""}
        last_field = {"c": 0, "a": 0}
        for d, pdu in ordered:
            if pdu[0] in (1, 2, 3):
                add("association", pdu)
            if pdu[0] in (1, 2):
                for t, v in sub_items(pdu[6:], 68):
                    if t == 0x21 and pdu[0] == 2:
                        for st, sv in sub_items(v, 4):
                            if st == 0x40:
                                ts[v[0]] = sv.decode().rstrip("\0")
                    if t == 0x50:
                        for st, sv in sub_items(v, 0):
                            if st == 0x58:
                                add("user_identity", sv)
                                if sv[0] == 5:
                                    n = struct.unpack(">H", sv[2:4])[0]
                                    add("jwt_claims", b"\0" + sv[4: 4 + n])
            if pdu[0] != 4:
                continue
            if len(pdu) - 6 <= 0xFFFF:
                seq += bytes([0 if d == "c" else 1]) + struct.pack(">H", len(pdu) - 6) + pdu[6:]
            i = 6
            while i + 6 <= len(pdu):
                n = struct.unpack(">I", pdu[i: i + 4])[0]
                pc, hdr, value = pdu[i + 4], pdu[i + 5], pdu[i + 6: i + 4 + n]
                i += 4 + n
                if hdr & 1:
                    cmd[d] += value
                    if hdr & 2:
                        add("dimse_command", cmd[d])
                        # (0000,0100) Command Field, to pick out identifiers (C-FIND).
                        j = cmd[d].find(b"\x00\x00\x00\x01\x02\x00\x00\x00")
                        last_field[d] = struct.unpack("<H", cmd[d][j + 8: j + 10])[0] if j >= 0 else 0
                        cmd[d] = b""
                else:
                    data[d] += value
                    if hdr & 2:
                        if last_field[d] & 0x7FFF in (0x20, 0x21, 0x10):
                            explicit = ts.get(pc, "1.2.840.10008.1.2") != "1.2.840.10008.1.2"
                            add("dimse_identifier", bytes([1 if explicit else 0]) + data[d])
                        data[d] = b""
        if len(seq) > 1:
            add("pdv_reassembly", bytes(seq[:60_000]))

    # Signed-claims seeds for jwt_claims (the target signs them with its own key).
    for claims in ({"iss": "https://idp.fuzz", "aud": "pacsgate", "sub": "carol", "exp": 4102444800,
                    "realm_access": {"roles": ["clinician"]}},
                   {"iss": "https://idp.fuzz", "aud": ["x", "pacsgate"], "sub": "dave", "exp": 4102444800,
                    "nbf": 0, "realm_access": {"roles": "reader clinician"}}):
        add("jwt_claims", b"\x01" + json.dumps({"alg": "ES256", "typ": "JWT"}).encode() + b"\0"
            + json.dumps(claims).encode())

    total = 0
    for target, items in seeds.items():
        d = os.path.join(out_dir, target)
        os.makedirs(d, exist_ok=True)
        for name, blob in sorted(items.items()):
            with open(os.path.join(d, f"seed-{name}"), "wb") as f:
                f.write(blob)
            total += len(blob)
        print(f"{target}: {len(items)} seeds")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
