//! Unit tests of the session: reassembly, decisions, refusals and the C-FIND cap.

use super::*;
use std::collections::HashMap;
use std::sync::Arc;

use crate::audit::Audit;
use crate::config::Config;
use crate::dimse;
use crate::moves::MoveRegistry;
use crate::policy::{Grants, Limiter};
use crate::relay::{Actions, Forward, Inspector, Side};
use crate::ul::pdata::{self, PDataWriter, Pdv};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;

const CONFIG: &str = r#"
[gateway]
listen = "127.0.0.1:2762"
[tls]
certificate = "c"
private_key = "k"
[[upstream]]
called_ae = "A"
address = "127.0.0.1:104"
ae_title = "A"
[limits]
max_query_results = 2
[[role]]
name = "r"
allow = ["echo", "find"]
"#;

fn session() -> Session {
    let cfg = Config::parse(CONFIG, std::path::Path::new("/x.toml")).expect("config");
    let party = Party {
        peer: "127.0.0.1:5000".parse().expect("addr"),
        user: "u".into(),
        calling_ae: "C".into(),
        called_ae: "A".into(),
    };
    let ctx = |abstract_syntax: &str, transfer_syntax: &str| Context {
        abstract_syntax: abstract_syntax.into(),
        transfer_syntax: transfer_syntax.into(),
    };
    let ts = HashMap::from([
        (1u8, ctx(FIND, "1.2.840.10008.1.2.1")),
        (3u8, ctx(CT, "1.2.840.10008.1.2")),
        (5u8, ctx("1.2.840.10008.1.1", "1.2.840.10008.1.2")),
    ]);
    Session::new(
        party,
        Grants::for_roles(&cfg, &["r".to_string()]),
        Arc::new(Limiter::new(&cfg)),
        Arc::new(MoveRegistry::default()),
        Arc::new(Audit::disabled()),
        ts,
        16384,
        16384,
    )
}

fn command(elements: Vec<(dicom_core::Tag, u16)>, sop_class: &str) -> Vec<u8> {
    let mut e: Vec<DataElement<InMemDicomObject>> = vec![DataElement::new(
        tags::AFFECTED_SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from(sop_class),
    )];
    e.extend(
        elements
            .into_iter()
            .map(|(t, v)| DataElement::new(t, VR::US, PrimitiveValue::from(v))),
    );
    let obj = InMemDicomObject::command_from_element_iter(e);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(
        &mut out,
        &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
    )
    .expect("encode");
    out
}

fn pdu(pc: u8, is_command: bool, is_last: bool, data: &[u8]) -> Vec<u8> {
    let mut w = PDataWriter::new(1 << 20);
    w.push(pc, is_command, is_last, data);
    w.into_bytes()
}

fn identifier(keys: &[(dicom_core::Tag, VR, &str)]) -> Vec<u8> {
    let obj = InMemDicomObject::from_element_iter(
        keys.iter()
            .map(|(t, vr, v)| DataElement::new(*t, *vr, PrimitiveValue::from(*v))),
    );
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("encode");
    out
}

fn statuses(back: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut rest = back;
    while rest.len() >= 6 {
        let len = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
        for pdv in pdata::pdv_items(&rest[..6 + len]) {
            if pdv.is_command {
                out.push(
                    dimse::decode_command(pdv.data)
                        .expect("cmd")
                        .status
                        .unwrap_or(0),
                );
            }
        }
        rest = &rest[6 + len..];
    }
    out
}

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";

#[test]
fn an_allowed_echo_takes_the_fast_path() {
    let mut s = session();
    let echo = command(
        vec![
            (tags::COMMAND_FIELD, 0x0030),
            (tags::MESSAGE_ID, 1),
            (tags::COMMAND_DATA_SET_TYPE, 0x0101),
        ],
        "1.2.840.10008.1.1",
    );
    let a = s
        .inspect_pdu(Side::Requestor, &pdu(5, true, true, &echo))
        .expect("inspect");
    assert_eq!(a, Actions::PASS);
}

#[test]
fn a_refused_store_swallows_its_data_and_answers_after_the_last_fragment() {
    let mut s = session();
    let store = command(
        vec![
            (tags::COMMAND_FIELD, 0x0001),
            (tags::MESSAGE_ID, 9),
            (tags::COMMAND_DATA_SET_TYPE, 0),
        ],
        CT,
    );
    let a = s
        .inspect_pdu(Side::Requestor, &pdu(3, true, true, &store))
        .expect("command");
    assert_eq!((a.forward, a.back.len()), (Forward::Nothing, 0));
    let a = s
        .inspect_pdu(Side::Requestor, &pdu(3, false, false, &[0u8; 1000]))
        .expect("data 1");
    assert_eq!((a.forward, a.back.len()), (Forward::Nothing, 0));
    let a = s
        .inspect_pdu(Side::Requestor, &pdu(3, false, true, &[0u8; 10]))
        .expect("data 2");
    assert_eq!(a.forward, Forward::Nothing);
    assert_eq!(statuses(&a.back), vec![0x0124]);
    assert_eq!(s.counts.refused, 1);
    // The association stays usable: the next echo passes.
    let echo = command(
        vec![
            (tags::COMMAND_FIELD, 0x0030),
            (tags::MESSAGE_ID, 10),
            (tags::COMMAND_DATA_SET_TYPE, 0x0101),
        ],
        "1.2.840.10008.1.1",
    );
    assert_eq!(
        s.inspect_pdu(Side::Requestor, &pdu(5, true, true, &echo))
            .expect("echo"),
        Actions::PASS
    );
}

#[test]
fn a_find_is_held_until_its_identifier_is_complete() {
    let mut s = session();
    let find = command(
        vec![
            (tags::COMMAND_FIELD, 0x0020),
            (tags::MESSAGE_ID, 3),
            (tags::COMMAND_DATA_SET_TYPE, 0),
        ],
        FIND,
    );
    let id = identifier(&[
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        (tags::PATIENT_ID, VR::LO, "12345"),
    ]);
    let a = s
        .inspect_pdu(Side::Requestor, &pdu(1, true, true, &find))
        .expect("command");
    assert_eq!(a.forward, Forward::Nothing, "held");
    let (first, second) = id.split_at(10);
    assert_eq!(
        s.inspect_pdu(Side::Requestor, &pdu(1, false, false, first))
            .expect("1")
            .forward,
        Forward::Nothing
    );
    let a = s
        .inspect_pdu(Side::Requestor, &pdu(1, false, true, second))
        .expect("2");
    let Forward::Rebuilt(bytes) = a.forward else {
        panic!("expected the held request")
    };
    let items: Vec<Pdv> = pdata::pdv_items(&bytes).collect();
    assert_eq!(items.len(), 2);
    assert!(items[0].is_command && items[0].data == &find[..]);
    assert!(!items[1].is_command && items[1].is_last && items[1].data == &id[..]);
}

#[test]
fn a_wildcard_find_is_refused_a700_and_the_cap_cancels_at_the_archive() {
    let mut s = session();
    let find = |id: u16| {
        command(
            vec![
                (tags::COMMAND_FIELD, 0x0020),
                (tags::MESSAGE_ID, id),
                (tags::COMMAND_DATA_SET_TYPE, 0),
            ],
            FIND,
        )
    };
    let wild = identifier(&[
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        (tags::PATIENT_NAME, VR::PN, "*"),
    ]);
    s.inspect_pdu(Side::Requestor, &pdu(1, true, true, &find(4)))
        .expect("cmd");
    let a = s
        .inspect_pdu(Side::Requestor, &pdu(1, false, true, &wild))
        .expect("id");
    assert_eq!(
        (a.forward, statuses(&a.back)),
        (Forward::Nothing, vec![0xA700])
    );

    let named = identifier(&[
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        (tags::PATIENT_NAME, VR::PN, "DOE*"),
    ]);
    s.inspect_pdu(Side::Requestor, &pdu(1, true, true, &find(5)))
        .expect("cmd");
    assert!(matches!(
        s.inspect_pdu(Side::Requestor, &pdu(1, false, true, &named))
            .expect("id")
            .forward,
        Forward::Rebuilt(_)
    ));
    let rsp = |status: u16, data: bool| {
        command(
            vec![
                (tags::COMMAND_FIELD, 0x8020),
                (tags::MESSAGE_ID_BEING_RESPONDED_TO, 5),
                (tags::COMMAND_DATA_SET_TYPE, if data { 0 } else { 0x0101 }),
                (tags::STATUS, status),
            ],
            FIND,
        )
    };
    let mut relayed = 0;
    let mut cancels = 0;
    for _ in 0..4 {
        let a = s
            .inspect_pdu(Side::Acceptor, &pdu(1, true, true, &rsp(0xFF00, true)))
            .expect("pending");
        let b = s
            .inspect_pdu(Side::Acceptor, &pdu(1, false, true, &named))
            .expect("match");
        // A match is held whole (command and identifier), then forwarded re-encoded.
        if a.forward == Forward::Nothing && matches!(b.forward, Forward::Rebuilt(_)) {
            relayed += 1;
        }
        cancels += usize::from(!a.back.is_empty());
    }
    assert_eq!((relayed, cancels), (2, 1));
    let a = s
        .inspect_pdu(Side::Acceptor, &pdu(1, true, true, &rsp(0x0000, false)))
        .expect("final");
    let Forward::Rebuilt(bytes) = a.forward else {
        panic!("final response rewritten")
    };
    assert_eq!(statuses(&bytes), vec![0xFE00]);
    assert_eq!(s.counts.truncated_queries, 1);
}

#[test]
fn protocol_violations_are_errors() {
    let mut s = session();
    assert!(
        s.inspect_pdu(Side::Requestor, &pdu(1, false, true, &[1, 2, 3]))
            .is_err(),
        "data without command"
    );
    assert!(
        s.inspect_pdu(Side::Requestor, &pdu(1, true, true, &[0xff; 9]))
            .is_err(),
        "garbage command"
    );
}

#[test]
fn a_c_find_match_is_forwarded_re_encoded_with_the_called_ae_as_retrieve_ae_title() {
    let mut s = session();
    let rq = command(
        vec![
            (tags::COMMAND_FIELD, 0x0020),
            (tags::MESSAGE_ID, 5),
            (tags::PRIORITY, 0),
            (tags::COMMAND_DATA_SET_TYPE, 0),
        ],
        FIND,
    );
    let named = identifier(&[
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        (tags::PATIENT_ID, VR::LO, "P1"),
    ]);
    s.inspect_pdu(Side::Requestor, &pdu(1, true, true, &rq))
        .expect("cmd");
    s.inspect_pdu(Side::Requestor, &pdu(1, false, true, &named))
        .expect("id");
    let rsp = command(
        vec![
            (tags::COMMAND_FIELD, 0x8020),
            (tags::MESSAGE_ID_BEING_RESPONDED_TO, 5),
            (tags::COMMAND_DATA_SET_TYPE, 0),
            (tags::STATUS, 0xFF00),
        ],
        FIND,
    );
    let answer = identifier(&[
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        (tags::RETRIEVE_AE_TITLE, VR::AE, "ORTHANC"),
        (tags::PATIENT_ID, VR::LO, "P1"),
    ]);
    let a = s
        .inspect_pdu(Side::Acceptor, &pdu(1, true, true, &rsp))
        .expect("pending");
    assert_eq!(
        a.forward,
        Forward::Nothing,
        "held until the identifier is whole"
    );
    let b = s
        .inspect_pdu(Side::Acceptor, &pdu(1, false, true, &answer))
        .expect("match");
    let Forward::Rebuilt(bytes) = b.forward else {
        panic!("the match is forwarded re-encoded")
    };
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    // (0008,0054) AE, length 2, "A " (the called AE, padded): explicit VR little endian.
    assert!(has(b"\x08\x00\x54\x00AE\x02\x00A "), "{bytes:?}");
    assert!(!has(b"ORTHANC"));
    assert!(has(b"P1"));
}

#[test]
fn error_comments_fit_an_lo_and_end_on_a_word() {
    for rule in [
        "query_guard",
        "bad_identifier",
        "not_authorized",
        "move_destination",
        "rate_limit",
        "duplicate_message_id",
        "context_mismatch",
        "unsupported_operation",
    ] {
        let c = error_comment(rule, "");
        assert!(
            c.len() <= 64 && c.starts_with("pacsgate: "),
            "{rule}: {c:?}"
        );
    }
    let long =
        "no identifying key has at least 2 characters before its first wildcard: add PatientID";
    let c = fit_comment(&format!("pacsgate: {long}"));
    assert!(
        c.chars().count() <= 64 && c.ends_with("...") && !c.contains("ha..."),
        "{c:?}"
    );
    assert_eq!(fit_comment("short"), "short");
}

/// `Pieces` (a count while every PDV passes) gives what the list of pieces it replaced gave, for
/// every fate of three PDVs: nothing, passed, one or two pieces emitted.
#[test]
fn pieces_forward_as_the_full_list_did() {
    use super::assembly::Piece;
    let mut w = PDataWriter::new(1 << 16);
    for i in 0..3u8 {
        w.push(1, false, i == 2, &[i; 5]);
    }
    let pdu = w.into_bytes();
    let mut spans = crate::ul::pdata::PdvSpans::default();
    let pdata = spans.check(&pdu).expect("well-formed");
    let emit = |n: u8| Piece::Emit {
        pc: 1,
        is_command: false,
        bytes: vec![0x40 + n; 3],
    };
    for case in 0..4usize.pow(3) {
        let mut pieces = Pieces::new(pdata);
        let mut list = Vec::new();
        for (index, pdv) in pdata.items().enumerate() {
            pieces.at(index);
            let fate = case / 4usize.pow(index as u32) % 4;
            let step: Vec<Piece> = match fate {
                0 => vec![],
                1 => vec![Piece::Pass(pdv)],
                2 => vec![emit(index as u8)],
                _ => vec![emit(index as u8), emit(9)],
            };
            for piece in step {
                list.push(match &piece {
                    Piece::Pass(p) => Piece::Pass(*p),
                    Piece::Emit { bytes, .. } => Piece::Emit {
                        pc: 1,
                        is_command: false,
                        bytes: bytes.clone(),
                    },
                });
                pieces.push(piece);
            }
        }
        // The list as `Session::inspect` judged it before.
        let unchanged =
            list.len() == pdata.len() && list.iter().all(|p| matches!(p, Piece::Pass(_)));
        let expected = if unchanged {
            Forward::Unchanged
        } else if list.is_empty() {
            Forward::Nothing
        } else {
            let mut out = PDataWriter::new(4096);
            for piece in &list {
                match piece {
                    Piece::Pass(p) => {
                        out.push(p.presentation_context_id, p.is_command, p.is_last, p.data)
                    }
                    Piece::Emit {
                        pc,
                        is_command,
                        bytes,
                    } => out.push(*pc, *is_command, true, bytes),
                }
            }
            Forward::Rebuilt(out.into_bytes())
        };
        assert_eq!(pieces.forward(4096), expected, "case {case}");
    }
}
