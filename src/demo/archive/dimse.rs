//! DIMSE vocabulary of the demo archive: command fields, statuses, command sets and data set encoding.
//!
//! Command sets are always Implicit VR Little Endian, group 0000 (PS3.7 section 9 and annex E).
//! Decoding (command sets, identifiers) and the shared command fields and statuses are pacsgate's
//! `crate::dimse`; what only an SCP needs (response builders with sub-operation counts) is here;
//! encoding uses dicom-object, which also computes the group length.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::{AdapterFreeTransferSyntax, Codec, Endianness, TransferSyntax};
use dicom_object::InMemDicomObject;

use super::DemoArchiveError;

/// Command Field values (PS3.7 E.1), pacsgate's own; responses add `RESPONSE_BIT`.
pub(crate) mod command {
    use crate::dimse::command_field as f;
    pub const C_STORE: u16 = f::C_STORE_RQ;
    pub const C_GET: u16 = f::C_GET_RQ;
    pub const C_FIND: u16 = f::C_FIND_RQ;
    pub const C_ECHO: u16 = f::C_ECHO_RQ;
    pub const C_CANCEL: u16 = f::C_CANCEL_RQ;
    pub const RESPONSE_BIT: u16 = f::RESPONSE;
}

/// Status values used by the demo archive: `crate::dimse::status`'s, under the names this code reads by.
pub(crate) mod status {
    pub use crate::dimse::status::IDENTIFIER_DOES_NOT_MATCH as DOES_NOT_MATCH_SOP_CLASS;
    pub use crate::dimse::status::{
        CANCEL, OUT_OF_RESOURCES, PENDING, SOP_CLASS_NOT_SUPPORTED, SUB_OPERATIONS_WITH_FAILURES,
        SUCCESS, UNABLE_TO_PERFORM_SUB_OPERATIONS, UNABLE_TO_PROCESS, UNRECOGNIZED_OPERATION,
        is_warning,
    };
}

/// (0000,0800) value meaning "no data set follows".
pub(crate) const NO_DATA_SET: u16 = crate::dimse::NO_DATA_SET;
/// (0000,0800) value we send when a data set follows (any value but 0x0101).
pub(crate) const DATA_SET_PRESENT: u16 = 0x0001;

pub(crate) const IMPLICIT_VR_LE: AdapterFreeTransferSyntax = TransferSyntax::new(
    uids::IMPLICIT_VR_LITTLE_ENDIAN,
    "Implicit VR Little Endian",
    Endianness::Little,
    false,
    Codec::None,
);
pub(crate) const EXPLICIT_VR_LE: AdapterFreeTransferSyntax = TransferSyntax::new(
    uids::EXPLICIT_VR_LITTLE_ENDIAN,
    "Explicit VR Little Endian",
    Endianness::Little,
    true,
    Codec::None,
);

/// The two uncompressed little endian transfer syntaxes, between which the archive transcodes.
pub(crate) fn native_ts(uid: &str) -> Option<AdapterFreeTransferSyntax> {
    match uid {
        uids::IMPLICIT_VR_LITTLE_ENDIAN => Some(IMPLICIT_VR_LE),
        uids::EXPLICIT_VR_LITTLE_ENDIAN => Some(EXPLICIT_VR_LE),
        _ => None,
    }
}

/// A request or response command set, read from the wire.
#[derive(Debug)]
pub(crate) struct Command(pub InMemDicomObject);

impl Command {
    /// Decoded by pacsgate's codec, which bounds every length before the decoder allocates.
    pub fn decode(bytes: &[u8]) -> Result<Command, DemoArchiveError> {
        crate::dimse::decode_command(bytes)
            .map(|c| Command(c.object))
            .map_err(|e| DemoArchiveError::Command(e.to_string()))
    }

    pub fn u16(&self, tag: Tag) -> Option<u16> {
        self.0.get(tag).and_then(|e| e.to_int::<u16>().ok())
    }

    pub fn string(&self, tag: Tag) -> Option<String> {
        let e = self.0.get(tag)?;
        let s = e.to_str().ok()?;
        let s = trim_value(&s);
        (!s.is_empty()).then(|| s.to_string())
    }

    pub fn field(&self) -> Option<u16> {
        self.u16(tags::COMMAND_FIELD)
    }

    pub fn message_id(&self) -> u16 {
        self.u16(tags::MESSAGE_ID).unwrap_or(0)
    }

    pub fn has_data_set(&self) -> bool {
        self.u16(tags::COMMAND_DATA_SET_TYPE)
            .is_some_and(|t| t != NO_DATA_SET)
    }
}

/// Builder for the command sets the archive sends.
pub(crate) struct CommandBuilder(Vec<DataElement<InMemDicomObject>>);

impl CommandBuilder {
    /// A response to a request: affected SOP class, response command field, responded-to message ID.
    pub fn response(request_field: u16, sop_class_uid: &str, responded_to: u16) -> Self {
        CommandBuilder(vec![])
            .str(tags::AFFECTED_SOP_CLASS_UID, VR::UI, sop_class_uid)
            .us(tags::COMMAND_FIELD, request_field | command::RESPONSE_BIT)
            .us(tags::MESSAGE_ID_BEING_RESPONDED_TO, responded_to)
    }

    /// A request: affected SOP class, command field, message ID and medium priority.
    pub fn request(field: u16, sop_class_uid: &str, message_id: u16) -> Self {
        CommandBuilder(vec![])
            .str(tags::AFFECTED_SOP_CLASS_UID, VR::UI, sop_class_uid)
            .us(tags::COMMAND_FIELD, field)
            .us(tags::MESSAGE_ID, message_id)
            .us(tags::PRIORITY, 0)
    }

    pub fn us(mut self, tag: Tag, value: u16) -> Self {
        self.0
            .push(DataElement::new(tag, VR::US, PrimitiveValue::from(value)));
        self
    }

    /// A sub-operation count (US): saturates at 65535.
    pub fn count(self, tag: Tag, n: usize) -> Self {
        self.us(tag, u16::try_from(n).unwrap_or(u16::MAX))
    }

    pub fn str(mut self, tag: Tag, vr: VR, value: &str) -> Self {
        self.0
            .push(DataElement::new(tag, vr, PrimitiveValue::from(value)));
        self
    }

    pub fn status(self, status: u16) -> Self {
        self.us(tags::STATUS, status)
    }

    /// Error Comment (0000,0902), LO: at most 64 characters.
    pub fn error_comment(self, comment: &str) -> Self {
        let comment: String = comment.chars().take(64).collect();
        self.str(tags::ERROR_COMMENT, VR::LO, &comment)
    }

    pub fn data_set(self, present: bool) -> Self {
        let value = if present {
            DATA_SET_PRESENT
        } else {
            NO_DATA_SET
        };
        self.us(tags::COMMAND_DATA_SET_TYPE, value)
    }

    /// Encode as Implicit VR Little Endian with (0000,0000) computed (`dimse::encode_command`).
    pub fn encode(self) -> Result<Vec<u8>, DemoArchiveError> {
        Ok(crate::dimse::encode_command(self.0))
    }
}

/// Read an identifier (C-FIND / C-GET request data set) in a query context's transfer syntax.
pub(crate) fn decode_identifier(
    bytes: &[u8],
    ts_uid: &str,
) -> Result<InMemDicomObject, DemoArchiveError> {
    // pacsgate's codec: the two native transfer syntaxes, lengths checked before decoding.
    crate::dimse::decode_identifier(bytes, ts_uid)
        .map_err(|e| DemoArchiveError::DataSet(e.to_string()))
}

/// Encode a data set in one of the native transfer syntaxes.
pub(crate) fn encode_data_set(
    obj: &InMemDicomObject,
    ts_uid: &str,
) -> Result<Vec<u8>, DemoArchiveError> {
    let ts = native_ts(ts_uid)
        .ok_or_else(|| DemoArchiveError::DataSet(format!("cannot encode in {ts_uid}")))?;
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts.erased())
        .map_err(|e| DemoArchiveError::DataSet(e.to_string()))?;
    Ok(out)
}

/// Re-encode a data set between Implicit and Explicit VR Little Endian.
pub(crate) fn transcode(bytes: &[u8], from: &str, to: &str) -> Result<Vec<u8>, DemoArchiveError> {
    if from == to {
        return Ok(bytes.to_vec());
    }
    let obj = decode_identifier(bytes, from)?;
    encode_data_set(&obj, to)
}

/// Trim DICOM value padding (spaces and NULs) from both ends.
pub(crate) fn trim_value(s: &str) -> &str {
    s.trim_matches(|c: char| c == ' ' || c == '\0')
}
