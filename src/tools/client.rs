//! The tools' DICOM requestor: TCP or TLS (`client/tls.rs`), a User Identity, C-ECHO and C-FIND,
//! every wait bounded and named, and rejections decoded into words (`client/words.rs`).
//!
//! The association itself is `ul::requestor`'s (pacsgate's bounded framing, not dicom-ul's client
//! association: a diagnostic tool has to report A-ASSOCIATE-RJ and A-ABORT codes that dicom-ul's
//! strict reader refuses, and the probe needs the raw first bytes of a server that does not speak
//! DICOM at all); this file words its failures as [`ToolError`] and caps a JWT before `write_pdu`
//! truncates its 16-bit length.

mod tls;
mod words;

use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::pdu::{Pdu, UserIdentity, UserIdentityType, UserVariableItem, write_pdu};
use tokio::io::{AsyncRead, AsyncWrite};

use super::ToolError;
use crate::dimse::{self, Command, command_field, status};
use crate::ul::pdu::{self, PduError};
use crate::ul::requestor::{self, Answer, Proposal, Requestor, RequestorError};

pub use tls::{Connection, TlsClient, connect};
pub use words::{Abort, Rejection, status_words};

/// Verification SOP class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Study Root Query/Retrieve Information Model - FIND.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
/// Patient Root Query/Retrieve Information Model - FIND.
pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";

pub use crate::ul::MAX_PDU_LENGTH;
/// Implementation Version Name of the command-line tools.
const IMPLEMENTATION_VERSION_NAME: &str = "PACSGATE-TOOLS";
/// Largest A-ASSOCIATE-AC / -RJ we read.
const MAX_ANSWER_LENGTH: u32 = 64 * 1024;
/// Largest identifier (C-FIND response data set) we keep.
const MAX_IDENTIFIER_LENGTH: usize = 4 * 1024 * 1024;
/// The longest primary field of a User Identity: its length is 16 bits, and the whole sub-item
/// (with the secondary field) must fit in a 16-bit item length.
const MAX_IDENTITY_FIELD: usize = 60 * 1024;
/// How many messages that do not answer the request (other message IDs, other commands) are read
/// past while waiting for its response; a peer that sends only those is refused.
const MAX_OTHER_MESSAGES: usize = 64;
/// How many pending C-FIND responses are drained after a C-CANCEL before giving up on the final one
/// (the peer must stop "as soon as possible", PS3.4 C.4.1.2.3).
const MAX_AFTER_CANCEL: usize = 10_000;

/// A peer that answered with nothing but other messages.
fn other_messages(request: &str) -> ToolError {
    ToolError::Protocol(format!(
        "over {MAX_OTHER_MESSAGES} messages that do not answer the {request} request"
    ))
}

/// Any byte stream an association can run over: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Who we say we are in the A-ASSOCIATE-RQ.
#[derive(Clone, Default)]
pub enum Identity {
    /// No User Identity sub-item.
    #[default]
    None,
    /// Type 2: username and passcode.
    Password { user: String, password: String },
    /// Type 5: a JSON Web Token.
    Jwt(String),
}

impl std::fmt::Debug for Identity {
    /// Never shows a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::None => f.write_str("no user identity"),
            Identity::Password { user, .. } => write!(f, "user {user:?} with a password"),
            Identity::Jwt(_) => f.write_str("a JWT"),
        }
    }
}

impl Identity {
    fn sub_item(&self) -> Result<Option<UserIdentity>, ToolError> {
        let (kind, primary, secondary) = match self {
            Identity::None => return Ok(None),
            Identity::Password { user, password } => (
                UserIdentityType::UsernamePassword,
                user.as_bytes(),
                password.as_bytes(),
            ),
            Identity::Jwt(token) => (UserIdentityType::Jwt, token.as_bytes(), &b""[..]),
        };
        if primary.len() + secondary.len() > MAX_IDENTITY_FIELD {
            return Err(ToolError::Usage(format!(
                "the user identity is {} bytes; a DICOM User Identity holds at most {MAX_IDENTITY_FIELD}",
                primary.len() + secondary.len()
            )));
        }
        Ok(Some(UserIdentity::new(
            true,
            kind,
            primary.to_vec(),
            secondary.to_vec(),
        )))
    }
}

/// What to put in the A-ASSOCIATE-RQ.
#[derive(Debug, Clone)]
pub struct Request {
    pub calling_ae: String,
    pub called_ae: String,
    pub identity: Identity,
    /// Abstract syntaxes to propose, one presentation context each.
    pub abstract_syntaxes: Vec<&'static str>,
    /// Bound on every wait of the association.
    pub timeout: Duration,
}

/// A presentation context the acceptor accepted.
#[derive(Debug, Clone)]
pub struct AcceptedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// An established association.
pub struct Association {
    requestor: Requestor<Box<dyn Stream>>,
    /// The acceptor confirmed the User Identity (sub-item 0x59 in the A-ASSOCIATE-AC).
    pub identity_confirmed: bool,
}

/// A DIMSE message as received.
pub struct Message {
    pub context: u8,
    pub command: Command,
    pub data: Option<Vec<u8>>,
}

/// Send the A-ASSOCIATE-RQ and read the answer.
pub async fn associate(conn: Connection, request: &Request) -> Result<Association, ToolError> {
    let mut stream = conn.stream;
    let proposals: Vec<Proposal> = request
        .abstract_syntaxes
        .iter()
        .map(|syntax| Proposal {
            abstract_syntax: syntax.to_string(),
            transfer_syntaxes: vec![
                EXPLICIT_VR_LITTLE_ENDIAN.uid().to_string(),
                IMPLICIT_VR_LITTLE_ENDIAN.uid().to_string(),
            ],
        })
        .collect();
    let rq = requestor::request(
        &request.calling_ae,
        &request.called_ae,
        IMPLEMENTATION_VERSION_NAME,
        &proposals,
        &[],
        request.identity.sub_item()?,
    );
    let mut bytes = Vec::new();
    write_pdu(&mut bytes, &Pdu::AssociationRQ(rq.clone()))
        .map_err(|e| ToolError::Protocol(format!("A-ASSOCIATE-RQ: {e}")))?;
    let answer = requestor::exchange(&mut stream, &bytes, MAX_ANSWER_LENGTH, request.timeout)
        .await
        .map_err(answer_error)?;
    let ac = match answer {
        Answer::Accepted(ac) => ac,
        Answer::Rejected(rj) => {
            let code = |i: usize| rj.get(i).copied().unwrap_or(0);
            return Err(ToolError::Rejected(Rejection {
                result: code(7),
                source: code(8),
                reason: code(9),
            }));
        }
        Answer::Aborted(abort) => {
            let (source, reason) = requestor::abort_codes(&abort);
            return Err(ToolError::Aborted(Abort { source, reason }));
        }
    };
    let identity_confirmed = ac
        .user_variables
        .iter()
        .any(|v| matches!(v, UserVariableItem::Unknown(0x59, _)));
    Ok(Association {
        requestor: Requestor::new(stream, &rq, &ac, request.timeout),
        identity_confirmed,
    })
}

/// A failure of the A-ASSOCIATE exchange in the tools' words.
fn answer_error(e: RequestorError) -> ToolError {
    match e {
        RequestorError::Timeout {
            phase: requestor::WAITING_FOR_ANSWER,
            after,
        } => ToolError::Timeout {
            phase: "the A-ASSOCIATE-AC or -RJ",
            after,
        },
        RequestorError::Answer {
            pdu_type: pdu::A_ASSOCIATE_AC,
            error,
        } => ToolError::Protocol(error.to_string()),
        RequestorError::Answer { pdu_type, .. } => ToolError::Protocol(format!(
            "expected an A-ASSOCIATE-AC or -RJ, got PDU type {pdu_type:#04x}"
        )),
        other => other.into(),
    }
}

/// A failure on the association in the tools' words: what the first byte of a PDU that is not
/// DICOM suggests, and data-set troubles said the way the tools always said them.
impl From<RequestorError> for ToolError {
    fn from(e: RequestorError) -> ToolError {
        if let Some(phase) = e.closed_phase() {
            return ToolError::Closed { phase };
        }
        match e {
            RequestorError::Timeout { phase, after } => ToolError::Timeout { phase, after },
            // 0x15 is a TLS alert record, 0x16 a TLS handshake record: a TLS port read as plain DICOM.
            RequestorError::Read {
                error: PduError::UnknownType(t @ (0x15 | 0x16)),
                ..
            } => ToolError::NotDicom(format!(
                "the server answered with a TLS record (first byte {t:#04x}): this port expects TLS"
            )),
            RequestorError::Read {
                error: PduError::UnknownType(t),
                ..
            } => ToolError::NotDicom(format!(
                "the server answered with something that is not DICOM (first byte {t:#04x})"
            )),
            RequestorError::Aborted { origin, reason } => ToolError::Aborted(Abort {
                source: origin,
                reason,
            }),
            RequestorError::DataForCommand(_) => ToolError::Protocol(
                "a data set fragment arrived where a command set was expected".into(),
            ),
            RequestorError::NotOnContext { .. } => ToolError::Protocol(
                "expected a data set fragment on the same presentation context".into(),
            ),
            RequestorError::DataTooLarge { limit, .. } => {
                ToolError::Protocol(format!("a response data set exceeds {limit} bytes"))
            }
            other => ToolError::Protocol(other.to_string()),
        }
    }
}

/// The request command set of a DIMSE-C request (PS3.7 9.3), Implicit VR Little Endian.
pub fn request_command(field: u16, sop_class: &str, message_id: u16, with_data: bool) -> Vec<u8> {
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        us(tags::COMMAND_FIELD, field),
        us(tags::MESSAGE_ID, message_id),
        us(
            tags::COMMAND_DATA_SET_TYPE,
            if with_data {
                0x0001
            } else {
                dimse::NO_DATA_SET
            },
        ),
    ];
    if field != command_field::C_ECHO_RQ {
        elements.push(us(tags::PRIORITY, 0));
    }
    dimse::encode_command(elements)
}

/// Encode an identifier in a context's transfer syntax (Implicit or Explicit VR Little Endian).
pub fn encode_identifier(
    obj: &InMemDicomObject,
    transfer_syntax: &str,
) -> Result<Vec<u8>, ToolError> {
    let ts = if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN.uid() {
        IMPLICIT_VR_LITTLE_ENDIAN.erased()
    } else if transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN.uid() {
        EXPLICIT_VR_LITTLE_ENDIAN.erased()
    } else {
        return Err(ToolError::Protocol(format!(
            "the acceptor chose transfer syntax {transfer_syntax}, which was not proposed"
        )));
    };
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts)
        .map_err(|e| ToolError::Usage(format!("cannot encode the query keys: {e}")))?;
    Ok(out)
}

/// The end of a C-FIND: the final status and how many matches arrived.
#[derive(Debug, Clone)]
pub struct FindOutcome {
    pub status: u16,
    pub error_comment: String,
    pub matches: usize,
    /// We sent a C-CANCEL because the caller had enough.
    pub cancelled: bool,
}

impl Association {
    /// The accepted context for an abstract syntax.
    pub fn context_for(&self, abstract_syntax: &str) -> Option<AcceptedContext> {
        let id = self.requestor.context_for(abstract_syntax, None)?;
        let context = self.requestor.contexts.get(&id)?;
        Some(AcceptedContext {
            id,
            abstract_syntax: context.abstract_syntax.clone(),
            transfer_syntax: context.transfer_syntax.clone(),
        })
    }

    fn message_id(&mut self) -> u16 {
        self.requestor.message_id()
    }

    /// Send one DIMSE message, split to the acceptor's maximum PDU length.
    pub async fn send_message(
        &mut self,
        context: u8,
        command: &[u8],
        data: Option<&[u8]>,
    ) -> Result<(), ToolError> {
        let phase = "sending a request";
        Ok(self
            .requestor
            .send_message(context, command, data, phase)
            .await?)
    }

    /// Read one whole DIMSE message (command set and, if announced, its data set).
    pub async fn read_message(&mut self, phase: &'static str) -> Result<Message, ToolError> {
        let (context, command) = self
            .requestor
            .read_command_set(dimse::MAX_COMMAND_LENGTH, phase)
            .await?;
        let command = dimse::decode_command(&command)?;
        let data = match command.has_data_set {
            true => Some(
                self.requestor
                    .read_data(context, MAX_IDENTIFIER_LENGTH, phase)
                    .await?,
            ),
            false => None,
        };
        Ok(Message {
            context,
            command,
            data,
        })
    }

    /// C-ECHO: the response status.
    pub async fn echo(&mut self) -> Result<u16, ToolError> {
        let context = self
            .context_for(VERIFICATION)
            .ok_or(ToolError::ContextRejected("Verification (C-ECHO)"))?
            .id;
        let id = self.message_id();
        let command = request_command(command_field::C_ECHO_RQ, VERIFICATION, id, false);
        self.send_message(context, &command, None).await?;
        for _ in 0..=MAX_OTHER_MESSAGES {
            let message = self.read_message("waiting for the C-ECHO response").await?;
            let c = &message.command;
            if c.field == command_field::C_ECHO_RQ | command_field::RESPONSE && c.responded_to == id
            {
                return c
                    .status
                    .ok_or_else(|| ToolError::Protocol("C-ECHO response without status".into()));
            }
        }
        Err(other_messages("C-ECHO"))
    }

    /// C-FIND with `identifier` on the context of `model`; `on_match` gets each pending
    /// identifier and returns false to stop (a C-CANCEL is sent, and the rest is drained).
    pub async fn find(
        &mut self,
        model: &'static str,
        identifier: &InMemDicomObject,
        mut on_match: impl FnMut(InMemDicomObject) -> bool,
    ) -> Result<FindOutcome, ToolError> {
        let context = self
            .context_for(model)
            .ok_or(ToolError::ContextRejected("the C-FIND information model"))?;
        let data = encode_identifier(identifier, &context.transfer_syntax)?;
        let id = self.message_id();
        let command = request_command(command_field::C_FIND_RQ, model, id, true);
        self.send_message(context.id, &command, Some(&data)).await?;
        let mut matches = 0usize;
        let mut cancelled = false;
        let (mut others, mut after_cancel) = (0usize, 0usize);
        loop {
            let message = self.read_message("waiting for C-FIND responses").await?;
            let c = &message.command;
            if c.field != command_field::C_FIND_RQ | command_field::RESPONSE || c.responded_to != id
            {
                others += 1;
                if others > MAX_OTHER_MESSAGES {
                    return Err(other_messages("C-FIND"));
                }
                continue;
            }
            let status = c
                .status
                .ok_or_else(|| ToolError::Protocol("C-FIND response without status".into()))?;
            if !status::is_pending(status) {
                return Ok(FindOutcome {
                    status,
                    error_comment: dimse::attribute(&c.object, tags::ERROR_COMMENT),
                    matches,
                    cancelled,
                });
            }
            matches += 1;
            if cancelled {
                after_cancel += 1;
                if after_cancel > MAX_AFTER_CANCEL {
                    return Err(ToolError::Protocol(format!(
                        "over {MAX_AFTER_CANCEL} pending C-FIND responses after the C-CANCEL"
                    )));
                }
                continue;
            }
            let Some(bytes) = message.data else {
                continue;
            };
            let object = dimse::decode_identifier(&bytes, &context.transfer_syntax)?;
            if !on_match(object) {
                cancelled = true;
                let cancel = dimse::c_cancel(id);
                self.send_message(context.id, &cancel, None).await?;
            }
        }
    }

    /// A-RELEASE-RQ, then wait for the A-RELEASE-RP.
    pub async fn release(self) -> Result<(), ToolError> {
        Ok(self.requestor.release().await?)
    }

    /// A-ABORT (service user), best effort.
    pub async fn abort(self) {
        self.requestor.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_read_as_words_with_pacsgate_hints() {
        let r = Rejection {
            result: 1,
            source: 2,
            reason: 1,
        };
        assert_eq!(
            r.to_string(),
            "A-ASSOCIATE-RJ 1/2/1: rejected permanently by the service provider (ACSE): no reason given"
        );
        assert!(r.pacsgate_hint().is_some_and(|h| h.contains("credentials")));
        let r = Rejection {
            result: 1,
            source: 1,
            reason: 7,
        };
        assert!(r.words().contains("called AE title not recognized"));
        assert!(
            Rejection {
                result: 9,
                source: 9,
                reason: 9
            }
            .pacsgate_hint()
            .is_none()
        );
    }

    #[test]
    fn request_commands_decode_with_the_gateway_codec() {
        let bytes = request_command(command_field::C_FIND_RQ, STUDY_ROOT_FIND, 7, true);
        let c = dimse::decode_command(&bytes).expect("decode");
        assert_eq!((c.field, c.message_id, c.has_data_set), (0x0020, 7, true));
        assert_eq!(c.affected_sop_class, STUDY_ROOT_FIND);
        let echo = dimse::decode_command(&request_command(0x0030, VERIFICATION, 1, false))
            .expect("decode");
        assert!(!echo.has_data_set);
    }

    #[test]
    fn an_oversized_token_is_refused_before_encoding() {
        let id = Identity::Jwt("x".repeat(70_000));
        assert!(matches!(id.sub_item(), Err(ToolError::Usage(_))));
        assert!(
            !format!(
                "{:?}",
                Identity::Password {
                    user: "u".into(),
                    password: "secret".into()
                }
            )
            .contains("secret")
        );
    }

    /// One P-DATA-TF with one PDV (`header`: 0x03 a whole command set, 0x02 a whole data set).
    fn p_data(header: u8, data: &[u8]) -> Vec<u8> {
        let mut out = vec![pdu::P_DATA_TF, 0];
        out.extend_from_slice(&((data.len() + 6) as u32).to_be_bytes());
        out.extend_from_slice(&((data.len() + 2) as u32).to_be_bytes());
        out.extend_from_slice(&[1, header]);
        out.extend_from_slice(data);
        out
    }

    /// A response command set: `field`, responding to `id`, with `status`, with or without a data set.
    fn response(field: u16, sop_class: &str, id: u16, status: u16, with_data: bool) -> Vec<u8> {
        dimse::encode_command(vec![
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(sop_class),
            ),
            dimse::us(tags::COMMAND_FIELD, field | command_field::RESPONSE),
            dimse::us(tags::MESSAGE_ID_BEING_RESPONDED_TO, id),
            dimse::us(
                tags::COMMAND_DATA_SET_TYPE,
                if with_data { 0x0000 } else { 0x0101 },
            ),
            dimse::us(tags::STATUS, status),
        ])
    }

    /// An association with an in-memory acceptor that accepts `abstract_syntax` on context 1,
    /// reads the first PDU of the request, then writes `answers` (whole PDUs) and keeps the pipe open.
    async fn against(
        abstract_syntax: &'static str,
        answers: Vec<Vec<u8>>,
    ) -> (
        Association,
        tokio::task::JoinHandle<tokio::io::DuplexStream>,
    ) {
        use dicom_ul::pdu::PresentationContextResultReason;
        use dicom_ul::pdu::{AssociationAC, PresentationContextResult};
        use tokio::io::AsyncWriteExt;
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let peer = tokio::spawn(async move {
            let mut buf = Vec::new();
            pdu::read_pdu(&mut theirs, &mut buf, 1 << 20)
                .await
                .expect("A-ASSOCIATE-RQ");
            let ac = Pdu::AssociationAC(AssociationAC {
                protocol_version: 1,
                calling_ae_title: "TOOL".into(),
                called_ae_title: "ARCHIVE".into(),
                application_context_name: "1.2.840.10008.3.1.1.1".into(),
                presentation_contexts: vec![PresentationContextResult {
                    id: 1,
                    reason: PresentationContextResultReason::Acceptance,
                    transfer_syntax: EXPLICIT_VR_LITTLE_ENDIAN.uid().to_string(),
                }],
                user_variables: vec![UserVariableItem::MaxLength(16384)],
            });
            let mut out = Vec::new();
            write_pdu(&mut out, &ac).expect("A-ASSOCIATE-AC");
            theirs.write_all(&out).await.expect("write AC");
            pdu::read_pdu(&mut theirs, &mut buf, 1 << 20)
                .await
                .expect("request");
            for a in answers {
                if theirs.write_all(&a).await.is_err() {
                    break;
                }
            }
            theirs
        });
        let conn = Connection {
            stream: Box::new(ours),
            peer: "127.0.0.1:104".parse().expect("address"),
            tls_version: None,
        };
        let request = Request {
            calling_ae: "TOOL".into(),
            called_ae: "ARCHIVE".into(),
            identity: Identity::None,
            abstract_syntaxes: vec![abstract_syntax],
            timeout: Duration::from_secs(5),
        };
        let assoc = associate(conn, &request).await.expect("associated");
        (assoc, peer)
    }

    #[tokio::test]
    async fn a_peer_that_answers_only_other_messages_is_refused() {
        // Responses to a message ID never sent, more than the tools read past.
        let others = (0..=MAX_OTHER_MESSAGES)
            .map(|_| p_data(0x03, &response(0x0030, VERIFICATION, 999, 0, false)))
            .collect();
        let (mut assoc, _peer) = against(VERIFICATION, others).await;
        let e = assoc.echo().await.expect_err("never answered");
        assert!(e.to_string().contains("do not answer the C-ECHO"), "{e}");

        // A few of them, then the answer: fine.
        let mut answers: Vec<Vec<u8>> = (0..3)
            .map(|_| p_data(0x03, &response(0x0030, VERIFICATION, 999, 0, false)))
            .collect();
        answers.push(p_data(0x03, &response(0x0030, VERIFICATION, 1, 0, false)));
        let (mut assoc, _peer) = against(VERIFICATION, answers).await;
        assert_eq!(assoc.echo().await.expect("answered"), 0);
    }

    #[tokio::test]
    async fn pending_responses_after_a_cancel_are_bounded() {
        // One match (the tool cancels after it), then pending responses that never stop.
        let mut identifier = InMemDicomObject::new_empty();
        identifier.put(DataElement::new(
            tags::PATIENT_ID,
            VR::LO,
            PrimitiveValue::from("P1"),
        ));
        let data = dimse::encode_identifier(&identifier, EXPLICIT_VR_LITTLE_ENDIAN.uid())
            .expect("identifier");
        let mut answers = vec![
            p_data(0x03, &response(0x0020, STUDY_ROOT_FIND, 1, 0xFF00, true)),
            p_data(0x02, &data),
        ];
        let pending = p_data(0x03, &response(0x0020, STUDY_ROOT_FIND, 1, 0xFF00, false));
        answers.extend(std::iter::repeat_n(pending, MAX_AFTER_CANCEL + 1));
        let (mut assoc, _peer) = against(STUDY_ROOT_FIND, answers).await;
        let e = assoc
            .find(STUDY_ROOT_FIND, &identifier, |_| false)
            .await
            .expect_err("never final");
        assert!(e.to_string().contains("after the C-CANCEL"), "{e}");
    }
}
