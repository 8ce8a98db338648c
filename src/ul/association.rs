//! Read, check and rewrite the A-ASSOCIATE-RQ on its way to the archive, and the A-ASSOCIATE-AC on its way back.

use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, MAXIMUM_PDU_SIZE, MINIMUM_PDU_SIZE, Pdu, UserIdentity,
    UserVariableItem, read_pdu, write_pdu,
};

/// The DICOM application context name (PS3.7 A.2.1).
pub const DICOM_APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";

/// Item type of the User Identity server response (PS3.7 D.3.3.7.2); dicom-ul has no typed variant.
const USER_IDENTITY_AC_ITEM: u8 = 0x59;

/// What is wrong with an association PDU.
#[derive(Debug, thiserror::Error)]
pub enum AssociationError {
    #[error("malformed {what}: {message}")]
    Malformed { what: &'static str, message: String },
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("cannot encode {what}: {message}")]
    Encode { what: &'static str, message: String },
}

fn parse(bytes: &[u8], what: &'static str) -> Result<Pdu, AssociationError> {
    // The framer has already bounded the length; hand dicom-ul the complete PDU.
    let max = (bytes.len() as u32).clamp(MINIMUM_PDU_SIZE, MAXIMUM_PDU_SIZE);
    match read_pdu(bytes, max, true) {
        Ok(Some(pdu)) => Ok(pdu),
        Ok(None) => Err(AssociationError::Malformed {
            what,
            message: "truncated".into(),
        }),
        Err(e) => Err(AssociationError::Malformed {
            what,
            message: e.to_string(),
        }),
    }
}

fn encode(pdu: &Pdu, what: &'static str) -> Result<Vec<u8>, AssociationError> {
    let mut out = Vec::new();
    write_pdu(&mut out, pdu).map_err(|e| AssociationError::Encode {
        what,
        message: e.to_string(),
    })?;
    Ok(out)
}

/// Parse a complete A-ASSOCIATE-RQ PDU.
pub fn parse_request(bytes: &[u8]) -> Result<AssociationRQ, AssociationError> {
    match parse(bytes, "A-ASSOCIATE-RQ")? {
        Pdu::AssociationRQ(rq) => Ok(rq),
        other => Err(AssociationError::Unexpected {
            expected: "A-ASSOCIATE-RQ",
            got: other.short_description().to_string(),
        }),
    }
}

/// The User Identity sub-item of a request, if any.
pub fn user_identity(rq: &AssociationRQ) -> Option<&UserIdentity> {
    rq.user_variables.iter().find_map(|v| match v {
        UserVariableItem::UserIdentityItem(id) => Some(id),
        _ => None,
    })
}

/// The Maximum Length sub-item (PS3.8 D.1) as announced, 0 ("unlimited") included; `None` when absent.
/// The one reader of that sub-item: callers apply their own defaults.
pub fn announced_max_length(items: &[UserVariableItem]) -> Option<u32> {
    items.iter().find_map(|v| match v {
        UserVariableItem::MaxLength(n) => Some(*n),
        _ => None,
    })
}

/// The Maximum Length a requestor uses for its peer: `default` when absent or 0 ("unlimited"),
/// and absurd values clamped to 4 KiB .. 16 MiB.
pub fn peer_max_length(items: &[UserVariableItem], default: u32) -> u32 {
    announced_max_length(items)
        .filter(|n| *n != 0)
        .unwrap_or(default)
        .clamp(4096, 16 * 1024 * 1024)
}

/// What a peer's Maximum Length means under a relay's own `limit`: absent or 0 ("unlimited") is
/// `limit`, anything larger is clamped to it.
pub fn limited_max_length(items: &[UserVariableItem], limit: u32) -> u32 {
    match announced_max_length(items).unwrap_or(0) {
        0 => limit,
        n => n.min(limit),
    }
}

/// Set the Maximum Length sub-item to what the peer asked, clamped to the gateway's limit (0 means unlimited).
fn clamp_max_length(items: &mut Vec<UserVariableItem>, limit: u32) -> u32 {
    let clamped = limited_max_length(items, limit);
    items.retain(|v| !matches!(v, UserVariableItem::MaxLength(_)));
    items.insert(0, UserVariableItem::MaxLength(clamped));
    clamped
}

/// The request as the archive will see it: no User Identity, the upstream's AE title as called AE,
/// the calling AE kept, and the maximum PDU length clamped to the gateway's limit.
pub fn rewrite_request(
    rq: &AssociationRQ,
    upstream_ae_title: &str,
    max_pdu_length: u32,
) -> Result<Vec<u8>, AssociationError> {
    let mut rq = rq.clone();
    rq.called_ae_title = upstream_ae_title.to_string();
    rq.user_variables
        .retain(|v| !matches!(v, UserVariableItem::UserIdentityItem(_)));
    clamp_max_length(&mut rq.user_variables, max_pdu_length);
    encode(&Pdu::AssociationRQ(rq), "A-ASSOCIATE-RQ")
}

/// What the archive answered.
#[derive(Debug)]
pub enum UpstreamAnswer {
    Accepted(AssociationAC),
    /// A-ASSOCIATE-RJ or A-ABORT, relayed as the archive sent it.
    Refused {
        pdu_type: u8,
        bytes: Vec<u8>,
    },
}

/// Classify the archive's answer to the association request.
pub fn parse_answer(bytes: &[u8]) -> Result<UpstreamAnswer, AssociationError> {
    match bytes.first() {
        Some(&crate::ul::pdu::A_ASSOCIATE_AC) => match parse(bytes, "A-ASSOCIATE-AC")? {
            Pdu::AssociationAC(ac) => Ok(UpstreamAnswer::Accepted(ac)),
            other => Err(AssociationError::Unexpected {
                expected: "A-ASSOCIATE-AC",
                got: other.short_description().to_string(),
            }),
        },
        Some(&t @ (crate::ul::pdu::A_ASSOCIATE_RJ | crate::ul::pdu::A_ABORT)) => {
            Ok(UpstreamAnswer::Refused {
                pdu_type: t,
                bytes: bytes.to_vec(),
            })
        }
        other => Err(AssociationError::Unexpected {
            expected: "A-ASSOCIATE-AC or -RJ",
            got: format!("PDU type {other:?}"),
        }),
    }
}

/// The accept as the client will see it: its own called AE title back, the maximum PDU length clamped,
/// and a User Identity server response when the client asked for one. Returns the PDU and the
/// maximum length the archive will accept from the client (after clamping).
pub fn rewrite_accept(
    ac: &AssociationAC,
    client_called_ae: &str,
    identity_response: bool,
    max_pdu_length: u32,
) -> Result<(Vec<u8>, u32), AssociationError> {
    let mut ac = ac.clone();
    ac.called_ae_title = client_called_ae.to_string();
    ac.user_variables
        .retain(|v| !matches!(v, UserVariableItem::Unknown(USER_IDENTITY_AC_ITEM, _)));
    let archive_max = clamp_max_length(&mut ac.user_variables, max_pdu_length);
    if identity_response {
        // Server response length 0: types 1 and 2 carry no response, and we do not echo tokens.
        ac.user_variables
            .push(UserVariableItem::Unknown(USER_IDENTITY_AC_ITEM, vec![0, 0]));
    }
    Ok((
        encode(&Pdu::AssociationAC(ac), "A-ASSOCIATE-AC")?,
        archive_max,
    ))
}

/// The maximum PDU length the client said it accepts, clamped to the gateway's limit.
pub fn client_max_pdu(rq: &AssociationRQ, max_pdu_length: u32) -> u32 {
    limited_max_length(&rq.user_variables, max_pdu_length)
}

/// One accepted presentation context (PS3.8 9.3.3.2): what may be said on it, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// The presentation contexts the archive accepted, each with the abstract syntax the requestor proposed
/// under that ID and the transfer syntax the archive chose. An accepted ID that was never proposed is left
/// out, so that nothing can be said on it.
pub fn accepted_contexts(
    rq: &AssociationRQ,
    ac: &AssociationAC,
) -> std::collections::HashMap<u8, Context> {
    ac.presentation_contexts
        .iter()
        .filter(|pc| pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance)
        .filter_map(|pc| {
            let proposed = rq.presentation_contexts.iter().find(|p| p.id == pc.id)?;
            Some((
                pc.id,
                Context {
                    abstract_syntax: proposed
                        .abstract_syntax
                        .trim_end_matches(['\0', ' '])
                        .to_string(),
                    transfer_syntax: pc.transfer_syntax.trim_end_matches(['\0', ' ']).to_string(),
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::{PresentationContextProposed, UserIdentityType};

    fn request(identity: Option<UserIdentity>, max: u32) -> AssociationRQ {
        let mut user_variables = vec![
            UserVariableItem::MaxLength(max),
            UserVariableItem::ImplementationClassUID("1.2.3".into()),
        ];
        if let Some(id) = identity {
            user_variables.push(UserVariableItem::UserIdentityItem(id));
        }
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "VIEWER".into(),
            called_ae_title: "ARCHIVE".into(),
            application_context_name: DICOM_APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![PresentationContextProposed {
                id: 1,
                abstract_syntax: "1.2.840.10008.1.1".into(),
                transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
            }],
            user_variables,
        }
    }

    #[test]
    fn the_rewritten_request_drops_identity_and_renames_the_called_ae() {
        let id = UserIdentity::new(
            true,
            UserIdentityType::UsernamePassword,
            b"alice".to_vec(),
            b"pw".to_vec(),
        );
        let rq = request(Some(id), 0);
        let bytes = encode(&Pdu::AssociationRQ(rq.clone()), "rq").expect("encode");
        let parsed = parse_request(&bytes).expect("parse");
        assert!(user_identity(&parsed).is_some());

        let out = rewrite_request(&parsed, "ORTHANC", 65536).expect("rewrite");
        let again = parse_request(&out).expect("parse rewritten");
        assert!(user_identity(&again).is_none());
        assert_eq!(again.called_ae_title, "ORTHANC");
        assert_eq!(again.calling_ae_title, "VIEWER");
        assert_eq!(announced_max_length(&again.user_variables), Some(65536));
        assert!(!out.windows(2).any(|w| w == b"pw"));
    }

    #[test]
    fn one_reading_of_maximum_length_for_every_relay() {
        use UserVariableItem::MaxLength;
        assert_eq!(limited_max_length(&[], 65536), 65536);
        assert_eq!(limited_max_length(&[MaxLength(0)], 65536), 65536);
        assert_eq!(limited_max_length(&[MaxLength(1 << 30)], 65536), 65536);
        assert_eq!(limited_max_length(&[MaxLength(16384)], 65536), 16384);
        // Repeated items: the first is the one read, as clamp_max_length forwards it.
        assert_eq!(
            limited_max_length(&[MaxLength(0), MaxLength(4096)], 65536),
            65536
        );
        assert_eq!(peer_max_length(&[MaxLength(0)], 262144), 262144);
        assert_eq!(peer_max_length(&[MaxLength(100)], 262144), 4096);
    }

    #[test]
    fn max_length_is_clamped_not_raised() {
        assert_eq!(client_max_pdu(&request(None, 16384), 262144), 16384);
        assert_eq!(client_max_pdu(&request(None, 0), 262144), 262144);
        assert_eq!(client_max_pdu(&request(None, 1 << 30), 262144), 262144);
    }

    #[test]
    fn the_accept_gets_an_identity_response_when_asked() {
        let ac = AssociationAC {
            protocol_version: 1,
            calling_ae_title: "VIEWER".into(),
            called_ae_title: "ORTHANC".into(),
            application_context_name: DICOM_APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![],
            user_variables: vec![UserVariableItem::MaxLength(0)],
        };
        let (bytes, max) = rewrite_accept(&ac, "ARCHIVE", true, 131072).expect("rewrite");
        assert_eq!(max, 131072);
        let UpstreamAnswer::Accepted(back) = parse_answer(&bytes).expect("parse") else {
            panic!("not an accept");
        };
        assert_eq!(back.called_ae_title, "ARCHIVE");
        assert!(
            back.user_variables
                .iter()
                .any(|v| matches!(v, UserVariableItem::Unknown(0x59, b) if b == &[0, 0]))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_request(&[1, 0, 0, 0, 0, 3, 1, 2, 3]).is_err());
        assert!(parse_request(&[]).is_err());
        assert!(parse_answer(&[0x04, 0, 0, 0, 0, 0]).is_err());
    }
}
