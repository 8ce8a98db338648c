//! The associations `connect` opens itself in move-as-get: the C-GET association to the gateway
//! and the one to the local storage SCP. A thin wrapper over the one requestor
//! (`ul::requestor`): arbitrary presentation contexts and SCP role selection, whole DIMSE commands,
//! data sets streamed PDV by PDV, every wait bounded, failures in connect's words ([`LinkError`]).

use std::collections::HashMap;
use std::time::Duration;

use dicom_ul::pdu::{AssociationAC, AssociationRQ, Pdu, UserIdentity, write_pdu};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::dimse::{self, Command};
use crate::ul::association::Context;
use crate::ul::pdu::PduError;
use crate::ul::requestor::{self, Requestor, RequestorError};

pub use crate::ul::MAX_PDU_LENGTH;
pub use crate::ul::requestor::{Answer, OwnedPdv, Proposal};
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

/// After the association is established.
impl From<RequestorError> for LinkError {
    fn from(e: RequestorError) -> LinkError {
        if let Some(phase) = e.closed_phase() {
            return LinkError::Closed(phase);
        }
        match e {
            RequestorError::Timeout { phase, .. } => LinkError::Timeout(phase),
            write @ RequestorError::Write { .. } => LinkError::Io(write.to_string()),
            RequestorError::Aborted { origin, reason } => LinkError::Aborted { origin, reason },
            other => LinkError::Protocol(other.to_string()),
        }
    }
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
    requestor::request(
        calling_ae,
        called_ae,
        IMPLEMENTATION_VERSION_NAME,
        proposals,
        scp_roles,
        identity,
    )
}

/// Encode a PDU.
pub fn encode(pdu: &Pdu) -> Result<Vec<u8>, LinkError> {
    let mut out = Vec::new();
    write_pdu(&mut out, pdu).map_err(|e| LinkError::Protocol(format!("cannot encode: {e}")))?;
    Ok(out)
}

/// Send an encoded A-ASSOCIATE-RQ and read the answer, both within `timeout`.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
    timeout: Duration,
) -> Result<Answer, LinkError> {
    const PHASE: &str = requestor::WAITING_FOR_ANSWER;
    let answer = tokio::time::timeout(
        timeout,
        requestor::exchange(stream, request, MAX_ANSWER_LENGTH, timeout),
    )
    .await
    .map_err(|_| LinkError::Timeout(PHASE))?;
    answer.map_err(|e| match e {
        RequestorError::Timeout { .. } => LinkError::Timeout(PHASE),
        RequestorError::Write { error, .. } => LinkError::Io(error.to_string()),
        RequestorError::Read {
            error: PduError::Io(error),
            ..
        } if error.kind() == std::io::ErrorKind::UnexpectedEof => LinkError::Closed(PHASE),
        RequestorError::Read {
            error: PduError::Io(error),
            ..
        } => LinkError::Io(error.to_string()),
        RequestorError::Read { error, .. } => LinkError::Io(error.to_string()),
        other => LinkError::Protocol(other.to_string()),
    })
}

/// An established association we requested.
pub struct Link<S>(Requestor<S>);

impl<S: AsyncRead + AsyncWrite> Link<S> {
    /// The association `rq` / `ac` over `stream`; every later wait is bounded by `timeout`.
    pub fn new(stream: S, rq: &AssociationRQ, ac: &AssociationAC, timeout: Duration) -> Link<S> {
        Link(Requestor::new(stream, rq, ac, timeout))
    }

    /// The accepted presentation contexts, by ID.
    pub fn contexts(&self) -> &HashMap<u8, Context> {
        &self.0.contexts
    }

    /// The accepted context for this abstract syntax (and transfer syntax, when given).
    pub fn context_for(&self, abstract_syntax: &str, transfer_syntax: Option<&str>) -> Option<u8> {
        self.0.context_for(abstract_syntax, transfer_syntax)
    }

    /// A fresh message ID for a request.
    pub fn message_id(&mut self) -> u16 {
        self.0.message_id()
    }

    /// Send one whole DIMSE message.
    pub async fn send_message(
        &mut self,
        context: u8,
        command: &[u8],
        data: Option<&[u8]>,
    ) -> Result<(), LinkError> {
        let phase = "sending a message";
        Ok(self.0.send_message(context, command, data, phase).await?)
    }

    /// Send one data set fragment (split to the peer's maximum PDU length).
    pub async fn send_data(
        &mut self,
        context: u8,
        data: &[u8],
        is_last: bool,
    ) -> Result<(), LinkError> {
        let phase = "sending a data set";
        Ok(self.0.send_data(context, data, is_last, phase).await?)
    }

    /// The next PDV, reading PDUs as needed.
    pub async fn next_pdv(&mut self, phase: &'static str) -> Result<OwnedPdv, LinkError> {
        Ok(self.0.next_pdv(phase).await?)
    }

    /// Read one whole command set; returns its presentation context ID and the command.
    pub async fn read_command(&mut self, phase: &'static str) -> Result<(u8, Command), LinkError> {
        let (context, bytes) = self
            .0
            .read_command_set(dimse::MAX_COMMAND_LENGTH, phase)
            .await?;
        let command =
            dimse::decode_command(&bytes).map_err(|e| LinkError::Protocol(e.to_string()))?;
        Ok((context, command))
    }

    /// The next data set fragment on `context`.
    pub async fn read_data_pdv(
        &mut self,
        context: u8,
        phase: &'static str,
    ) -> Result<OwnedPdv, LinkError> {
        Ok(self.0.read_data_pdv(context, phase).await?)
    }

    /// A whole data set on `context`, at most `limit` bytes.
    pub async fn read_data(
        &mut self,
        context: u8,
        limit: usize,
        phase: &'static str,
    ) -> Result<Vec<u8>, LinkError> {
        Ok(self.0.read_data(context, limit, phase).await?)
    }

    /// A-RELEASE-RQ, then wait (bounded) for the A-RELEASE-RP; best effort.
    pub async fn release(self) {
        self.0.release_quietly().await
    }

    /// A-ABORT (service user), best effort.
    pub async fn abort(self) {
        self.0.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ul::association::{DICOM_APPLICATION_CONTEXT, accepted_contexts, peer_max_length};
    use dicom_ul::pdu::{
        PresentationContextResult, PresentationContextResultReason, RequestorRoles,
        UserVariableItem,
    };

    fn max_length(items: &[UserVariableItem]) -> u32 {
        peer_max_length(items, MAX_PDU_LENGTH)
    }

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
