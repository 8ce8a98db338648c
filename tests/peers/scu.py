#!/usr/bin/env python3
"""pynetdicom client for pacsgate's integration tests: echo, find, store, move, get.

Common options: --host --port --aet (calling, default PYSCU) --aec (called, default ANY-SCP)
  TLS:      --tls-ca FILE [--tls-cert FILE --tls-key FILE] [--tls-hostname NAME | --tls-no-hostname-check]
            The server chain is always verified against --tls-ca. The server name checked is
            'localhost' unless --tls-hostname says otherwise; --tls-no-hostname-check checks the chain only.
  Identity: --user NAME --password PW (type 2) | --username-only NAME (type 1) | --jwt TOKEN (type 5)
            | --id-type N --id-primary STR [--id-secondary STR] (any type, raw), plus --positive-response.

Prints ONE JSON object on stdout:
  {"connected": bool,             # the TCP connection (and TLS handshake, if any) succeeded
   "associated": bool,            # an A-ASSOCIATE-AC arrived and at least one context was accepted
   "rejection": {"result", "source", "reason"} | null,   # from an A-ASSOCIATE-RJ
   "aborted": bool,               # connected, then A-ABORT / A-P-ABORT / dropped connection
   "statuses": [int | null],      # one per DIMSE response (find/move/get: pendings too);
                                  # null where a request got no response (e.g. aborted)
   "matches": [{keyword: str}],   # find: identifiers of pending responses
   "received": [sop_uid],         # get: instances received over C-GET
   "counts": [{"remaining", "completed", "failed", "warning"}],  # move/get: sub-operation counts per response
   "user_identity_response": hex | null,  # 0x59 server response in the A-ASSOCIATE-AC ("" = empty)
   "log": [str]}                  # pynetdicom warnings/errors (connection refused, TLS errors, ...)
Exit status 0 whenever the script ran; non-zero only on errors in the script or its arguments.
"""

import argparse
import json
import logging
import ssl
import sys

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.presentation import StoragePresentationContexts
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

MODELS = {
    "study": (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
    ),
    "patient": (
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelMove,
        PatientRootQueryRetrieveInformationModelGet,
    ),
}


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def parse_args():
    parser = argparse.ArgumentParser(description="pynetdicom test client")
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--port", type=int, required=True)
    common.add_argument("--aet", default="PYSCU")
    common.add_argument("--aec", default="ANY-SCP")
    common.add_argument("--timeout", type=float, default=30.0)
    common.add_argument("--max-pdu", type=int, default=16382)
    common.add_argument("--bind", default="", help="local address to connect from, e.g. 127.0.0.2")
    common.add_argument("--tls-ca")
    common.add_argument("--tls-cert")
    common.add_argument("--tls-key")
    common.add_argument("--tls-hostname", default="localhost")
    common.add_argument("--tls-no-hostname-check", action="store_true")
    ident = common.add_mutually_exclusive_group()
    ident.add_argument("--user")
    ident.add_argument("--username-only")
    ident.add_argument("--jwt")
    ident.add_argument("--id-type", type=int)
    common.add_argument("--password")
    common.add_argument("--id-primary")
    common.add_argument("--id-secondary")
    common.add_argument("--positive-response", action="store_true")

    sub.add_parser("echo", parents=[common])
    for name in ("find", "move", "get"):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("--level", default="STUDY")
        p.add_argument("--model", choices=sorted(MODELS), default="study")
        p.add_argument("-k", "--key", action="append", default=[],
                       help="Keyword=Value (Value may be empty)")
        if name == "move":
            p.add_argument("--dest", required=True, help="move destination AE title")
        if name == "get":
            p.add_argument("--out", help="write each received data set, as received, to OUT/<SOPInstanceUID>.raw")
        if name == "find":
            p.add_argument("--repeat", type=int, default=1,
                           help="send the query this many times on the one association; "
                                "each query's final status and match count go to 'queries'")
    store = sub.add_parser("store", parents=[common])
    store.add_argument("files", nargs="+")
    store.add_argument("--then-find", action="append", default=[], metavar="KEYWORD=VALUE",
                       help="after the stores, a Study Root C-FIND (STUDY level) with these keys on the "
                            "same association; its statuses go to 'find_statuses', its matches to 'matches'")
    args = parser.parse_args()
    if args.user is not None and args.password is None:
        parser.error("--user needs --password")
    if args.id_type is not None and args.id_primary is None:
        parser.error("--id-type needs --id-primary")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        parser.error("--tls-cert needs --tls-ca")
    return args


def identity(args):
    if args.user is not None:
        kind, primary, secondary = 2, args.user, args.password
    elif args.username_only is not None:
        kind, primary, secondary = 1, args.username_only, None
    elif args.jwt is not None:
        kind, primary, secondary = 5, args.jwt, None
    elif args.id_type is not None:
        kind, primary, secondary = args.id_type, args.id_primary, args.id_secondary
    else:
        return []
    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.primary_field = primary.encode()
    if secondary is not None:
        item.secondary_field = secondary.encode()
    item.positive_response_requested = args.positive_response
    return [item]


def tls_args(args):
    if not args.tls_ca:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tls_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if args.tls_no_hostname_check:
        ctx.check_hostname = False
        hostname = None
    else:
        ctx.check_hostname = True
        hostname = args.tls_hostname
    if args.tls_cert:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    return (ctx, hostname)


def identifier(args):
    ds = Dataset()
    ds.QueryRetrieveLevel = args.level
    for key in args.key:
        keyword, _, value = key.partition("=")
        setattr(ds, keyword.strip(), value)
    return ds


def as_text(elem):
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def main():
    args = parse_args()
    collect = Collect()
    logging.getLogger("pynetdicom").addHandler(collect)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    out = {
        "connected": False,
        "associated": False,
        "rejection": None,
        "aborted": False,
        "statuses": [],
        "matches": [],
        "received": [],
        "user_identity_response": None,
        "log": collect.lines,
    }

    ae = AE(ae_title=args.aet)
    ae.acse_timeout = args.timeout
    ae.dimse_timeout = args.timeout
    ae.network_timeout = args.timeout
    ae.connection_timeout = args.timeout
    ae.maximum_pdu_size = args.max_pdu

    def on_open(event):
        out["connected"] = True

    # The A-ASSOCIATE-RJ as it came off the wire. pynetdicom 3.0.4 sometimes logs an incoming RJ
    # and then reports the association as aborted (a race in its own state machine); the PDU
    # itself is what the gateway sent, so the report takes the codes from here.
    wire_rj = {}

    def on_pdu_recv(event):
        pdu = event.pdu
        if type(pdu).__name__ == "A_ASSOCIATE_RJ":
            wire_rj.update(result=pdu.result, source=pdu.source, reason=pdu.reason_diagnostic)

    handlers = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_PDU_RECV, on_pdu_recv)]
    ext_neg = identity(args)
    files = []
    if args.cmd == "echo":
        ae.add_requested_context(Verification)
    elif args.cmd == "store":
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
        seen = set()
        for path in args.files:
            ds = dcmread(path, stop_before_pixels=True)
            pair = (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            files.append(path)
            if pair not in seen:
                seen.add(pair)
                ae.add_requested_context(pair[0], [pair[1]])
        if args.then_find:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    else:
        find_model, move_model, get_model = MODELS[args.model]
        if args.cmd == "find":
            ae.add_requested_context(find_model)
        elif args.cmd == "move":
            ae.add_requested_context(move_model)
        else:
            ae.add_requested_context(get_model)
            # C-GET: we are the Storage SCP on the same association.
            for cx in StoragePresentationContexts[:120]:
                ae.add_requested_context(cx.abstract_syntax,
                                         [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
                ext_neg.append(build_role(cx.abstract_syntax, scp_role=True))

            def on_store(event):
                uid = str(event.request.AffectedSOPInstanceUID)
                out["received"].append(uid)
                if args.out:
                    # The encoded data set exactly as it arrived (no file meta), for byte comparison.
                    with open(f"{args.out}/{uid}.raw", "wb") as f:
                        f.write(event.request.DataSet.getvalue())
                return 0x0000

            handlers.append((evt.EVT_C_STORE, on_store))

    assoc = ae.associate(args.host, args.port, ae_title=args.aec, ext_neg=ext_neg or None,
                         bind_address=(args.bind, 0), tls_args=tls_args(args), evt_handlers=handlers)

    acceptor = assoc.acceptor.primitive if assoc.acceptor else None
    if assoc.is_rejected and acceptor is not None:
        out["rejection"] = {
            "result": acceptor.result,
            "source": acceptor.result_source,
            "reason": acceptor.diagnostic,
        }
    elif wire_rj:
        out["rejection"] = dict(wire_rj)
    if assoc.is_established:
        out["associated"] = True
        ui = assoc.acceptor.user_identity
        if ui is not None and ui.server_response is not None:
            out["user_identity_response"] = ui.server_response.hex()
        try:
            run(args, assoc, files, out)
        finally:
            if assoc.is_established:
                assoc.release()
    out["aborted"] = bool(assoc.is_aborted) and out["connected"]
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


def status_of(rsp):
    if rsp is not None and "Status" in rsp:
        return int(rsp.Status)
    return None


def run(args, assoc, files, out):
    if args.cmd == "echo":
        out["statuses"].append(status_of(assoc.send_c_echo()))
    elif args.cmd == "store":
        for msg_id, path in enumerate(files, start=1):
            if not assoc.is_established:
                out["statuses"].append(None)
                continue
            out["statuses"].append(status_of(assoc.send_c_store(path, msg_id=msg_id & 0xFFFF)))
        if args.then_find and assoc.is_established:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            for key in args.then_find:
                keyword, _, value = key.partition("=")
                setattr(query, keyword.strip(), value)
            out["find_statuses"] = []
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                out["find_statuses"].append(status_of(status))
                if ident is not None and status_of(status) in (0xFF00, 0xFF01):
                    out["matches"].append({e.keyword or str(e.tag): as_text(e) for e in ident})
    elif args.cmd == "find" and args.repeat > 1:
        find_model = MODELS[args.model][0]
        out["queries"] = []
        for _ in range(args.repeat):
            if not assoc.is_established:
                break
            final, matches = None, 0
            for status, ident in assoc.send_c_find(identifier(args), find_model):
                s = status_of(status)
                if s in (0xFF00, 0xFF01):
                    matches += 1
                else:
                    final = s
            out["queries"].append({"status": final, "matches": matches})
    else:
        find_model, move_model, get_model = MODELS[args.model]
        query = identifier(args)
        if args.cmd == "find":
            responses = assoc.send_c_find(query, find_model)
        elif args.cmd == "move":
            responses = assoc.send_c_move(query, args.dest, move_model)
        else:
            responses = assoc.send_c_get(query, get_model)
        for status, ident in responses:
            out["statuses"].append(status_of(status))
            if args.cmd in ("move", "get") and status is not None:
                counts = {}
                for key, name in (("NumberOfRemainingSuboperations", "remaining"),
                                  ("NumberOfCompletedSuboperations", "completed"),
                                  ("NumberOfFailedSuboperations", "failed"),
                                  ("NumberOfWarningSuboperations", "warning")):
                    if key in status:
                        counts[name] = int(status[key].value)
                out.setdefault("counts", []).append(counts)
            if args.cmd == "find" and ident is not None and status_of(status) in (0xFF00, 0xFF01):
                out["matches"].append({e.keyword or str(e.tag): as_text(e) for e in ident})


if __name__ == "__main__":
    sys.exit(main())
