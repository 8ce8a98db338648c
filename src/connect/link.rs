//! A small association requestor over any byte stream, for the associations `connect` opens itself
//! in move-as-get: the C-GET association to the gateway and the one to the local storage SCP.
//! Arbitrary presentation contexts and SCP role selection, whole DIMSE commands, data sets streamed
//! PDV by PDV, every wait bounded.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, Pdu, PresentationContextProposed,
    PresentationContextResultReason, RequestorRoles, UserIdentity, UserVariableItem, write_pdu,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::dimse::{self, Command};
use crate::ul::association::{DICOM_APPLICATION_CONTEXT, UpstreamAnswer, parse_answer};
use crate::ul::pdata::{self, PDataWriter};
use crate::ul::pdu::{self, PduError};

use crate::ul::IMPLEMENTATION_CLASS_UID;
pub use crate::ul::MAX_PDU_LENGTH;
/// Largest A-ASSOCIATE-AC / -RJ we read.
const MAX_ANSWER_LENGTH: u32 = 1024 * 1024;
/// Implementation Version Name of pacsgate connect.
const IMPLEMENTATION_VERSION_NAME: &str = "PACSGATE-CONNECT";

/// Explicit VR Little Endian and Implicit VR Little Endian.
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

/// What went wrong on an association we opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the peer closed the connection while {0}")]
    Closed(&'static str),
    #[error("the peer aborted the association (A-ABORT {origin}/{reason})")]
    Aborted { origin: u8, reason: u8 },
    #[error("{0}")]
    Io(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// The answer to an A-ASSOCIATE-RQ.
#[derive(Debug)]
pub enum Answer {
    Accepted(AssociationAC),
    /// A-ASSOCIATE-RJ, as it came.
    Rejected(Vec<u8>),
    /// A-ABORT, as it came.
    Aborted(Vec<u8>),
}

/// One presentation context to propose.
#[derive(Debug, Clone)]
pub struct Proposal {
    pub abstract_syntax: String,
    pub transfer_syntaxes: Vec<String>,
}

/// An A-ASSOCIATE-RQ with `proposals` (context IDs 1, 3, 5, ...), the SCP role proposed for the
/// SOP classes in `scp_roles`, and an optional User Identity.
pub fn request(
    calling_ae: &str,
    called_ae: &str,
    proposals: &[Proposal],
    scp_roles: &[String],
    identity: Option<UserIdentity>,
) -> AssociationRQ {
    let presentation_contexts = proposals
        .iter()
        .zip((1u8..=255).step_by(2))
        .map(|(p, id)| PresentationContextProposed {
            id,
            abstract_syntax: p.abstract_syntax.clone(),
            transfer_syntaxes: p.transfer_syntaxes.clone(),
        })
        .collect();
    let mut user_variables = vec![
        UserVariableItem::MaxLength(MAX_PDU_LENGTH),
        UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
        UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
    ];
    user_variables.extend(scp_roles.iter().map(|class| {
        UserVariableItem::ScuScpRoleSelectionSubItem(
            class.clone(),
            RequestorRoles {
                scu: false,
                scp: true,
            },
        )
    }));
    if let Some(identity) = identity {
        user_variables.push(UserVariableItem::UserIdentityItem(identity));
    }
    AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling_ae.to_string(),
        called_ae_title: called_ae.to_string(),
        application_context_name: DICOM_APPLICATION_CONTEXT.to_string(),
        presentation_contexts,
        user_variables,
    }
}

/// Encode a PDU.
pub fn encode(pdu: &Pdu) -> Result<Vec<u8>, LinkError> {
    let mut out = Vec::new();
    write_pdu(&mut out, pdu).map_err(|e| LinkError::Protocol(format!("cannot encode: {e}")))?;
    Ok(out)
}

/// Send an encoded A-ASSOCIATE-RQ and read the answer, within `timeout`.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
    timeout: Duration,
) -> Result<Answer, LinkError> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        stream.write_all(request).await?;
        stream.flush().await?;
        pdu::read_pdu(stream, &mut buf, MAX_ANSWER_LENGTH)
            .await
            .map_err(|e| match e {
                PduError::Io(e) => e,
                other => std::io::Error::other(other.to_string()),
            })
    })
    .await;
    match read {
        Err(_) => return Err(LinkError::Timeout("waiting for the A-ASSOCIATE-AC")),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(LinkError::Closed("waiting for the A-ASSOCIATE-AC"));
        }
        Ok(Err(e)) => return Err(LinkError::Io(e.to_string())),
        Ok(Ok(_)) => {}
    }
    match parse_answer(&buf) {
        Ok(UpstreamAnswer::Accepted(ac)) => Ok(Answer::Accepted(ac)),
        Ok(UpstreamAnswer::Refused { pdu_type, bytes }) if pdu_type == pdu::A_ASSOCIATE_RJ => {
            Ok(Answer::Rejected(bytes))
        }
        Ok(UpstreamAnswer::Refused { bytes, .. }) => Ok(Answer::Aborted(bytes)),
        Err(e) => Err(LinkError::Protocol(e.to_string())),
    }
}

/// An accepted presentation context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// The contexts of `rq` that `ac` accepted, by presentation context ID.
pub fn accepted_contexts(rq: &AssociationRQ, ac: &AssociationAC) -> HashMap<u8, Context> {
    ac.presentation_contexts
        .iter()
        .filter(|c| c.reason == PresentationContextResultReason::Acceptance)
        .filter_map(|c| {
            let proposed = rq.presentation_contexts.iter().find(|p| p.id == c.id)?;
            Some((
                c.id,
                Context {
                    abstract_syntax: proposed.abstract_syntax.trim_end_matches('\0').to_string(),
                    transfer_syntax: c.transfer_syntax.trim_end_matches('\0').to_string(),
                },
            ))
        })
        .collect()
}

/// The Maximum Length a peer announced; 0 ("unlimited") and absurd values are clamped.
pub fn max_length(items: &[UserVariableItem]) -> u32 {
    crate::ul::association::peer_max_length(items, MAX_PDU_LENGTH)
}

/// One PDV item, owned.
#[derive(Debug)]
pub struct OwnedPdv {
    pub context: u8,
    pub is_command: bool,
    pub is_last: bool,
    pub data: Vec<u8>,
}

/// An established association we requested.
pub struct Link<S> {
    stream: S,
    pub contexts: HashMap<u8, Context>,
    peer_max: u32,
    timeout: Duration,
    pending: VecDeque<OwnedPdv>,
    next_message_id: u16,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// The association `rq` / `ac` over `stream`; every later wait is bounded by `timeout`.
    pub fn new(stream: S, rq: &AssociationRQ, ac: &AssociationAC, timeout: Duration) -> Link<S> {
        Link {
            stream,
            contexts: accepted_contexts(rq, ac),
            peer_max: max_length(&ac.user_variables),
            timeout,
            pending: VecDeque::new(),
            next_message_id: 1,
        }
    }

    /// The accepted context for this abstract syntax (and transfer syntax, when given).
    pub fn context_for(&self, abstract_syntax: &str, transfer_syntax: Option<&str>) -> Option<u8> {
        let mut ids: Vec<u8> = self
            .contexts
            .iter()
            .filter(|(_, c)| {
                c.abstract_syntax == abstract_syntax
                    && transfer_syntax.is_none_or(|ts| c.transfer_syntax == ts)
            })
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids.first().copied()
    }

    /// A fresh message ID for a request.
    pub fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }

    async fn write(&mut self, bytes: &[u8], phase: &'static str) -> Result<(), LinkError> {
        let stream = &mut self.stream;
        match tokio::time::timeout(self.timeout, async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(LinkError::Io(format!("{phase}: {e}"))),
            Err(_) => Err(LinkError::Timeout(phase)),
        }
    }

    /// Send one whole DIMSE message.
    pub async fn send_message(
        &mut self,
        context: u8,
        command: &[u8],
        data: Option<&[u8]>,
    ) -> Result<(), LinkError> {
        let mut writer = PDataWriter::new(self.peer_max);
        writer.push(context, true, true, command);
        if let Some(data) = data {
            writer.push(context, false, true, data);
        }
        self.write(&writer.into_bytes(), "sending a message").await
    }

    /// Send one data set fragment (split to the peer's maximum PDU length).
    pub async fn send_data(
        &mut self,
        context: u8,
        data: &[u8],
        is_last: bool,
    ) -> Result<(), LinkError> {
        let mut writer = PDataWriter::new(self.peer_max);
        writer.push(context, false, is_last, data);
        self.write(&writer.into_bytes(), "sending a data set").await
    }

    /// The next PDV, reading PDUs as needed.
    pub async fn next_pdv(&mut self, phase: &'static str) -> Result<OwnedPdv, LinkError> {
        // Bounded: every PDU holds at least one PDV, or the read fails.
        for _ in 0..1_000_000 {
            if let Some(pdv) = self.pending.pop_front() {
                return Ok(pdv);
            }
            let mut buf = Vec::new();
            let read = tokio::time::timeout(
                self.timeout,
                pdu::read_pdu(&mut self.stream, &mut buf, MAX_PDU_LENGTH),
            )
            .await
            .map_err(|_| LinkError::Timeout(phase))?;
            let pdu_type = match read {
                Ok(t) => t,
                Err(PduError::Closed) => return Err(LinkError::Closed(phase)),
                Err(PduError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(LinkError::Closed(phase));
                }
                Err(e) => return Err(LinkError::Protocol(format!("{phase}: {e}"))),
            };
            match pdu_type {
                pdu::P_DATA_TF => {
                    pdata::check_pdv_items(&buf).map_err(LinkError::Protocol)?;
                    self.pending
                        .extend(pdata::pdv_items(&buf).map(|p| OwnedPdv {
                            context: p.presentation_context_id,
                            is_command: p.is_command,
                            is_last: p.is_last,
                            data: p.data.to_vec(),
                        }));
                }
                pdu::A_ABORT => {
                    return Err(LinkError::Aborted {
                        origin: buf.get(8).copied().unwrap_or(0),
                        reason: buf.get(9).copied().unwrap_or(0),
                    });
                }
                other => {
                    return Err(LinkError::Protocol(format!(
                        "unexpected PDU type {other:#04x} while {phase}"
                    )));
                }
            }
        }
        Err(LinkError::Protocol(format!("no PDV while {phase}")))
    }

    /// Read one whole command set; returns its presentation context ID and the command.
    pub async fn read_command(&mut self, phase: &'static str) -> Result<(u8, Command), LinkError> {
        let mut bytes = Vec::new();
        loop {
            let pdv = self.next_pdv(phase).await?;
            if !pdv.is_command {
                return Err(LinkError::Protocol(format!(
                    "a data set fragment arrived where a command set was expected while {phase}"
                )));
            }
            if bytes.len() + pdv.data.len() > dimse::MAX_COMMAND_LENGTH {
                return Err(LinkError::Protocol("command set too large".into()));
            }
            bytes.extend_from_slice(&pdv.data);
            if pdv.is_last {
                let command = dimse::decode_command(&bytes)
                    .map_err(|e| LinkError::Protocol(e.to_string()))?;
                return Ok((pdv.context, command));
            }
        }
    }

    /// The next data set fragment on `context`.
    pub async fn read_data_pdv(
        &mut self,
        context: u8,
        phase: &'static str,
    ) -> Result<OwnedPdv, LinkError> {
        let pdv = self.next_pdv(phase).await?;
        if pdv.is_command || pdv.context != context {
            return Err(LinkError::Protocol(format!(
                "expected a data set fragment on context {context} while {phase}"
            )));
        }
        Ok(pdv)
    }

    /// A whole data set on `context`, at most `limit` bytes.
    pub async fn read_data(
        &mut self,
        context: u8,
        limit: usize,
        phase: &'static str,
    ) -> Result<Vec<u8>, LinkError> {
        let mut data = Vec::new();
        loop {
            let pdv = self.read_data_pdv(context, phase).await?;
            if data.len() + pdv.data.len() > limit {
                return Err(LinkError::Protocol(format!(
                    "a data set over {limit} bytes while {phase}"
                )));
            }
            data.extend_from_slice(&pdv.data);
            if pdv.is_last {
                return Ok(data);
            }
        }
    }

    /// A-RELEASE-RQ, then wait (bounded) for the A-RELEASE-RP; best effort.
    pub async fn release(mut self) {
        let rq = [pdu::A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0];
        if self.write(&rq, "sending the A-RELEASE-RQ").await.is_err() {
            return;
        }
        let bound = self.timeout.min(Duration::from_secs(10));
        let stream = &mut self.stream;
        let _ = tokio::time::timeout(bound, async {
            let mut buf = Vec::new();
            // Late P-DATA may precede the A-RELEASE-RP; a few hundred PDUs at most.
            for _ in 0..1024 {
                match pdu::read_pdu(stream, &mut buf, MAX_PDU_LENGTH).await {
                    Ok(pdu::A_RELEASE_RP) | Err(_) => break,
                    Ok(pdu::A_ABORT) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.shutdown()).await;
    }

    /// A-ABORT (service user), best effort.
    pub async fn abort(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self
                .stream
                .write_all(&[pdu::A_ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0])
                .await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextResult;

    #[test]
    fn requests_number_contexts_and_propose_the_scp_role() {
        let rq = request(
            "VIEWER",
            "ARCHIVE",
            &[
                Proposal {
                    abstract_syntax: "1.2.840.10008.5.1.4.1.2.2.3".into(),
                    transfer_syntaxes: vec![EXPLICIT_LE.into()],
                },
                Proposal {
                    abstract_syntax: "1.2.840.10008.5.1.4.1.1.2".into(),
                    transfer_syntaxes: vec![EXPLICIT_LE.into(), IMPLICIT_LE.into()],
                },
            ],
            &["1.2.840.10008.5.1.4.1.1.2".to_string()],
            None,
        );
        let ids: Vec<u8> = rq.presentation_contexts.iter().map(|p| p.id).collect();
        assert_eq!(ids, [1, 3]);
        assert!(rq.user_variables.iter().any(|v| matches!(
            v,
            UserVariableItem::ScuScpRoleSelectionSubItem(c, RequestorRoles { scu: false, scp: true })
                if c == "1.2.840.10008.5.1.4.1.1.2"
        )));
        let bytes = encode(&Pdu::AssociationRQ(rq.clone())).expect("encode");
        let back = crate::ul::association::parse_request(&bytes).expect("parse");
        assert_eq!(back.presentation_contexts.len(), 2);

        let ac = AssociationAC {
            protocol_version: 1,
            calling_ae_title: "VIEWER".into(),
            called_ae_title: "ARCHIVE".into(),
            application_context_name: DICOM_APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![
                PresentationContextResult {
                    id: 1,
                    reason: PresentationContextResultReason::Acceptance,
                    transfer_syntax: format!("{EXPLICIT_LE}\0"),
                },
                PresentationContextResult {
                    id: 3,
                    reason: PresentationContextResultReason::AbstractSyntaxNotSupported,
                    transfer_syntax: EXPLICIT_LE.into(),
                },
            ],
            user_variables: vec![UserVariableItem::MaxLength(0)],
        };
        let contexts = accepted_contexts(&rq, &ac);
        assert_eq!(contexts.len(), 1);
        assert_eq!(contexts[&1].transfer_syntax, EXPLICIT_LE);
        assert_eq!(max_length(&ac.user_variables), MAX_PDU_LENGTH);
        assert_eq!(max_length(&[UserVariableItem::MaxLength(16384)]), 16384);
    }
}
