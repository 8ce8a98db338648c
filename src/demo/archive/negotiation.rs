//! The demo acceptor's side of A-ASSOCIATE (PS3.8 7.1, PS3.7 D.3.3): which requests it rejects,
//! which presentation contexts and transfer syntaxes it accepts, and the SCP roles it grants.

use std::collections::HashSet;

use dicom_dictionary_std::uids;
use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, PresentationContextProposed, PresentationContextResult,
    PresentationContextResultReason, RequestorRoles, UserVariableItem,
};

use super::dimse;
use crate::ul::association::announced_max_length;
use crate::ul::pdu;

/// Largest PDU (variable field) the demo acceptor receives, announced as its Maximum Length
/// (not the requestors' `ul::MAX_PDU_LENGTH`).
pub(crate) const DEMO_RECEIVE_MAX_PDU: u32 = 64 * 1024;
/// Largest PDU we send when the peer announces 0 (no limit).
const UNLIMITED_PEER_PDU: u32 = 1024 * 1024;

const APPLICATION_CONTEXT: &str = crate::ul::association::DICOM_APPLICATION_CONTEXT;
use crate::ul::IMPLEMENTATION_CLASS_UID;
/// Implementation Version Name of the demo archive.
const IMPLEMENTATION_VERSION_NAME: &str = "PACSGATE-DEMO";

/// Query/retrieve information model of a presentation context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Model {
    PatientRoot,
    StudyRoot,
}

/// What a presentation context is for, decided from its abstract syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Verification,
    Find(Model),
    Get(Model),
    Storage,
}

impl Service {
    fn of(abstract_syntax: &str) -> Option<Service> {
        Some(match abstract_syntax {
            uids::VERIFICATION => Service::Verification,
            uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND => {
                Service::Find(Model::PatientRoot)
            }
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND => {
                Service::Find(Model::StudyRoot)
            }
            uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET => {
                Service::Get(Model::PatientRoot)
            }
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET => Service::Get(Model::StudyRoot),
            uid if is_storage_sop_class(uid) => Service::Storage,
            _ => return None,
        })
    }
}

/// Standard storage SOP classes outside the Storage Service Class root (PS3.4 B.5).
const OTHER_STORAGE_SOP_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.4.34.7",  // RT Beams Delivery Instruction Storage
    "1.2.840.10008.5.1.4.34.10", // RT Brachy Application Setup Delivery Instruction Storage
    "1.2.840.10008.5.1.4.38.1",  // Hanging Protocol Storage
    "1.2.840.10008.5.1.4.39.1",  // Color Palette Storage
    "1.2.840.10008.5.1.4.43.1",  // Generic Implant Template Storage
    "1.2.840.10008.5.1.4.44.1",  // Implant Assembly Template Storage
    "1.2.840.10008.5.1.4.45.1",  // Implant Template Group Storage
];

/// Storage SOP classes: anything under the Storage Service Class root, plus the few outside it.
pub(crate) fn is_storage_sop_class(uid: &str) -> bool {
    uid.starts_with("1.2.840.10008.5.1.4.1.1.") || OTHER_STORAGE_SOP_CLASSES.contains(&uid)
}

/// An accepted presentation context.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
    pub service: Service,
}

/// Why an association request was refused.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rejection {
    ProtocolVersion,
    ApplicationContext,
    CalledAe,
}

impl Rejection {
    /// The A-ASSOCIATE-RJ codes: 1/2/2, 1/1/2, 1/1/7 (PS3.8 9.3.4).
    pub fn pdu(self) -> [u8; 10] {
        match self {
            Rejection::ProtocolVersion => pdu::Rejection::ProtocolVersion,
            Rejection::ApplicationContext => pdu::Rejection::ApplicationContext,
            Rejection::CalledAe => pdu::Rejection::CalledAeNotRecognized,
        }
        .pdu()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::ProtocolVersion => "rejected: protocol version",
            Rejection::ApplicationContext => "rejected: application context",
            Rejection::CalledAe => "rejected: called AE title",
        }
    }
}

/// What an accepted A-ASSOCIATE-RQ agreed.
pub(super) struct Negotiated {
    pub ac: AssociationAC,
    pub contexts: Vec<Context>,
    pub scp_role: HashSet<String>,
    pub send_max_pdu: u32,
}

/// Decide on an A-ASSOCIATE-RQ: the A-ASSOCIATE-AC plus what was agreed, or why it is rejected.
pub(super) fn negotiate(rq: &AssociationRQ, ae_title: &str) -> Result<Negotiated, Rejection> {
    if rq.protocol_version & 1 == 0 {
        return Err(Rejection::ProtocolVersion);
    }
    if trim_uid(&rq.application_context_name) != APPLICATION_CONTEXT {
        return Err(Rejection::ApplicationContext);
    }
    if !ae_title.is_empty() && rq.called_ae_title.trim() != ae_title.trim() {
        return Err(Rejection::CalledAe);
    }
    let (contexts, results): (Vec<_>, Vec<_>) = rq.presentation_contexts.iter().map(decide).unzip();
    let send_max_pdu = match announced_max_length(&rq.user_variables) {
        None => dicom_ul::pdu::DEFAULT_MAX_PDU,
        Some(0) => UNLIMITED_PEER_PDU,
        Some(n) => n.min(UNLIMITED_PEER_PDU),
    };
    let mut user_variables = vec![
        UserVariableItem::MaxLength(DEMO_RECEIVE_MAX_PDU),
        UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
        UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
    ];
    let scp_role = select_roles(&rq.user_variables, &mut user_variables);
    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: APPLICATION_CONTEXT.to_string(),
        presentation_contexts: results,
        user_variables,
    };
    Ok(Negotiated {
        ac,
        contexts: contexts.into_iter().flatten().collect(),
        scp_role,
        send_max_pdu,
    })
}

/// One proposed presentation context: accepted (with the context agreed) or refused, and its result.
fn decide(pc: &PresentationContextProposed) -> (Option<Context>, PresentationContextResult) {
    let abstract_syntax = trim_uid(&pc.abstract_syntax).to_string();
    let mut proposed = pc.transfer_syntaxes.iter().map(|ts| trim_uid(ts));
    let (reason, context) = match Service::of(&abstract_syntax) {
        None => (
            PresentationContextResultReason::AbstractSyntaxNotSupported,
            None,
        ),
        Some(service) => {
            let chosen = match service {
                // Stored as received: any transfer syntax whose data set dicom-rs can parse.
                Service::Storage => {
                    proposed.find(|ts| dicom_ul::association::server::is_supported(ts))
                }
                _ => proposed.find(|ts| dimse::native_ts(ts).is_some()),
            };
            match chosen {
                Some(ts) => (
                    PresentationContextResultReason::Acceptance,
                    Some(Context {
                        id: pc.id,
                        abstract_syntax,
                        transfer_syntax: ts.to_string(),
                        service,
                    }),
                ),
                None => (
                    PresentationContextResultReason::TransferSyntaxesNotSupported,
                    None,
                ),
            }
        }
    };
    let transfer_syntax = context
        .as_ref()
        .map_or(uids::IMPLICIT_VR_LITTLE_ENDIAN, |c| {
            c.transfer_syntax.as_str()
        })
        .to_string();
    let result = PresentationContextResult {
        id: pc.id,
        reason,
        transfer_syntax,
    };
    (context, result)
}

/// Role selection (PS3.7 D.3.3.4): grant what is asked for storage SOP classes, so a C-GET
/// requestor can take the SCP role for the C-STORE sub-operations. The answers are appended to
/// `answer`; the SOP classes on which the requestor is SCP are returned.
fn select_roles(asked: &[UserVariableItem], answer: &mut Vec<UserVariableItem>) -> HashSet<String> {
    let mut scp_role = HashSet::new();
    for item in asked {
        let UserVariableItem::ScuScpRoleSelectionSubItem(sop_class, roles) = item else {
            continue;
        };
        let sop_class = trim_uid(sop_class);
        if is_storage_sop_class(sop_class) {
            if roles.scp {
                scp_role.insert(sop_class.to_string());
            }
            answer.push(UserVariableItem::ScuScpRoleSelectionSubItem(
                sop_class.to_string(),
                RequestorRoles {
                    scu: roles.scu,
                    scp: roles.scp,
                },
            ));
        }
    }
    scp_role
}

fn trim_uid(uid: &str) -> &str {
    dimse::trim_value(uid)
}
