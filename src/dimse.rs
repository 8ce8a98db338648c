//! DIMSE messages inside P-DATA-TF: command sets (Implicit VR Little Endian, group 0000), identifiers,
//! and the responses and cancels the gateway writes itself (PS3.7 section 9, annex E). The PDV items
//! that carry them are `ul::pdata`'s; the structural walk of an identifier is `dimse/structure.rs`.

use dicom_core::dictionary::DataDictionary;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntax;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};

mod structure;

pub(crate) use structure::has_long_length;
pub use structure::{ITEM, ITEM_END, MAX_NESTING, SEQUENCE_END, UNDEFINED, check_structure};

/// Command fields (PS3.7 E.1).
pub mod command_field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_GET_RQ: u16 = 0x0010;
    pub const C_FIND_RQ: u16 = 0x0020;
    pub const C_MOVE_RQ: u16 = 0x0021;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
    pub const RESPONSE: u16 = 0x8000;
}

/// Every DIMSE status pacsgate sends or tests for (PS3.7 annex C; PS3.4 B, C): the gateway, the demo
/// archive and `pacsgate connect` all name them from here.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// C-STORE: processing failure (PS3.7 C.4.2).
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const REFUSED_NOT_AUTHORIZED: u16 = 0x0124;
    pub const DUPLICATE_INVOCATION: u16 = 0x0210;
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// C-MOVE / C-GET: out of resources, unable to calculate number of matches.
    pub const OUT_OF_RESOURCES_MATCHES: u16 = 0xA701;
    /// C-MOVE / C-GET: out of resources, unable to perform sub-operations.
    pub const UNABLE_TO_PERFORM_SUB_OPERATIONS: u16 = 0xA702;
    pub const MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
    /// C-FIND / C-MOVE / C-GET: identifier does not match SOP class; C-STORE: data set does not match.
    pub const IDENTIFIER_DOES_NOT_MATCH: u16 = 0xA900;
    /// C-MOVE / C-GET warning: sub-operations complete, one or more failures.
    pub const SUB_OPERATIONS_WITH_FAILURES: u16 = 0xB000;
    pub const UNABLE_TO_PROCESS: u16 = 0xC000;
    pub const CANCEL: u16 = 0xFE00;
    pub const PENDING: u16 = 0xFF00;
    pub const PENDING_WARNING: u16 = 0xFF01;

    pub fn is_pending(s: u16) -> bool {
        s == PENDING || s == PENDING_WARNING
    }

    /// Warning statuses are 0x0001 and 0xBxxx (PS3.7 C.3).
    pub fn is_warning(status: u16) -> bool {
        status == 0x0001 || status & 0xF000 == 0xB000
    }
}

/// Command Data Set Type value meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;
/// A command set larger than this is not a command set.
pub const MAX_COMMAND_LENGTH: usize = 64 * 1024;

/// What is wrong with a DIMSE message.
#[derive(Debug, thiserror::Error)]
pub enum DimseError {
    #[error("malformed command set: {0}")]
    Command(String),
    #[error("malformed identifier: {0}")]
    Identifier(String),
    #[error("transfer syntax {0} is not supported for identifiers")]
    TransferSyntax(String),
}

/// A decoded command set: the fields a gateway needs, and the object for re-encoding.
#[derive(Debug, Clone)]
pub struct Command {
    pub field: u16,
    pub message_id: u16,
    pub responded_to: u16,
    pub affected_sop_class: String,
    pub affected_sop_instance: String,
    pub move_destination: String,
    pub has_data_set: bool,
    pub status: Option<u16>,
    pub object: InMemDicomObject,
}

impl Command {
    pub fn is_response(&self) -> bool {
        self.field & command_field::RESPONSE != 0
    }
}

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim_start().to_string())
        .unwrap_or_default()
}

fn uint16(obj: &InMemDicomObject, tag: Tag) -> Option<u16> {
    obj.get(tag).and_then(|e| e.to_int::<u16>().ok())
}

/// Decode a complete command set (Implicit VR Little Endian, PS3.7 6.3.1).
///
/// A command set is flat (group 0000, no sequences), so it is read here element by element, each value
/// checked against the bytes that are there and against its dictionary VR, and only then put into an
/// in-memory object. dicom-parser is not used on these bytes: given a value length that is not a
/// multiple of its VR's size it reads the rest as another element header, and it reserves whatever
/// length that header declares (found by fuzzing: 41 bytes made it allocate 4 GiB).
pub fn decode_command(bytes: &[u8]) -> Result<Command, DimseError> {
    let bad = |m: String| DimseError::Command(m);
    if bytes.len() > MAX_COMMAND_LENGTH {
        return Err(bad(format!("{} bytes", bytes.len())));
    }
    let mut elements: Vec<DataElement<InMemDicomObject>> = Vec::new();
    let mut last: Option<Tag> = None;
    let mut rest = bytes;
    while !rest.is_empty() {
        let (tag, value, after) = command_element(rest, last).map_err(bad)?;
        last = Some(tag);
        rest = after;
        check_group_length(tag, value, rest.len()).map_err(bad)?;
        let vr = command_vr(tag, value.len()).map_err(bad)?;
        elements.push(DataElement::new(tag, vr, command_value(vr, value)));
    }
    command_of(InMemDicomObject::from_element_iter(elements))
}

/// Split the next element of a command set off `rest`: its tag, its value and what follows.
/// It must be in group 0000, after `last` in ascending order, and within the bytes there.
fn command_element(rest: &[u8], last: Option<Tag>) -> Result<(Tag, &[u8], &[u8]), String> {
    let header = rest
        .get(..8)
        .ok_or_else(|| "truncated element header".to_string())?;
    let tag = Tag(
        u16::from_le_bytes([header[0], header[1]]),
        u16::from_le_bytes([header[2], header[3]]),
    );
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if tag.0 != 0x0000 {
        return Err(format!("element {tag} is outside group 0000"));
    }
    // Peers disagree on which copy of a repeated element counts (DCMTK keeps the first): the
    // elements must come once each, in ascending order (PS3.5 7.1), so there is one reading.
    if last.is_some_and(|l| tag <= l) {
        return Err(format!(
            "element {tag} is repeated or out of ascending order"
        ));
    }
    let value = rest
        .get(8..8 + len)
        .ok_or_else(|| format!("element {tag} length {len} overruns the command set"))?;
    Ok((tag, value, &rest[8 + len..]))
}

/// A 4-byte Command Group Length (0000,0000) must count exactly the `following` bytes.
fn check_group_length(tag: Tag, value: &[u8], following: usize) -> Result<(), String> {
    if tag == tags::COMMAND_GROUP_LENGTH
        && value.len() == 4
        && u32::from_le_bytes([value[0], value[1], value[2], value[3]]) as usize != following
    {
        return Err(format!(
            "group length {} does not match the {} bytes that follow",
            u32::from_le_bytes([value[0], value[1], value[2], value[3]]),
            following
        ));
    }
    Ok(())
}

/// The dictionary VR of a command element; a binary value must be a whole number of values long.
fn command_vr(tag: Tag, len: usize) -> Result<VR, String> {
    let vr = dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|e| e.vr.relaxed())
        .unwrap_or(VR::UN);
    let size = match vr {
        VR::US | VR::SS => 2,
        VR::UL | VR::SL | VR::AT | VR::FL => 4,
        VR::FD | VR::UV | VR::SV => 8,
        _ => 1,
    };
    if !len.is_multiple_of(size) {
        return Err(format!(
            "element {tag} ({vr:?}) has length {len}, not a multiple of {size}"
        ));
    }
    Ok(vr)
}

/// A command element's value, read as its VR says (the length already checked against the VR).
fn command_value(vr: VR, value: &[u8]) -> PrimitiveValue {
    match vr {
        VR::US => PrimitiveValue::U16(
            value
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        VR::UL => PrimitiveValue::U32(
            value
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        VR::AT => PrimitiveValue::Tags(
            value
                .chunks_exact(4)
                .map(|c| {
                    Tag(
                        u16::from_le_bytes([c[0], c[1]]),
                        u16::from_le_bytes([c[2], c[3]]),
                    )
                })
                .collect(),
        ),
        VR::UI
        | VR::AE
        | VR::LO
        | VR::SH
        | VR::CS
        | VR::ST
        | VR::LT
        | VR::UT
        | VR::PN
        | VR::DA
        | VR::TM
        | VR::DT
        | VR::IS
        | VR::DS => {
            // Command sets are ISO 646 (ASCII); anything else becomes '?' so that what is
            // re-encoded has the length it declares.
            let text: String = value
                .iter()
                .map(|&b| if b.is_ascii() { b as char } else { '?' })
                .collect();
            let text = text.trim_end_matches(['\0', ' ']);
            if text.contains('\\') {
                PrimitiveValue::Strs(text.split('\\').map(str::to_string).collect())
            } else {
                PrimitiveValue::from(text.to_string())
            }
        }
        _ => PrimitiveValue::U8(value.to_vec().into()),
    }
}

/// The fields a gateway reads from a decoded command set; it must have a Command Field.
fn command_of(object: InMemDicomObject) -> Result<Command, DimseError> {
    let field = uint16(&object, tags::COMMAND_FIELD)
        .ok_or_else(|| DimseError::Command("no Command Field (0000,0100)".into()))?;
    Ok(Command {
        field,
        message_id: uint16(&object, tags::MESSAGE_ID).unwrap_or(0),
        responded_to: uint16(&object, tags::MESSAGE_ID_BEING_RESPONDED_TO).unwrap_or(0),
        affected_sop_class: text(&object, tags::AFFECTED_SOP_CLASS_UID),
        affected_sop_instance: text(&object, tags::AFFECTED_SOP_INSTANCE_UID),
        move_destination: text(&object, tags::MOVE_DESTINATION),
        has_data_set: uint16(&object, tags::COMMAND_DATA_SET_TYPE)
            .is_some_and(|t| t != NO_DATA_SET),
        status: uint16(&object, tags::STATUS),
        object,
    })
}

/// The one command-set encoder (PS3.7 6.3.1: implicit VR little endian, (0000,0000) computed): every
/// command pacsgate writes, as gateway, tool, `connect` or demo archive, is encoded here.
pub fn encode_command(
    elements: impl IntoIterator<Item = DataElement<InMemDicomObject>>,
) -> Vec<u8> {
    let object = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    // Writing an in-memory object of fixed, well-formed elements into a Vec does not fail.
    let _ = object.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased());
    out
}

/// A command element of VR US.
pub(crate) fn us(tag: Tag, v: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(v))
}

/// The Error Comment (0000,0902) of a response: LO, at most 64 characters (PS3.7 C.4); none if empty.
pub(crate) fn error_comment(comment: &str) -> Option<DataElement<InMemDicomObject>> {
    (!comment.is_empty()).then(|| {
        let comment: String = comment.chars().take(64).collect();
        DataElement::new(tags::ERROR_COMMENT, VR::LO, PrimitiveValue::from(comment))
    })
}

fn ui(tag: Tag, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::UI, PrimitiveValue::from(v))
}

/// A final response to `request` with `status`, no data set, and an error comment (PS3.7 C.4).
pub fn refusal(request: &Command, status: u16, comment: &str) -> Vec<u8> {
    let mut e = vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, &request.affected_sop_class),
        us(tags::COMMAND_FIELD, request.field | command_field::RESPONSE),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status),
    ];
    if !request.affected_sop_instance.is_empty() {
        e.push(ui(
            tags::AFFECTED_SOP_INSTANCE_UID,
            &request.affected_sop_instance,
        ));
    }
    e.extend(error_comment(comment));
    encode_command(e)
}

/// The same response with another status and an error comment (e.g. a truncated C-FIND's final response).
pub fn with_status(response: &Command, status: u16, comment: &str) -> Vec<u8> {
    let mut object = response.object.clone();
    object.put(us(tags::STATUS, status));
    object.remove_element(tags::COMMAND_GROUP_LENGTH);
    if let Some(comment) = error_comment(comment) {
        object.put(comment);
    }
    encode_command(object)
}

/// C-CANCEL-RQ for the request with `message_id` (PS3.7 9.3.2.3).
pub fn c_cancel(message_id: u16) -> Vec<u8> {
    encode_command(vec![
        us(tags::COMMAND_FIELD, command_field::C_CANCEL_RQ),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
    ])
}

/// Decode an identifier (C-FIND / C-MOVE / C-GET data set) in the presentation context's transfer syntax.
pub fn decode_identifier(
    bytes: &[u8],
    transfer_syntax: &str,
) -> Result<InMemDicomObject, DimseError> {
    let ts: TransferSyntax = match transfer_syntax.trim_end_matches('\0') {
        "1.2.840.10008.1.2" => IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        "1.2.840.10008.1.2.1" => EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        other => return Err(DimseError::TransferSyntax(other.to_string())),
    };
    check_structure(bytes, ts.uid() != IMPLICIT_VR_LITTLE_ENDIAN.uid())
        .map_err(DimseError::Identifier)?;
    InMemDicomObject::read_dataset_with_ts(bytes, &ts)
        .map_err(|e| DimseError::Identifier(e.to_string()))
}

/// Encode an identifier in the presentation context's transfer syntax (the counterpart of
/// [`decode_identifier`], for an identifier the gateway rewrote).
pub fn encode_identifier(
    object: &InMemDicomObject,
    transfer_syntax: &str,
) -> Result<Vec<u8>, DimseError> {
    let ts: TransferSyntax = match transfer_syntax.trim_end_matches('\0') {
        "1.2.840.10008.1.2" => IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        "1.2.840.10008.1.2.1" => EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        other => return Err(DimseError::TransferSyntax(other.to_string())),
    };
    let mut out = Vec::new();
    object
        .write_dataset_with_ts(&mut out, &ts)
        .map_err(|e| DimseError::Identifier(e.to_string()))?;
    Ok(out)
}

/// A US value of a command set (e.g. a sub-operation count), when present.
pub fn count(c: &Command, tag: Tag) -> Option<u16> {
    uint16(&c.object, tag)
}

/// The string value of an attribute of an identifier ("" when absent or empty).
pub fn attribute(obj: &InMemDicomObject, tag: Tag) -> String {
    text(obj, tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(field: u16, id: u16, data: bool) -> Vec<u8> {
        encode_command(vec![
            ui(tags::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.2.2.1"),
            us(tags::COMMAND_FIELD, field),
            us(tags::MESSAGE_ID, id),
            us(
                tags::COMMAND_DATA_SET_TYPE,
                if data { 0x0000 } else { NO_DATA_SET },
            ),
        ])
    }

    #[test]
    fn a_command_round_trips_with_its_group_length() {
        let bytes = request(command_field::C_FIND_RQ, 7, true);
        assert_eq!(&bytes[..4], &[0, 0, 0, 0], "group length first");
        let c = decode_command(&bytes).expect("decode");
        assert_eq!(c.field, command_field::C_FIND_RQ);
        assert_eq!(c.message_id, 7);
        assert!(c.has_data_set && !c.is_response());
        let r = decode_command(&refusal(&c, status::REFUSED_NOT_AUTHORIZED, "not allowed"))
            .expect("decode");
        assert_eq!(r.field, 0x8020);
        assert_eq!(r.responded_to, 7);
        assert_eq!(r.status, Some(0x0124));
        assert!(!r.has_data_set);
        let again = decode_command(&with_status(&r, status::CANCEL, "cap")).expect("decode");
        assert_eq!(again.status, Some(0xFE00));
        let cancel = decode_command(&c_cancel(7)).expect("decode");
        assert_eq!((cancel.field, cancel.responded_to), (0x0FFF, 7));
    }

    #[test]
    fn hostile_lengths_are_refused_before_decoding() {
        // (0000,0100) with a 4 GiB length.
        let bytes = [0u8, 0, 0, 1, 0xf0, 0xff, 0xff, 0xff, 0x20, 0];
        assert!(decode_command(&bytes).is_err());
        assert!(decode_command(&[1, 2, 3]).is_err());
        let explicit = [0x10u8, 0, 0x10, 0, b'P', b'N', 0xff, 0x7f, b'A'];
        assert!(decode_identifier(&explicit, "1.2.840.10008.1.2.1").is_err());
        assert!(decode_identifier(&[], "1.2.840.10008.1.2.2").is_err());
    }

    /// Every input the fuzzers found (dicom-parser reserving gigabytes; responses that did not decode
    /// again): each must now be refused, or decoded quickly and answered with responses that decode.
    #[test]
    fn fuzz_findings_are_refused_without_allocating() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/artifacts");
        let mut seen = 0;
        for (dir, identifier) in [("dimse_command", false), ("dimse_identifier", true)] {
            let entries = std::fs::read_dir(root.join(dir))
                .unwrap_or_else(|e| panic!("fuzz artifacts {}: {e}", root.join(dir).display()));
            for entry in entries.flatten() {
                let bytes = std::fs::read(entry.path()).expect("artifact");
                let started = std::time::Instant::now();
                if identifier {
                    // The fuzz target picks the transfer syntax from the first byte.
                    let ts = if bytes.first().is_some_and(|b| b & 1 == 0) {
                        "1.2.840.10008.1.2"
                    } else {
                        "1.2.840.10008.1.2.1"
                    };
                    let rest = bytes.get(1..).unwrap_or_default();
                    let _ = decode_identifier(rest, ts);
                    let _ = decode_identifier(rest, "1.2.840.10008.1.2");
                    let _ = decode_identifier(rest, "1.2.840.10008.1.2.1");
                    let _ = decode_identifier(&bytes, "1.2.840.10008.1.2");
                    let _ = decode_identifier(&bytes, "1.2.840.10008.1.2.1");
                } else if let Ok(c) = decode_command(&bytes) {
                    // What the gateway writes from a decoded request must decode again.
                    let r =
                        decode_command(&refusal(&c, status::REFUSED_NOT_AUTHORIZED, "pacsgate: x"))
                            .unwrap_or_else(|e| panic!("{}: refusal: {e}", entry.path().display()));
                    assert_eq!(
                        r.status,
                        Some(status::REFUSED_NOT_AUTHORIZED),
                        "{}",
                        entry.path().display()
                    );
                    let w = decode_command(&with_status(&c, status::CANCEL, "pacsgate: cap"))
                        .unwrap_or_else(|e| panic!("{}: with_status: {e}", entry.path().display()));
                    assert_eq!(
                        (w.status, w.field),
                        (Some(status::CANCEL), c.field),
                        "{}",
                        entry.path().display()
                    );
                }
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(2),
                    "{}",
                    entry.path().display()
                );
                seen += 1;
            }
        }
        let hostile = [
            0x23u8, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0xff, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(decode_command(&hostile).is_err());
        assert!(decode_identifier(&hostile, "1.2.840.10008.1.2").is_err());
        // 157 artifacts were committed with the fuzzing findings; a replay that finds none replays nothing.
        assert!(
            seen >= 150,
            "only {seen} fuzz artifacts found under {}",
            root.display()
        );
        eprintln!("{seen} fuzz artifacts replayed");
    }

    /// One explicit VR little endian element (short-length VRs).
    fn el(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(value);
        out
    }

    fn delimiter(element: u16, len: u32) -> Vec<u8> {
        let mut out = vec![0xFE, 0xFF];
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out
    }

    /// An undefined-length sequence (explicit VR) of undefined-length items.
    fn sequence(group: u16, element: u16, items: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(b"SQ\0\0");
        out.extend_from_slice(&UNDEFINED.to_le_bytes());
        for item in items {
            out.extend(delimiter(0xE000, UNDEFINED));
            out.extend_from_slice(item);
            out.extend(delimiter(0xE00D, 0));
        }
        out.extend(delimiter(0xE0DD, 0));
        out
    }

    const EXPLICIT: &str = "1.2.840.10008.1.2.1";

    #[test]
    fn identifiers_with_one_reading_pass() {
        let mut id = el(0x0008, 0x0052, b"CS", b"STUDY ");
        id.extend(el(0x0010, 0x0010, b"PN", b"DOE^JOHN"));
        id.extend(sequence(
            0x0032,
            0x1064,
            &[el(0x0008, 0x0100, b"SH", b"XR12")],
        ));
        let obj = decode_identifier(&id, EXPLICIT).expect("a well-formed identifier");
        assert_eq!(attribute(&obj, tags::PATIENT_NAME), "DOE^JOHN");
    }

    #[test]
    fn repeated_and_out_of_order_tags_are_refused_at_every_level() {
        let level = el(0x0008, 0x0052, b"CS", b"STUDY ");
        let star = el(0x0010, 0x0010, b"PN", b"*\0");
        let doe = el(0x0010, 0x0010, b"PN", b"DOE^JOHN");
        let repeated = [level.clone(), star.clone(), doe.clone()].concat();
        let swapped = [star.clone(), level.clone()].concat();
        let nested = [
            level.clone(),
            sequence(0x0008, 0x1110, &[[doe.clone(), star.clone()].concat()]),
        ]
        .concat();
        for (what, bytes) in [
            ("repeated", repeated),
            ("swapped", swapped),
            ("nested", nested),
        ] {
            let e = decode_identifier(&bytes, EXPLICIT).expect_err(what);
            assert!(e.to_string().contains("ascending"), "{what}: {e}");
        }
        // Command sets: CommandField twice.
        let mut cmd = request(command_field::C_FIND_RQ, 7, true);
        cmd.extend_from_slice(&[0, 0, 0, 1, 2, 0, 0, 0, 0x21, 0]);
        assert!(decode_command(&cmd).is_err());
    }

    #[test]
    fn nesting_is_bounded_whatever_the_lengths() {
        // About 1,900 levels of undefined-length sequences in 61 KB took a worker's stack before.
        let mut inner = el(0x0010, 0x0010, b"PN", b"DOE");
        for _ in 0..1900 {
            inner = sequence(0x0008, 0x1110, &[inner]);
        }
        let started = std::time::Instant::now();
        let e = decode_identifier(&inner, EXPLICIT).expect_err("too deep");
        assert!(e.to_string().contains("nested"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let mut ok = el(0x0010, 0x0010, b"PN", b"DOE");
        for _ in 0..MAX_NESTING {
            ok = sequence(0x0008, 0x1110, &[ok]);
        }
        assert!(
            decode_identifier(&ok, EXPLICIT).is_ok(),
            "{MAX_NESTING} levels are fine"
        );
        let deeper = sequence(0x0008, 0x1110, &[ok]);
        assert!(decode_identifier(&deeper, EXPLICIT).is_err());
    }

    #[test]
    fn misplaced_delimiters_and_mislabelled_values_are_refused() {
        let level = el(0x0008, 0x0052, b"CS", b"STUDY ");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "item outside a sequence",
                [level.clone(), delimiter(0xE000, 0)].concat(),
            ),
            (
                "stray item end",
                [level.clone(), delimiter(0xE00D, 0)].concat(),
            ),
            ("unclosed sequence", {
                let mut s = sequence(0x0008, 0x1110, &[]);
                s.truncate(s.len() - 8);
                [level.clone(), s].concat()
            }),
            ("PatientName as LO", el(0x0010, 0x0010, b"LO", b"DOE")),
            ("a meta element", el(0x0002, 0x0010, b"UI", b"1.2")),
            ("a non-item in a sequence", {
                let mut s = sequence(0x0008, 0x1110, &[]);
                let end = s.split_off(s.len() - 8);
                s.extend(el(0x0010, 0x0010, b"PN", b"DOE"));
                s.extend(end);
                [level.clone(), s].concat()
            }),
        ];
        for (what, bytes) in cases {
            assert!(decode_identifier(&bytes, EXPLICIT).is_err(), "{what}");
        }
    }

    #[test]
    fn a_command_group_length_must_match() {
        let mut bytes = request(command_field::C_FIND_RQ, 7, true);
        bytes[8] = bytes[8].wrapping_add(2);
        assert!(decode_command(&bytes).is_err());
    }
}
