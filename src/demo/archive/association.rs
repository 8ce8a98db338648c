//! Upper layer for the demo archive: bounded PDU framing, association negotiation, DIMSE message assembly.
//!
//! PDUs are framed here (6-byte header, length checked before allocating) and each complete PDU is
//! handed to dicom-ul's `read_pdu`; A-RELEASE and A-ABORT are recognised by their type byte alone.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationAC, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderASCEReason, AssociationRJServiceUserReason, AssociationRJSource,
    AssociationRQ, PDataValue, PDataValueType, PresentationContextResult,
    PresentationContextResultReason, RequestorRoles, UserVariableItem,
};
use dicom_ul::{Pdu, read_pdu, write_pdu};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::DemoArchiveError;
use super::dimse::{self, Command};

/// Largest PDU (variable field) the demo acceptor receives, announced as its Maximum Length
/// (not the requestors' `ul::MAX_PDU_LENGTH`).
pub(crate) const DEMO_RECEIVE_MAX_PDU: u32 = 64 * 1024;
/// Largest PDU we send when the peer announces 0 (no limit).
const UNLIMITED_PEER_PDU: u32 = 1024 * 1024;
/// Largest command set we assemble (real ones are a few hundred bytes).
const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Largest data set we keep; larger ones are consumed and refused.
pub(crate) const MAX_DATA_SET_BYTES: usize = 64 * 1024 * 1024;
/// ARTIM: time allowed between TCP accept and the A-ASSOCIATE-RQ.
pub(crate) const ASSOCIATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed without any PDU from the peer once associated.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed to write one PDU.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
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
    fn pdu(self) -> AssociationRJ {
        let source = match self {
            Rejection::ProtocolVersion => AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
            Rejection::ApplicationContext => AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
            ),
            Rejection::CalledAe => AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            ),
        };
        AssociationRJ {
            result: AssociationRJResult::Permanent,
            source,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::ProtocolVersion => "rejected: protocol version",
            Rejection::ApplicationContext => "rejected: application context",
            Rejection::CalledAe => "rejected: called AE title",
        }
    }
}

/// One complete DIMSE message: command set and, when announced, its data set.
#[derive(Debug)]
pub(crate) struct Message {
    pub context_id: u8,
    pub command: Command,
    pub data: Option<Vec<u8>>,
    /// The data set exceeded `MAX_DATA_SET_BYTES`: it was consumed and dropped.
    pub data_too_large: bool,
}

/// What the peer did next.
#[derive(Debug)]
pub(crate) enum Event {
    Message(Message),
    ReleaseRequested,
    Aborted,
    Closed,
}

/// A PDU as read by `read_frame`: control PDUs are not parsed beyond their type.
enum Frame {
    Pdu(Pdu),
    ReleaseRq,
    Abort,
    Closed,
}

/// An established association, from the acceptor's side.
pub(crate) struct Association {
    stream: BufReader<TcpStream>,
    pub calling_ae: String,
    pub called_ae: String,
    contexts: Vec<Context>,
    /// SOP classes for which the requestor accepted the SCP role (C-GET sub-operations).
    scp_role: HashSet<String>,
    peer_max_pdu: u32,
    pending: VecDeque<PDataValue>,
}

/// Result of waiting for an A-ASSOCIATE-RQ.
pub(crate) enum Establish {
    Accepted(Association),
    Rejected {
        calling_ae: String,
        called_ae: String,
        reason: Rejection,
    },
    /// The peer aborted or closed before asking for an association.
    Gone,
}

impl Association {
    /// Wait (bounded by the ARTIM timeout) for an A-ASSOCIATE-RQ and answer it.
    /// `ae_title` empty accepts any called AE title.
    pub async fn establish(
        stream: TcpStream,
        ae_title: &str,
    ) -> Result<Establish, DemoArchiveError> {
        let mut stream = BufReader::new(stream);
        let rq = match read_frame(&mut stream, ASSOCIATE_TIMEOUT, "association request").await {
            Ok(Frame::Pdu(Pdu::AssociationRQ(rq))) => rq,
            Ok(Frame::Abort | Frame::Closed) => return Ok(Establish::Gone),
            Ok(Frame::Pdu(_) | Frame::ReleaseRq) => {
                send_abort(&mut stream, AbortRQServiceProviderReason::UnexpectedPdu).await;
                return Err(DemoArchiveError::Protocol(
                    "expected an A-ASSOCIATE-RQ".into(),
                ));
            }
            // ARTIM expiry or a broken connection: just close (PS3.8 9.1.5).
            Err(e @ (DemoArchiveError::Timeout { .. } | DemoArchiveError::Io(_))) => return Err(e),
            Err(e) => {
                send_abort(
                    &mut stream,
                    AbortRQServiceProviderReason::InvalidPduParameter,
                )
                .await;
                return Err(e);
            }
        };
        match negotiate(&rq, ae_title) {
            Ok((ac, contexts, scp_role, peer_max_pdu)) => {
                write_frame(&mut stream, &Pdu::AssociationAC(ac)).await?;
                Ok(Establish::Accepted(Association {
                    stream,
                    calling_ae: rq.calling_ae_title,
                    called_ae: rq.called_ae_title,
                    contexts,
                    scp_role,
                    peer_max_pdu,
                    pending: VecDeque::new(),
                }))
            }
            Err(reason) => {
                write_frame(&mut stream, &Pdu::AssociationRJ(reason.pdu())).await?;
                let _ = stream.get_mut().shutdown().await;
                Ok(Establish::Rejected {
                    calling_ae: rq.calling_ae_title,
                    called_ae: rq.called_ae_title,
                    reason,
                })
            }
        }
    }

    pub fn context(&self, id: u8) -> Option<&Context> {
        self.contexts.iter().find(|c| c.id == id)
    }

    /// Accepted storage contexts for `sop_class` on which the peer may act as SCP.
    pub fn storage_contexts<'a>(
        &'a self,
        sop_class: &'a str,
    ) -> impl Iterator<Item = &'a Context> + Clone {
        self.contexts.iter().filter(move |c| {
            c.service == Service::Storage
                && c.abstract_syntax == sop_class
                && self.scp_role.contains(sop_class)
        })
    }

    /// Read the next DIMSE message, or the release / abort / close that ends the association.
    pub async fn next_event(&mut self) -> Result<Event, DemoArchiveError> {
        let first = match self.next_pdv().await? {
            Ok(pdv) => pdv,
            Err(event) => return Ok(event),
        };
        let context_id = first.presentation_context_id;
        if self.context(context_id).is_none() {
            return Err(DemoArchiveError::Protocol(format!(
                "message on presentation context {context_id}, which was not accepted"
            )));
        }
        let mut command_bytes = Vec::new();
        let mut pdv = first;
        loop {
            if pdv.value_type != PDataValueType::Command
                || pdv.presentation_context_id != context_id
            {
                return Err(DemoArchiveError::Protocol(
                    "expected a command fragment on the same presentation context".into(),
                ));
            }
            if command_bytes.len() + pdv.data.len() > MAX_COMMAND_BYTES {
                return Err(DemoArchiveError::Protocol("command set too large".into()));
            }
            command_bytes.extend_from_slice(&pdv.data);
            if pdv.is_last {
                break;
            }
            pdv = match self.next_pdv().await? {
                Ok(pdv) => pdv,
                Err(event) => return Ok(event),
            };
        }
        let command = Command::decode(&command_bytes)?;
        if !command.has_data_set() {
            return Ok(Event::Message(Message {
                context_id,
                command,
                data: None,
                data_too_large: false,
            }));
        }
        let mut data = Vec::new();
        let mut data_too_large = false;
        loop {
            let pdv = match self.next_pdv().await? {
                Ok(pdv) => pdv,
                Err(event) => return Ok(event),
            };
            if pdv.value_type != PDataValueType::Data || pdv.presentation_context_id != context_id {
                return Err(DemoArchiveError::Protocol(
                    "expected a data set fragment on the same presentation context".into(),
                ));
            }
            if data.len() + pdv.data.len() > MAX_DATA_SET_BYTES {
                data_too_large = true;
                data = Vec::new();
            }
            if !data_too_large {
                data.extend_from_slice(&pdv.data);
            }
            if pdv.is_last {
                break;
            }
        }
        Ok(Event::Message(Message {
            context_id,
            command,
            data: Some(data),
            data_too_large,
        }))
    }

    /// Next PDV, reading a PDU when none is buffered; `Err(event)` when the peer stopped talking DIMSE.
    async fn next_pdv(&mut self) -> Result<Result<PDataValue, Event>, DemoArchiveError> {
        loop {
            if let Some(pdv) = self.pending.pop_front() {
                return Ok(Ok(pdv));
            }
            match read_frame(&mut self.stream, IDLE_TIMEOUT, "next PDU").await? {
                Frame::Pdu(Pdu::PData { data }) => self.pending.extend(data),
                Frame::ReleaseRq => return Ok(Err(Event::ReleaseRequested)),
                Frame::Abort => return Ok(Err(Event::Aborted)),
                Frame::Closed => return Ok(Err(Event::Closed)),
                Frame::Pdu(_) => {
                    return Err(DemoArchiveError::Protocol(
                        "unexpected PDU while associated".into(),
                    ));
                }
            }
        }
    }

    /// Send a command set and optional data set, fragmented to the peer's maximum PDU length.
    pub async fn send_message(
        &mut self,
        context_id: u8,
        command: Vec<u8>,
        data: Option<&[u8]>,
    ) -> Result<(), DemoArchiveError> {
        self.send_fragments(context_id, PDataValueType::Command, &command)
            .await?;
        if let Some(data) = data {
            self.send_fragments(context_id, PDataValueType::Data, data)
                .await?;
        }
        Ok(())
    }

    async fn send_fragments(
        &mut self,
        context_id: u8,
        value_type: PDataValueType,
        bytes: &[u8],
    ) -> Result<(), DemoArchiveError> {
        let max = match self.peer_max_pdu {
            0 => UNLIMITED_PEER_PDU,
            n => n.min(UNLIMITED_PEER_PDU),
        };
        // A PDV item costs 4 (length) + 1 (context id) + 1 (control header) bytes of the PDU.
        let chunk = (max as usize).saturating_sub(6).max(1);
        let mut chunks = bytes.chunks(chunk).peekable();
        if chunks.peek().is_none() {
            return self
                .send_pdv(context_id, value_type.clone(), true, &[])
                .await;
        }
        while let Some(part) = chunks.next() {
            let is_last = chunks.peek().is_none();
            self.send_pdv(context_id, value_type.clone(), is_last, part)
                .await?;
        }
        Ok(())
    }

    async fn send_pdv(
        &mut self,
        context_id: u8,
        value_type: PDataValueType,
        is_last: bool,
        data: &[u8],
    ) -> Result<(), DemoArchiveError> {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type,
                is_last,
                data: data.to_vec(),
            }],
        };
        write_frame(&mut self.stream, &pdu).await
    }

    /// Answer an A-RELEASE-RQ and close.
    pub async fn release(&mut self) -> Result<(), DemoArchiveError> {
        write_frame(&mut self.stream, &Pdu::ReleaseRP).await?;
        let _ = self.stream.get_mut().shutdown().await;
        Ok(())
    }

    /// Send an A-ABORT (best effort) and close.
    pub async fn abort(mut self) {
        send_abort(
            &mut self.stream,
            AbortRQServiceProviderReason::ReasonNotSpecified,
        )
        .await;
    }
}

type Negotiated = (AssociationAC, Vec<Context>, HashSet<String>, u32);

/// Decide on an A-ASSOCIATE-RQ: the A-ASSOCIATE-AC plus what was agreed, or why it is rejected.
fn negotiate(rq: &AssociationRQ, ae_title: &str) -> Result<Negotiated, Rejection> {
    if rq.protocol_version & 1 == 0 {
        return Err(Rejection::ProtocolVersion);
    }
    if trim_uid(&rq.application_context_name) != APPLICATION_CONTEXT {
        return Err(Rejection::ApplicationContext);
    }
    if !ae_title.is_empty() && rq.called_ae_title.trim() != ae_title.trim() {
        return Err(Rejection::CalledAe);
    }

    let mut contexts = Vec::new();
    let mut results = Vec::new();
    for pc in &rq.presentation_contexts {
        let abstract_syntax = trim_uid(&pc.abstract_syntax).to_string();
        let mut proposed = pc.transfer_syntaxes.iter().map(|ts| trim_uid(ts));
        let (reason, transfer_syntax) = match Service::of(&abstract_syntax) {
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
                    Some(ts) => {
                        contexts.push(Context {
                            id: pc.id,
                            abstract_syntax: abstract_syntax.clone(),
                            transfer_syntax: ts.to_string(),
                            service,
                        });
                        (PresentationContextResultReason::Acceptance, Some(ts))
                    }
                    None => (
                        PresentationContextResultReason::TransferSyntaxesNotSupported,
                        None,
                    ),
                }
            }
        };
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            transfer_syntax: transfer_syntax
                .unwrap_or(uids::IMPLICIT_VR_LITTLE_ENDIAN)
                .to_string(),
        });
    }

    let peer_max_pdu = crate::ul::association::announced_max_length(&rq.user_variables)
        .unwrap_or(dicom_ul::pdu::DEFAULT_MAX_PDU);
    let mut user_variables = vec![
        UserVariableItem::MaxLength(DEMO_RECEIVE_MAX_PDU),
        UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
        UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
    ];
    let mut scp_role = HashSet::new();
    // Role selection (PS3.7 D.3.3.4): grant what is asked for storage SOP classes, so a
    // C-GET requestor can take the SCP role for the C-STORE sub-operations.
    for item in &rq.user_variables {
        let UserVariableItem::ScuScpRoleSelectionSubItem(sop_class, roles) = item else {
            continue;
        };
        let sop_class = trim_uid(sop_class);
        if is_storage_sop_class(sop_class) {
            if roles.scp {
                scp_role.insert(sop_class.to_string());
            }
            user_variables.push(UserVariableItem::ScuScpRoleSelectionSubItem(
                sop_class.to_string(),
                RequestorRoles {
                    scu: roles.scu,
                    scp: roles.scp,
                },
            ));
        }
    }

    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: APPLICATION_CONTEXT.to_string(),
        presentation_contexts: results,
        user_variables,
    };
    Ok((ac, contexts, scp_role, peer_max_pdu))
}

fn trim_uid(uid: &str) -> &str {
    dimse::trim_value(uid)
}

/// Read one PDU within `timeout`, refusing lengths above `DEMO_RECEIVE_MAX_PDU` before allocating.
/// On error the caller aborts the association.
async fn read_frame(
    stream: &mut BufReader<TcpStream>,
    timeout: Duration,
    phase: &'static str,
) -> Result<Frame, DemoArchiveError> {
    let read = async {
        let mut header = [0u8; 6];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Frame::Closed),
            Err(e) => return Err(DemoArchiveError::Io(e)),
        }
        let pdu_type = header[0];
        let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        if length > DEMO_RECEIVE_MAX_PDU {
            return Err(DemoArchiveError::PduTooLarge {
                length,
                max: DEMO_RECEIVE_MAX_PDU,
            });
        }
        let mut pdu = vec![0u8; 6 + length as usize];
        pdu[..6].copy_from_slice(&header);
        stream.read_exact(&mut pdu[6..]).await?;
        match pdu_type {
            0x05 => Ok(Frame::ReleaseRq),
            0x07 => Ok(Frame::Abort),
            _ => match read_pdu(&pdu[..], DEMO_RECEIVE_MAX_PDU, true)? {
                Some(pdu) => Ok(Frame::Pdu(pdu)),
                None => Err(DemoArchiveError::Protocol("truncated PDU".into())),
            },
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| DemoArchiveError::Timeout { phase })?
}

async fn write_frame(stream: &mut BufReader<TcpStream>, pdu: &Pdu) -> Result<(), DemoArchiveError> {
    let mut bytes = Vec::new();
    write_pdu(&mut bytes, pdu)?;
    tokio::time::timeout(WRITE_TIMEOUT, stream.get_mut().write_all(&bytes))
        .await
        .map_err(|_| DemoArchiveError::Timeout { phase: "write PDU" })??;
    Ok(())
}

async fn send_abort(stream: &mut BufReader<TcpStream>, reason: AbortRQServiceProviderReason) {
    let pdu = Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(reason),
    };
    let _ = write_frame(stream, &pdu).await;
    let _ = stream.get_mut().shutdown().await;
}
