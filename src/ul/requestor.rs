//! The one DICOM association requestor (PS3.8 requestor side) over any byte stream: the
//! A-ASSOCIATE exchange, whole PDUs read with `ul::pdu::PduReader`, PDVs reassembled into whole
//! command and data sets, messages sent within the acceptor's Maximum Length, message IDs,
//! A-RELEASE and A-ABORT. Every network wait is bounded and named after its phase. DIMSE is above
//! it: command sets come out as bytes, for `dimse::decode_command`.
//!
//! It speaks PDUs itself rather than using dicom-ul's client association: a diagnostic tool has to
//! report A-ASSOCIATE-RJ and A-ABORT codes that dicom-ul's strict reader refuses, and `connect`
//! relays the acceptor's answer as it came. Its callers (`tools::client::Association`,
//! `connect::link::Link`) turn a [`RequestorError`] into the words they show.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, PresentationContextProposed, RequestorRoles, UserIdentity,
    UserVariableItem,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::association::{
    self, AssociationError, Context, DICOM_APPLICATION_CONTEXT, UpstreamAnswer, parse_answer,
};
use super::pdu::{self, PduError, PduReader, read_pdu};
use super::{IMPLEMENTATION_CLASS_UID, MAX_PDU_LENGTH};
use crate::ul::pdata::{PDataWriter, PdvSpans};

/// The phase of sending the A-ASSOCIATE-RQ.
pub const SENDING_REQUEST: &str = "sending the A-ASSOCIATE-RQ";
/// The phase of waiting for the acceptor's answer (A-ASSOCIATE-AC, -RJ or A-ABORT).
pub const WAITING_FOR_ANSWER: &str = "waiting for the A-ASSOCIATE-AC";
/// The phase of sending the A-RELEASE-RQ.
pub const SENDING_RELEASE: &str = "sending the A-RELEASE-RQ";
/// The phase of waiting for the A-RELEASE-RP.
pub const WAITING_FOR_RELEASE: &str = "waiting for the A-RELEASE-RP";
/// How long a closing step (A-ABORT, shutdown) may take.
const CLOSE_BOUND: Duration = Duration::from_secs(2);
/// The longest a best-effort release waits for the A-RELEASE-RP.
const RELEASE_BOUND: Duration = Duration::from_secs(10);
/// How many PDUs (late P-DATA) a best-effort release reads before giving up on the A-RELEASE-RP.
const RELEASE_PDUS: usize = 1024;
/// How many empty fragments (PDVs with no data that are not the last of their message) may come one
/// after another. Non-empty ones are bounded by the reader's byte limit where it holds the message
/// (a data set streamed on, as `connect` streams a C-STORE sub-operation, has each PDU's wait only);
/// without this bound a peer could keep a reader looping forever on fragments that carry nothing.
pub const MAX_EMPTY_FRAGMENTS: usize = 64;

/// What went wrong on an association we requested. Each variant keeps what its caller needs to
/// say it in its own words (the tools and `connect` word some of them differently).
#[derive(Debug, thiserror::Error)]
pub enum RequestorError {
    #[error("{phase} timed out after {after:?}")]
    Timeout {
        phase: &'static str,
        after: Duration,
    },
    #[error("{phase}: {error}")]
    Write {
        phase: &'static str,
        error: std::io::Error,
    },
    /// Reading a PDU failed: closed, framing, or not DICOM at all.
    #[error("{phase}: {error}")]
    Read {
        phase: &'static str,
        error: PduError,
    },
    /// The acceptor's answer to the A-ASSOCIATE-RQ could not be read as one.
    #[error("{error}")]
    Answer {
        pdu_type: u8,
        error: AssociationError,
    },
    #[error("the peer aborted the association (A-ABORT {origin}/{reason})")]
    Aborted { origin: u8, reason: u8 },
    #[error("unexpected PDU type {pdu_type:#04x} while {phase}")]
    UnexpectedPdu { pdu_type: u8, phase: &'static str },
    #[error("expected an A-RELEASE-RP, got PDU type {0:#04x}")]
    NotAReleaseRp(u8),
    /// A P-DATA-TF whose PDV items do not add up.
    #[error("{0}")]
    Pdv(String),
    #[error("no PDV while {0}")]
    NoPdv(&'static str),
    #[error("a data set fragment arrived where a command set was expected while {0}")]
    DataForCommand(&'static str),
    #[error("command set too large")]
    CommandTooLarge,
    #[error("expected a data set fragment on context {context} while {phase}")]
    NotOnContext { context: u8, phase: &'static str },
    #[error("a data set over {limit} bytes while {phase}")]
    DataTooLarge { limit: usize, phase: &'static str },
    #[error("over {MAX_EMPTY_FRAGMENTS} empty fragments in a row while {0}")]
    EmptyFragments(&'static str),
}

impl RequestorError {
    /// The peer closed the connection (cleanly, or in the middle of a PDU) while reading.
    pub fn closed_phase(&self) -> Option<&'static str> {
        match self {
            RequestorError::Read {
                phase,
                error: PduError::Closed,
            } => Some(phase),
            RequestorError::Read {
                phase,
                error: PduError::Io(e),
            } if e.kind() == std::io::ErrorKind::UnexpectedEof => Some(phase),
            _ => None,
        }
    }
}

/// One presentation context to propose.
#[derive(Debug, Clone)]
pub struct Proposal {
    pub abstract_syntax: String,
    pub transfer_syntaxes: Vec<String>,
}

/// An A-ASSOCIATE-RQ with `proposals` (context IDs 1, 3, 5, ...), our Maximum Length, the
/// Implementation Class UID and `version_name`, the SCP role proposed for the SOP classes in
/// `scp_roles`, and an optional User Identity.
pub fn request(
    calling_ae: &str,
    called_ae: &str,
    version_name: &str,
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
        UserVariableItem::ImplementationVersionName(version_name.to_string()),
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

/// The answer to an A-ASSOCIATE-RQ.
#[derive(Debug)]
pub enum Answer {
    Accepted(AssociationAC),
    /// A-ASSOCIATE-RJ, as it came.
    Rejected(Vec<u8>),
    /// A-ABORT, as it came.
    Aborted(Vec<u8>),
}

async fn bounded<T>(
    timeout: Duration,
    phase: &'static str,
    fut: impl Future<Output = T>,
) -> Result<T, RequestorError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| RequestorError::Timeout {
            phase,
            after: timeout,
        })
}

async fn write_bounded<W: AsyncWrite + Unpin>(
    stream: &mut W,
    bytes: &[u8],
    timeout: Duration,
    phase: &'static str,
) -> Result<(), RequestorError> {
    bounded(timeout, phase, super::io::write_flush(stream, bytes))
        .await?
        .map_err(|error| RequestorError::Write { phase, error })
}

/// Send an encoded A-ASSOCIATE-RQ and read the answer (at most `max_answer` bytes), each within
/// `timeout`. The answer is read PDU-exact, so that the stream can be handed on unbuffered.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
    max_answer: u32,
    timeout: Duration,
) -> Result<Answer, RequestorError> {
    write_bounded(stream, request, timeout, SENDING_REQUEST).await?;
    let mut buf = Vec::new();
    let pdu_type = bounded(
        timeout,
        WAITING_FOR_ANSWER,
        read_pdu(stream, &mut buf, max_answer),
    )
    .await?
    .map_err(|error| RequestorError::Read {
        phase: WAITING_FOR_ANSWER,
        error,
    })?;
    match parse_answer(&buf) {
        Ok(UpstreamAnswer::Accepted(ac)) => Ok(Answer::Accepted(ac)),
        Ok(UpstreamAnswer::Refused { pdu_type, bytes }) if pdu_type == pdu::A_ASSOCIATE_RJ => {
            Ok(Answer::Rejected(bytes))
        }
        Ok(UpstreamAnswer::Refused { bytes, .. }) => Ok(Answer::Aborted(bytes)),
        Err(error) => Err(RequestorError::Answer { pdu_type, error }),
    }
}

/// Source and reason of an A-ABORT PDU (PS3.8 9.3.8), 0 where missing.
pub fn abort_codes(pdu: &[u8]) -> (u8, u8) {
    (
        pdu.get(8).copied().unwrap_or(0),
        pdu.get(9).copied().unwrap_or(0),
    )
}

fn aborted(pdu: &[u8]) -> RequestorError {
    let (origin, reason) = abort_codes(pdu);
    RequestorError::Aborted { origin, reason }
}

/// The next whole PDU from `reader` within `timeout`: its type and bytes (header included).
async fn next_pdu<'r, R: AsyncRead + Unpin>(
    reader: &'r mut PduReader<R>,
    timeout: Duration,
    phase: &'static str,
) -> Result<(u8, &'r [u8]), RequestorError> {
    let (pdu_type, at) = bounded(timeout, phase, reader.next(MAX_PDU_LENGTH))
        .await?
        .map_err(|error| RequestorError::Read { phase, error })?;
    Ok((pdu_type, reader.get(at)))
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
pub struct Requestor<S> {
    reader: PduReader<ReadHalf<S>>,
    writer: WriteHalf<S>,
    /// The accepted presentation contexts, by ID.
    pub contexts: HashMap<u8, Context>,
    /// The largest PDU body the acceptor takes.
    peer_max: u32,
    timeout: Duration,
    pending: VecDeque<OwnedPdv>,
    /// The PDV items of the P-DATA-TF at hand, checked and read in one pass, kept from PDU to PDU.
    spans: PdvSpans,
    /// Empty fragments handed out one after another (bounded by [`MAX_EMPTY_FRAGMENTS`]).
    empty_fragments: usize,
    next_message_id: u16,
}

impl<S: AsyncRead + AsyncWrite> Requestor<S> {
    /// The association `rq` / `ac` over `stream`; every later wait is bounded by `timeout`.
    pub fn new(stream: S, rq: &AssociationRQ, ac: &AssociationAC, timeout: Duration) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        Requestor {
            reader: PduReader::new(reader),
            writer,
            contexts: association::accepted_contexts(rq, ac),
            peer_max: association::peer_max_length(&ac.user_variables, MAX_PDU_LENGTH),
            timeout,
            pending: VecDeque::new(),
            spans: PdvSpans::default(),
            empty_fragments: 0,
            next_message_id: 1,
        }
    }

    /// The lowest accepted context ID for this abstract syntax (and transfer syntax, when given).
    pub fn context_for(&self, abstract_syntax: &str, transfer_syntax: Option<&str>) -> Option<u8> {
        self.contexts
            .iter()
            .filter(|(_, c)| {
                c.abstract_syntax == abstract_syntax
                    && transfer_syntax.is_none_or(|ts| c.transfer_syntax == ts)
            })
            .map(|(id, _)| *id)
            .min()
    }

    /// A fresh message ID for a request (1, 2, ..., never 0).
    pub fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }

    async fn write(&mut self, bytes: &[u8], phase: &'static str) -> Result<(), RequestorError> {
        write_bounded(&mut self.writer, bytes, self.timeout, phase).await
    }

    /// Send one whole DIMSE message (command set, then the data set if any), split to the
    /// acceptor's Maximum Length.
    pub async fn send_message(
        &mut self,
        context: u8,
        command: &[u8],
        data: Option<&[u8]>,
        phase: &'static str,
    ) -> Result<(), RequestorError> {
        let mut writer = PDataWriter::new(self.peer_max);
        writer.push(context, true, true, command);
        if let Some(data) = data {
            writer.push(context, false, true, data);
        }
        self.write(&writer.into_bytes(), phase).await
    }

    /// Send one data set fragment (split to the acceptor's Maximum Length).
    pub async fn send_data(
        &mut self,
        context: u8,
        data: &[u8],
        is_last: bool,
        phase: &'static str,
    ) -> Result<(), RequestorError> {
        let mut writer = PDataWriter::new(self.peer_max);
        writer.push(context, false, is_last, data);
        self.write(&writer.into_bytes(), phase).await
    }

    /// The next PDV, reading PDUs as needed. More than [`MAX_EMPTY_FRAGMENTS`] empty fragments in
    /// a row are an error: every reader of messages loops on this, and only bytes bound its loop.
    pub async fn next_pdv(&mut self, phase: &'static str) -> Result<OwnedPdv, RequestorError> {
        // Bounded: every P-DATA-TF that passes the check holds at least one PDV.
        for _ in 0..1_000_000 {
            if let Some(pdv) = self.pending.pop_front() {
                if pdv.data.is_empty() && !pdv.is_last {
                    self.empty_fragments += 1;
                    if self.empty_fragments > MAX_EMPTY_FRAGMENTS {
                        return Err(RequestorError::EmptyFragments(phase));
                    }
                } else {
                    self.empty_fragments = 0;
                }
                return Ok(pdv);
            }
            let (pdu_type, bytes) = next_pdu(&mut self.reader, self.timeout, phase).await?;
            match pdu_type {
                pdu::P_DATA_TF => {
                    let checked = self.spans.check(bytes).map_err(RequestorError::Pdv)?;
                    let pdvs = checked.items().map(|p| OwnedPdv {
                        context: p.presentation_context_id,
                        is_command: p.is_command,
                        is_last: p.is_last,
                        data: p.data.to_vec(),
                    });
                    self.pending.extend(pdvs);
                }
                pdu::A_ABORT => return Err(aborted(bytes)),
                other => {
                    return Err(RequestorError::UnexpectedPdu {
                        pdu_type: other,
                        phase,
                    });
                }
            }
        }
        Err(RequestorError::NoPdv(phase))
    }

    /// Read one whole command set, at most `limit` bytes; returns its presentation context ID and
    /// its bytes (decoding it is DIMSE's, `dimse::decode_command`).
    pub async fn read_command_set(
        &mut self,
        limit: usize,
        phase: &'static str,
    ) -> Result<(u8, Vec<u8>), RequestorError> {
        let mut bytes = Vec::new();
        loop {
            let pdv = self.next_pdv(phase).await?;
            if !pdv.is_command {
                return Err(RequestorError::DataForCommand(phase));
            }
            if bytes.len() + pdv.data.len() > limit {
                return Err(RequestorError::CommandTooLarge);
            }
            bytes.extend_from_slice(&pdv.data);
            if pdv.is_last {
                return Ok((pdv.context, bytes));
            }
        }
    }

    /// The next data set fragment on `context`.
    pub async fn read_data_pdv(
        &mut self,
        context: u8,
        phase: &'static str,
    ) -> Result<OwnedPdv, RequestorError> {
        let pdv = self.next_pdv(phase).await?;
        if pdv.is_command || pdv.context != context {
            return Err(RequestorError::NotOnContext { context, phase });
        }
        Ok(pdv)
    }

    /// A whole data set on `context`, at most `limit` bytes.
    pub async fn read_data(
        &mut self,
        context: u8,
        limit: usize,
        phase: &'static str,
    ) -> Result<Vec<u8>, RequestorError> {
        let mut data = Vec::new();
        loop {
            let pdv = self.read_data_pdv(context, phase).await?;
            if data.len() + pdv.data.len() > limit {
                return Err(RequestorError::DataTooLarge { limit, phase });
            }
            data.extend_from_slice(&pdv.data);
            if pdv.is_last {
                return Ok(data);
            }
        }
    }

    /// A-RELEASE-RQ, then wait for the A-RELEASE-RP (late P-DATA, e.g. after a C-CANCEL, is
    /// skipped; the whole wait within the timeout, so a peer that keeps sending P-DATA cannot hold
    /// it open), then close.
    pub async fn release(mut self) -> Result<(), RequestorError> {
        self.write(&RELEASE_RQ, SENDING_RELEASE).await?;
        let (reader, timeout) = (&mut self.reader, self.timeout);
        let answer = async {
            loop {
                match next_pdu(reader, timeout, WAITING_FOR_RELEASE).await? {
                    (pdu::A_RELEASE_RP, _) => return Ok(()),
                    (pdu::P_DATA_TF, _) => continue,
                    (pdu::A_ABORT, bytes) => return Err(aborted(bytes)),
                    (other, _) => return Err(RequestorError::NotAReleaseRp(other)),
                }
            }
        };
        match tokio::time::timeout(timeout, answer).await {
            Ok(answered) => answered?,
            Err(_) => {
                return Err(RequestorError::Timeout {
                    phase: WAITING_FOR_RELEASE,
                    after: timeout,
                });
            }
        }
        let _ = tokio::time::timeout(CLOSE_BOUND, self.writer.shutdown()).await;
        Ok(())
    }

    /// A-RELEASE-RQ, then wait (at most the timeout and 10 s, a few hundred PDUs) for the
    /// A-RELEASE-RP, then close; best effort, for a requestor with nobody to tell.
    pub async fn release_quietly(mut self) {
        if self.write(&RELEASE_RQ, SENDING_RELEASE).await.is_err() {
            return;
        }
        let reader = &mut self.reader;
        let _ = tokio::time::timeout(self.timeout.min(RELEASE_BOUND), async {
            for _ in 0..RELEASE_PDUS {
                match reader.next(MAX_PDU_LENGTH).await {
                    Ok((pdu::A_RELEASE_RP | pdu::A_ABORT, _)) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(CLOSE_BOUND, self.writer.shutdown()).await;
    }

    /// A-ABORT (service user), best effort.
    pub async fn abort(mut self) {
        let _ = tokio::time::timeout(CLOSE_BOUND, async {
            let _ = self.writer.write_all(&USER_ABORT).await;
            let _ = self.writer.shutdown().await;
        })
        .await;
    }
}

/// A-RELEASE-RQ (PS3.8 9.3.6).
const RELEASE_RQ: [u8; 10] = [pdu::A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0];
/// A-ABORT from the service user (source 0, reason 0; PS3.8 9.3.8).
const USER_ABORT: [u8; 10] = [pdu::A_ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0];

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::{PresentationContextResult, PresentationContextResultReason};
    use tokio::io::{AsyncReadExt, DuplexStream};

    const VERIFICATION: &str = "1.2.840.10008.1.1";
    const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

    fn pair(peer_max: u32) -> (Requestor<DuplexStream>, DuplexStream) {
        let rq = request(
            "TOOL",
            "ARCHIVE",
            "PACSGATE-TEST",
            &[Proposal {
                abstract_syntax: VERIFICATION.into(),
                transfer_syntaxes: vec![IMPLICIT_LE.into()],
            }],
            &[],
            None,
        );
        let ac = AssociationAC {
            protocol_version: 1,
            calling_ae_title: "TOOL".into(),
            called_ae_title: "ARCHIVE".into(),
            application_context_name: DICOM_APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![PresentationContextResult {
                id: 1,
                reason: PresentationContextResultReason::Acceptance,
                transfer_syntax: format!("{IMPLICIT_LE}\0"),
            }],
            user_variables: vec![UserVariableItem::MaxLength(peer_max)],
        };
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        (
            Requestor::new(ours, &rq, &ac, Duration::from_secs(5)),
            theirs,
        )
    }

    /// One P-DATA-TF with one PDV.
    fn p_data(context: u8, header: u8, data: &[u8]) -> Vec<u8> {
        let mut out = vec![pdu::P_DATA_TF, 0];
        out.extend_from_slice(&((data.len() + 6) as u32).to_be_bytes());
        out.extend_from_slice(&((data.len() + 2) as u32).to_be_bytes());
        out.extend_from_slice(&[context, header]);
        out.extend_from_slice(data);
        out
    }

    #[tokio::test]
    async fn the_answer_comes_back_as_it_came_and_waits_are_named() {
        let (mut ours, mut theirs) = tokio::io::duplex(4096);
        let rj = pdu::associate_rj(1, 2, 1);
        let peer = tokio::spawn(async move {
            let mut buf = Vec::new();
            read_pdu(&mut theirs, &mut buf, 4096).await.expect("rq");
            theirs.write_all(&rj).await.expect("rj");
            theirs
        });
        let answer = exchange(
            &mut ours,
            &[pdu::A_ASSOCIATE_RQ, 0, 0, 0, 0, 0],
            4096,
            Duration::from_secs(5),
        )
        .await
        .expect("answer");
        assert!(matches!(answer, Answer::Rejected(b) if b == rj));
        let _theirs = peer.await.expect("peer");

        let (mut ours, _silent) = tokio::io::duplex(4096);
        let e = exchange(
            &mut ours,
            &[pdu::A_ASSOCIATE_RQ, 0, 0, 0, 0, 0],
            4096,
            Duration::from_millis(20),
        )
        .await
        .expect_err("silence");
        assert!(matches!(
            e,
            RequestorError::Timeout {
                phase: WAITING_FOR_ANSWER,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn pdvs_are_reassembled_and_messages_sent_within_the_peer_maximum() {
        let (mut requestor, mut peer) = pair(4096);
        assert_eq!(
            requestor.context_for(VERIFICATION, Some(IMPLICIT_LE)),
            Some(1)
        );
        assert_eq!((requestor.message_id(), requestor.message_id()), (1, 2));
        let mut wire = p_data(1, 0x01, b"comm");
        wire.extend(p_data(1, 0x03, b"and"));
        wire.extend(p_data(1, 0x00, b"data "));
        wire.extend(p_data(1, 0x02, b"set"));
        wire.extend(p_data(1, 0x02, b"too large"));
        peer.write_all(&wire).await.expect("write");
        let (context, command) = requestor
            .read_command_set(64, "reading")
            .await
            .expect("command");
        assert_eq!((context, command.as_slice()), (1, &b"command"[..]));
        let data = requestor.read_data(1, 64, "reading").await.expect("data");
        assert_eq!(data, b"data set");
        let e = requestor
            .read_data(1, 4, "reading")
            .await
            .expect_err("limit");
        assert!(matches!(e, RequestorError::DataTooLarge { limit: 4, .. }));

        let big = vec![7u8; 10_000];
        requestor
            .send_message(1, b"cmd", Some(&big), "sending")
            .await
            .expect("send");
        let mut buf = Vec::new();
        let mut carried = 0;
        while carried < big.len() + 3 {
            read_pdu(&mut peer, &mut buf, 1 << 20).await.expect("pdu");
            assert!(buf.len() - pdu::PDU_HEADER_LENGTH <= 4096);
            carried += crate::ul::pdata::pdv_items(&buf)
                .map(|p| p.data.len())
                .sum::<usize>();
        }
        assert_eq!(carried, big.len() + 3);
    }

    #[tokio::test]
    async fn release_skips_late_p_data_and_an_abort_is_reported() {
        let (requestor, mut peer) = pair(0);
        let acceptor = tokio::spawn(async move {
            let mut rq = [0u8; 10];
            peer.read_exact(&mut rq).await.expect("release rq");
            assert_eq!(rq, RELEASE_RQ);
            peer.write_all(&p_data(1, 0x03, b"late"))
                .await
                .expect("late");
            peer.write_all(&pdu::RELEASE_RP).await.expect("rp");
        });
        requestor.release().await.expect("released");
        acceptor.await.expect("acceptor");

        // A peer that keeps sending P-DATA instead of the A-RELEASE-RP: the whole wait is bounded.
        let (mut requestor, mut peer) = pair(0);
        requestor.timeout = Duration::from_millis(300);
        let dripping = tokio::spawn(async move {
            let mut rq = [0u8; 10];
            peer.read_exact(&mut rq).await.expect("release rq");
            for _ in 0..100 {
                if peer.write_all(&p_data(1, 0x03, b"late")).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        // (Without the bound, the drip would outlast each PDU's wait, and end as a closed stream.)
        let e = requestor.release().await.expect_err("never released");
        assert!(
            matches!(
                e,
                RequestorError::Timeout {
                    phase: WAITING_FOR_RELEASE,
                    ..
                }
            ),
            "{e}"
        );
        dripping.abort();

        let (mut requestor, mut peer) = pair(0);
        peer.write_all(&[pdu::A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 1])
            .await
            .expect("abort");
        let e = requestor.next_pdv("reading").await.expect_err("aborted");
        assert!(matches!(
            e,
            RequestorError::Aborted {
                origin: 2,
                reason: 1
            }
        ));
    }

    #[tokio::test]
    async fn empty_fragments_are_bounded_but_a_few_pass() {
        // A few empty fragments inside a message are odd but harmless.
        let (mut requestor, mut peer) = pair(0);
        let mut wire = Vec::new();
        for _ in 0..MAX_EMPTY_FRAGMENTS {
            wire.extend(p_data(1, 0x01, b""));
        }
        wire.extend(p_data(1, 0x03, b"command"));
        peer.write_all(&wire).await.expect("write");
        let (_, command) = requestor
            .read_command_set(64, "reading")
            .await
            .expect("command");
        assert_eq!(command, b"command");

        // One more in a row than that, and the reader stops: without the bound a peer sending
        // empty fragments forever would keep it reading forever (none adds to the byte limit).
        let (mut requestor, mut peer) = pair(0);
        let writer = tokio::spawn(async move {
            for _ in 0..10 * MAX_EMPTY_FRAGMENTS {
                if peer.write_all(&p_data(1, 0x00, b"")).await.is_err() {
                    break;
                }
            }
            peer
        });
        let e = requestor
            .read_data(1, 1 << 20, "reading")
            .await
            .expect_err("endless");
        assert!(
            matches!(e, RequestorError::EmptyFragments("reading")),
            "{e}"
        );
        drop(requestor);
        let _ = writer.await;
    }
}
