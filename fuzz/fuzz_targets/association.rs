//! The association request and answer: `parse_request` -> `rewrite_request` -> parse again, and
//! `parse_answer` -> `rewrite_accept` -> parse again. The input is a PDU; its length field is set to the
//! input's length, as the framer guarantees before these functions see a PDU.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::ul::association::{
    UpstreamAnswer, client_max_pdu, parse_answer, parse_request, rewrite_accept, rewrite_request,
    user_identity,
};

const MAX_PDU: u32 = 262_144;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 || data.len() > 1 << 20 {
        return;
    }
    let mut pdu = data.to_vec();
    let body = (pdu.len() - 6) as u32;
    pdu[2..6].copy_from_slice(&body.to_be_bytes());

    if let Ok(rq) = parse_request(&pdu) {
        let _ = user_identity(&rq);
        assert!(client_max_pdu(&rq, MAX_PDU) <= MAX_PDU);
        if let Ok(out) = rewrite_request(&rq, "ORTHANC", MAX_PDU) {
            // What the archive is sent must be a request it can read, without the credential.
            let again = match parse_request(&out) {
                Ok(again) => again,
                Err(e) => panic!("the rewritten A-ASSOCIATE-RQ does not parse: {e}"),
            };
            assert!(
                user_identity(&again).is_none(),
                "the User Identity reached the archive"
            );
            assert_eq!(again.called_ae_title.trim_end(), "ORTHANC");
            assert!(client_max_pdu(&again, MAX_PDU) <= MAX_PDU);
            assert_eq!(
                again.presentation_contexts.len(),
                rq.presentation_contexts.len()
            );
        }
    }
    match parse_answer(&pdu) {
        Ok(UpstreamAnswer::Accepted(ac)) => {
            if let Ok((out, max)) = rewrite_accept(&ac, "ARCHIVE", true, MAX_PDU) {
                assert!(max <= MAX_PDU && max > 0);
                match parse_answer(&out) {
                    Ok(UpstreamAnswer::Accepted(back)) => {
                        assert_eq!(back.called_ae_title.trim_end(), "ARCHIVE");
                    }
                    Ok(other) => panic!("the rewritten A-ASSOCIATE-AC became {other:?}"),
                    Err(e) => panic!("the rewritten A-ASSOCIATE-AC does not parse: {e}"),
                }
            }
        }
        Ok(UpstreamAnswer::Refused { bytes, .. }) => assert_eq!(bytes, pdu),
        Err(_) => {}
    }
});
