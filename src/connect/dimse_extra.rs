//! DIMSE command sets that `connect` writes for move-as-get and `crate::dimse` does not have:
//! a C-MOVE-RSP with sub-operation counts, and a C-STORE-RQ re-addressed to a local storage SCP.

use dicom_core::header::Header;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::dimse::{self, Command, NO_DATA_SET, command_field, us};

/// Command Data Set Type value for "a data set follows" (any value other than 0x0101).
const DATA_SET_FOLLOWS: u16 = 0x0001;

/// The sub-operation counts of a C-MOVE / C-GET response (PS3.7 9.3.4.2 and 9.3.3.2).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SubOperations {
    /// Present in pending responses only.
    pub remaining: Option<u16>,
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
}

impl SubOperations {
    /// The counts a C-GET / C-MOVE response carries (absent counts read as 0).
    pub fn of(response: &Command) -> SubOperations {
        SubOperations {
            remaining: dimse::count(response, tags::NUMBER_OF_REMAINING_SUBOPERATIONS),
            completed: dimse::count(response, tags::NUMBER_OF_COMPLETED_SUBOPERATIONS).unwrap_or(0),
            failed: dimse::count(response, tags::NUMBER_OF_FAILED_SUBOPERATIONS).unwrap_or(0),
            warning: dimse::count(response, tags::NUMBER_OF_WARNING_SUBOPERATIONS).unwrap_or(0),
        }
    }

    /// Whether the response carried any count at all.
    pub fn present_in(response: &Command) -> bool {
        [
            tags::NUMBER_OF_REMAINING_SUBOPERATIONS,
            tags::NUMBER_OF_COMPLETED_SUBOPERATIONS,
            tags::NUMBER_OF_FAILED_SUBOPERATIONS,
            tags::NUMBER_OF_WARNING_SUBOPERATIONS,
        ]
        .into_iter()
        .any(|t| dimse::count(response, t).is_some())
    }
}

fn encode(object: InMemDicomObject) -> Vec<u8> {
    // Re-encoding keeps every element but (0000,0000), which command_from_element_iter recomputes.
    dimse::encode_command(
        object
            .into_iter()
            .filter(|e| e.tag() != tags::COMMAND_GROUP_LENGTH),
    )
}

/// A C-MOVE-RSP to `request` (a C-MOVE-RQ) with `status` and the sub-operation counts
/// (PS3.7 9.3.4.2). `with_data`: an identifier (e.g. the Failed SOP Instance UID List) follows.
/// A non-empty `comment` becomes the Error Comment of a failure.
pub fn move_response(
    request: &Command,
    status: u16,
    counts: &SubOperations,
    with_data: bool,
    comment: &str,
) -> Vec<u8> {
    let mut e = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(request.affected_sop_class.as_str()),
        ),
        us(
            tags::COMMAND_FIELD,
            command_field::C_MOVE_RQ | command_field::RESPONSE,
        ),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id),
        us(
            tags::COMMAND_DATA_SET_TYPE,
            if with_data {
                DATA_SET_FOLLOWS
            } else {
                NO_DATA_SET
            },
        ),
        us(tags::STATUS, status),
        us(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, counts.completed),
        us(tags::NUMBER_OF_FAILED_SUBOPERATIONS, counts.failed),
        us(tags::NUMBER_OF_WARNING_SUBOPERATIONS, counts.warning),
    ];
    if let Some(remaining) = counts.remaining {
        e.push(us(tags::NUMBER_OF_REMAINING_SUBOPERATIONS, remaining));
    }
    e.extend(dimse::error_comment(comment));
    encode(InMemDicomObject::command_from_element_iter(e))
}

/// The C-STORE-RQ `received` (a C-GET sub-operation) as a new request to a local storage SCP:
/// its own message ID, and the C-MOVE it serves as Move Originator AE title and message ID
/// (PS3.7 9.3.1.1), as an archive performing the C-MOVE would send it.
pub fn store_request(
    received: &Command,
    message_id: u16,
    move_originator_ae: &str,
    move_originator_message_id: u16,
) -> Vec<u8> {
    let mut object = received.object.clone();
    object.put(us(tags::MESSAGE_ID, message_id));
    object.put(DataElement::new(
        tags::MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE,
        VR::AE,
        PrimitiveValue::from(move_originator_ae),
    ));
    object.put(us(
        tags::MOVE_ORIGINATOR_MESSAGE_ID,
        move_originator_message_id,
    ));
    encode(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dimse::decode_command;

    fn move_rq() -> Command {
        let bytes = crate::tools::client::request_command(
            command_field::C_MOVE_RQ,
            "1.2.840.10008.5.1.4.1.2.2.2",
            9,
            true,
        );
        decode_command(&bytes).expect("decode C-MOVE-RQ")
    }

    #[test]
    fn move_responses_carry_counts_and_decode_with_the_gateway_codec() {
        let rq = move_rq();
        let counts = SubOperations {
            remaining: Some(2),
            completed: 3,
            failed: 1,
            warning: 0,
        };
        let rsp = decode_command(&move_response(&rq, 0xFF00, &counts, false, "")).expect("decode");
        assert_eq!(rsp.field, 0x8021);
        assert_eq!(rsp.responded_to, 9);
        assert_eq!(rsp.status, Some(0xFF00));
        assert!(!rsp.has_data_set);
        assert_eq!(SubOperations::of(&rsp), counts);
        assert!(SubOperations::present_in(&rsp));

        let final_counts = SubOperations {
            remaining: None,
            ..counts
        };
        let rsp = decode_command(&move_response(
            &rq,
            0xB000,
            &final_counts,
            true,
            "one failed",
        ))
        .expect("decode");
        assert!(rsp.has_data_set);
        assert_eq!(SubOperations::of(&rsp).remaining, None);
        assert_eq!(
            dimse::attribute(&rsp.object, tags::ERROR_COMMENT),
            "one failed"
        );
    }

    #[test]
    fn a_store_request_is_readdressed_with_the_move_originator() {
        let object = InMemDicomObject::command_from_element_iter([
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
            ),
            us(tags::COMMAND_FIELD, command_field::C_STORE_RQ),
            us(tags::MESSAGE_ID, 77),
            us(tags::PRIORITY, 0),
            us(tags::COMMAND_DATA_SET_TYPE, 0),
            DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4"),
            ),
            us(tags::STATUS, 0), // nonsense in a request, but it must survive untouched
        ]);
        let mut bytes = Vec::new();
        object
            .write_dataset_with_ts(
                &mut bytes,
                &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
            )
            .expect("encode");
        let received = decode_command(&bytes).expect("decode");
        let out = decode_command(&store_request(&received, 5, "ARCHIVE", 9)).expect("decode");
        assert_eq!(out.field, command_field::C_STORE_RQ);
        assert_eq!(out.message_id, 5);
        assert_eq!(out.affected_sop_instance, "1.2.3.4");
        assert!(out.has_data_set);
        assert_eq!(
            dimse::attribute(&out.object, tags::MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE),
            "ARCHIVE"
        );
        assert_eq!(
            dimse::count(&out, tags::MOVE_ORIGINATOR_MESSAGE_ID),
            Some(9)
        );
    }
}
