#!/usr/bin/env python3
"""A pynetdicom archive for pacsgate's integration tests: Verification, Storage and Study/Patient
Root C-FIND SCP that accepts every association and records what it received.

  archive.py --port PORT --aet AET --record FILE [--tls-cert F --tls-key F [--tls-ca F]]

Appends JSON lines to FILE (flushed before the peer gets an answer):
  {"kind": "association", "calling_aet", "called_aet", "user_identity": bool,
   "user_identity_type": int | null}                   when an A-ASSOCIATE-RQ arrives
  {"kind": "store", "calling_aet", "sop_instance_uid"}  for each C-STORE (answered 0x0000)
  {"kind": "find", "calling_aet", "identifier": {keyword: str}} for each C-FIND
  {"kind": "cancel", "calling_aet", "after_matches": n} when a C-CANCEL stopped a C-FIND
C-FIND answers one fixed match (PatientName ARCHIVE^FIXED, PatientID FIXED1) then success.
With --tls-ca, clients must present a certificate signed by it.
"""

import argparse
import json
import logging
import ssl
import sys
import threading
import time

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

FIXED_STUDY_UID = "2.25.1000000000000000000000000000000001"
LOCK = threading.Lock()


def main():
    parser = argparse.ArgumentParser(description="pynetdicom test archive")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aet", default="PYARCHIVE")
    parser.add_argument("--record", required=True)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-ca")
    parser.add_argument("--find-matches", type=int, default=1,
                        help="matches each C-FIND returns (PatientID FIXED1, FIXED2, ...)")
    parser.add_argument("--match-delay", type=float, default=0.0,
                        help="seconds between pending responses (lets a C-CANCEL arrive)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    record_file = open(args.record, "a", encoding="utf-8")

    def write(obj):
        with LOCK:
            record_file.write(json.dumps(obj) + "\n")
            record_file.flush()

    def on_requested(event):
        rq = event.assoc.requestor.primitive
        uid = [i for i in rq.user_information if isinstance(i, UserIdentityNegotiation)]
        write({
            "kind": "association",
            "calling_aet": str(rq.calling_ae_title).strip(),
            "called_aet": str(rq.called_ae_title).strip(),
            "user_identity": bool(uid),
            "user_identity_type": uid[0].user_identity_type if uid else None,
        })

    def on_echo(event):
        return 0x0000

    def on_store(event):
        write({
            "kind": "store",
            "calling_aet": str(event.assoc.requestor.ae_title).strip(),
            "sop_instance_uid": str(event.request.AffectedSOPInstanceUID),
        })
        return 0x0000

    def on_find(event):
        query = event.identifier
        write({
            "kind": "find",
            "calling_aet": str(event.assoc.requestor.ae_title).strip(),
            "identifier": {e.keyword or str(e.tag): str(e.value) for e in query},
        })
        for n in range(args.find_matches):
            if event.is_cancelled:
                write({"kind": "cancel", "calling_aet": str(event.assoc.requestor.ae_title).strip(),
                       "after_matches": n})
                yield 0xFE00, None
                return
            match = Dataset()
            for elem in query:
                match.add(elem)
            match.QueryRetrieveLevel = query.get("QueryRetrieveLevel", "STUDY")
            match.PatientName = "ARCHIVE^FIXED"
            match.PatientID = f"FIXED{n + 1}"
            match.StudyInstanceUID = FIXED_STUDY_UID if n == 0 else f"{FIXED_STUDY_UID}.{n + 1}"
            if "StudyDate" in query:
                match.StudyDate = "20240115"
            yield 0xFF00, match
            if args.match_delay:
                time.sleep(args.match_delay)

    _config.UNRESTRICTED_STORAGE_SERVICE = True
    ae = AE(ae_title=args.aet)
    ae.maximum_associations = 50
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind, ALL_TRANSFER_SYNTAXES)

    ssl_context = None
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:
            ssl_context.load_verify_locations(cafile=args.tls_ca)
            ssl_context.verify_mode = ssl.CERT_REQUIRED
        else:
            ssl_context.verify_mode = ssl.CERT_NONE

    handlers = [
        (evt.EVT_REQUESTED, on_requested),
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_C_FIND, on_find),
    ]
    ae.start_server(("127.0.0.1", args.port), block=True, evt_handlers=handlers,
                    ssl_context=ssl_context)


if __name__ == "__main__":
    main()
