//! User Identity negotiation (item 0x58) inside an otherwise valid A-ASSOCIATE-RQ, then the gateway's
//! authentication of it. The input is the sub-item's value: type, positive-response flag,
//! primary-field length, primary field, secondary-field length, secondary field (lengths may lie).
//! Username + passcode (type 2) is parsed but not checked: its argon2id check runs on tokio's blocking pool.
#![no_main]

use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, UserIdentityType, UserVariableItem, write_pdu,
};
use libfuzzer_sys::fuzz_target;
use pacsgate::ul::association::{parse_request, rewrite_request, user_identity};
use pacsgate::auth::Origin;
use pacsgate_fuzz::{authenticator, poll_once};

/// A real request (one Verification context) whose User Information item ends with `item` as a
/// 0x58 sub-item; item lengths are fixed up so only the sub-item's own fields can lie.
fn request_with_identity(item: &[u8]) -> Vec<u8> {
    let rq = AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "VIEWER".into(),
        called_ae_title: "ARCHIVE".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: "1.2.840.10008.1.1".into(),
            transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    };
    let mut pdu = Vec::new();
    write_pdu(&mut pdu, &Pdu::AssociationRQ(rq)).expect("encode the template");
    // The User Information item (0x50) is last: append the sub-item and fix both lengths.
    let ui = pdu
        .windows(2)
        .rposition(|w| w == [0x50, 0x00])
        .expect("user information item");
    pdu.push(0x58);
    pdu.push(0);
    pdu.extend_from_slice(&(item.len() as u16).to_be_bytes());
    pdu.extend_from_slice(item);
    let ui_len = (pdu.len() - ui - 4) as u16;
    pdu[ui + 2..ui + 4].copy_from_slice(&ui_len.to_be_bytes());
    let body = (pdu.len() - 6) as u32;
    pdu[2..6].copy_from_slice(&body.to_be_bytes());
    pdu
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 65_000 {
        return;
    }
    let pdu = request_with_identity(data);
    let Ok(rq) = parse_request(&pdu) else {
        return;
    };
    if let Ok(out) = rewrite_request(&rq, "ORTHANC", 262_144) {
        let again = parse_request(&out).expect("the rewritten request parses");
        assert!(user_identity(&again).is_none());
    }
    let identity = user_identity(&rq);
    if identity.is_some_and(|i| i.identity_type() == UserIdentityType::UsernamePassword) {
        return;
    }
    for over_tls in [true, false] {
        let origin = Origin {
            address: "127.0.0.1".parse().expect("address"),
            calling_ae: &rq.calling_ae_title,
            over_tls,
        };
        let names = [String::from("nobody")];
        for certificate_names in [&[][..], &names[..]] {
            // A token, or nothing, is judged without waiting; a Pending here would be a finding too.
            let judged =
                poll_once(authenticator().authenticate(identity, certificate_names, origin))
                    .expect("authentication without a password does not wait");
            if let Ok(p) = judged {
                // Only a device from 127.0.0.1 calling as CT1 can get in without a credential.
                assert_eq!(
                    p.method,
                    pacsgate::auth::Method::Device,
                    "signed in as {p:?}"
                );
            }
        }
    }
});
