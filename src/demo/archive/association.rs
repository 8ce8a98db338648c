//! Upper layer for the demo archive, on pacsgate's own: reading the A-ASSOCIATE-RQ and writing the
//! A-ASSOCIATE-AC / -RJ that `negotiation.rs` decided, and DIMSE message assembly.
//!
//! PDUs are framed by `ul::pdu::PduReader` (length checked before allocating), the A-ASSOCIATE-RQ is
//! read by `ul::association`, PDV items by `ul::pdata` (checked to tile their PDU, then read) and
//! written by `ul::pdata::PDataWriter`; A-RELEASE and A-ABORT are recognised by their type byte alone.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use dicom_ul::pdu::AssociationRQ;
use dicom_ul::{Pdu, write_pdu};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::DemoArchiveError;
use super::dimse::Command;
use super::negotiation::{Context, DEMO_RECEIVE_MAX_PDU, Rejection, Service, negotiate};
use crate::ul::association::{AssociationError, parse_request};
use crate::ul::pdata::{PDataWriter, PdvSpans};
use crate::ul::pdu::{self, PDU_HEADER_LENGTH, PduError, PduReader};

/// A-ABORT reasons (PS3.8 9.3.8, source: service provider).
const ABORT_NOT_SPECIFIED: u8 = 0;
const ABORT_UNEXPECTED_PDU: u8 = 2;
const ABORT_INVALID_PARAMETER: u8 = 6;
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
    Request(Box<AssociationRQ>),
    /// The PDV items of a P-DATA-TF whose items tile it.
    PData(Vec<OwnedPdv>),
    ReleaseRq,
    Abort,
    Closed,
    /// Any other PDU type, known or not.
    Other,
}

/// One PDV item, copied out of the read buffer (it waits in `Association::pending`).
#[derive(Debug)]
struct OwnedPdv {
    presentation_context_id: u8,
    is_command: bool,
    is_last: bool,
    data: Vec<u8>,
}

/// An established association, from the acceptor's side.
pub(crate) struct Association {
    reader: PduReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    pub calling_ae: String,
    pub called_ae: String,
    contexts: Vec<Context>,
    /// SOP classes for which the requestor accepted the SCP role (C-GET sub-operations).
    scp_role: HashSet<String>,
    /// The longest P-DATA-TF body we send: the peer's Maximum Length, within `UNLIMITED_PEER_PDU`.
    send_max_pdu: u32,
    pending: VecDeque<OwnedPdv>,
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
        let (read, mut writer) = stream.into_split();
        let mut reader = PduReader::new(read);
        let rq = match read_frame(&mut reader, ASSOCIATE_TIMEOUT, "association request").await {
            Ok(Frame::Request(rq)) => rq,
            Ok(Frame::Abort | Frame::Closed) => return Ok(Establish::Gone),
            Ok(Frame::PData(_) | Frame::ReleaseRq | Frame::Other) => {
                send_abort(&mut writer, ABORT_UNEXPECTED_PDU).await;
                return Err(DemoArchiveError::Protocol(
                    "expected an A-ASSOCIATE-RQ".into(),
                ));
            }
            // ARTIM expiry or a broken connection: just close (PS3.8 9.1.5).
            Err(e @ (DemoArchiveError::Timeout { .. } | DemoArchiveError::Io(_))) => return Err(e),
            Err(e) => {
                send_abort(&mut writer, ABORT_INVALID_PARAMETER).await;
                return Err(e);
            }
        };
        match negotiate(&rq, ae_title) {
            Ok(negotiated) => {
                write_pdu_bytes(&mut writer, &encode(&Pdu::AssociationAC(negotiated.ac))?).await?;
                let rq = *rq;
                Ok(Establish::Accepted(Association {
                    reader,
                    writer,
                    calling_ae: rq.calling_ae_title,
                    called_ae: rq.called_ae_title,
                    contexts: negotiated.contexts,
                    scp_role: negotiated.scp_role,
                    send_max_pdu: negotiated.send_max_pdu,
                    pending: VecDeque::new(),
                }))
            }
            Err(reason) => {
                write_pdu_bytes(&mut writer, &reason.pdu()).await?;
                let _ = writer.shutdown().await;
                let rq = *rq;
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
        let command = match self.command_set(first).await? {
            Ok(bytes) => Command::decode(&bytes)?,
            Err(event) => return Ok(event),
        };
        if !command.has_data_set() {
            return Ok(Event::Message(Message {
                context_id,
                command,
                data: None,
                data_too_large: false,
            }));
        }
        let (data, data_too_large) = match self.data_set(context_id).await? {
            Ok(data) => data,
            Err(event) => return Ok(event),
        };
        Ok(Event::Message(Message {
            context_id,
            command,
            data: Some(data),
            data_too_large,
        }))
    }

    /// The command set that starts with `first`: command fragments on its presentation context up
    /// to the last one, at most `MAX_COMMAND_BYTES`; `Err(event)` when the peer stopped talking DIMSE.
    async fn command_set(
        &mut self,
        first: OwnedPdv,
    ) -> Result<Result<Vec<u8>, Event>, DemoArchiveError> {
        let context_id = first.presentation_context_id;
        let mut command_bytes = Vec::new();
        let mut pdv = first;
        loop {
            if !pdv.is_command || pdv.presentation_context_id != context_id {
                return Err(DemoArchiveError::Protocol(
                    "expected a command fragment on the same presentation context".into(),
                ));
            }
            if command_bytes.len() + pdv.data.len() > MAX_COMMAND_BYTES {
                return Err(DemoArchiveError::Protocol("command set too large".into()));
            }
            command_bytes.extend_from_slice(&pdv.data);
            if pdv.is_last {
                return Ok(Ok(command_bytes));
            }
            pdv = match self.next_pdv().await? {
                Ok(pdv) => pdv,
                Err(event) => return Ok(Err(event)),
            };
        }
    }

    /// The data set that follows a command set on `context_id`, and whether it exceeded
    /// `MAX_DATA_SET_BYTES` (then it was consumed and dropped); `Err(event)` as for `command_set`.
    async fn data_set(
        &mut self,
        context_id: u8,
    ) -> Result<Result<(Vec<u8>, bool), Event>, DemoArchiveError> {
        let mut data = Vec::new();
        let mut data_too_large = false;
        loop {
            let pdv = match self.next_pdv().await? {
                Ok(pdv) => pdv,
                Err(event) => return Ok(Err(event)),
            };
            if pdv.is_command || pdv.presentation_context_id != context_id {
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
                return Ok(Ok((data, data_too_large)));
            }
        }
    }

    /// Next PDV, reading a PDU when none is buffered; `Err(event)` when the peer stopped talking DIMSE.
    async fn next_pdv(&mut self) -> Result<Result<OwnedPdv, Event>, DemoArchiveError> {
        loop {
            if let Some(pdv) = self.pending.pop_front() {
                return Ok(Ok(pdv));
            }
            match read_frame(&mut self.reader, IDLE_TIMEOUT, "next PDU").await? {
                Frame::PData(items) => self.pending.extend(items),
                Frame::ReleaseRq => return Ok(Err(Event::ReleaseRequested)),
                Frame::Abort => return Ok(Err(Event::Aborted)),
                Frame::Closed => return Ok(Err(Event::Closed)),
                Frame::Request(_) | Frame::Other => {
                    return Err(DemoArchiveError::Protocol(
                        "unexpected PDU while associated".into(),
                    ));
                }
            }
        }
    }

    /// Send a command set and optional data set, fragmented to the peer's maximum PDU length:
    /// the command set in PDUs of its own, then the data set, one PDV per PDU.
    pub async fn send_message(
        &mut self,
        context_id: u8,
        command: Vec<u8>,
        data: Option<&[u8]>,
    ) -> Result<(), DemoArchiveError> {
        let mut pdus = PDataWriter::new(self.send_max_pdu);
        pdus.push(context_id, true, true, &command);
        self.send_pdus(&pdus.into_bytes()).await?;
        if let Some(data) = data {
            let mut pdus = PDataWriter::new(self.send_max_pdu);
            pdus.push(context_id, false, true, data);
            self.send_pdus(&pdus.into_bytes()).await?;
        }
        Ok(())
    }

    /// Write whole PDUs one at a time, each within `WRITE_TIMEOUT`.
    async fn send_pdus(&mut self, mut pdus: &[u8]) -> Result<(), DemoArchiveError> {
        while let Some(header) = pdus.get(..PDU_HEADER_LENGTH) {
            let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
            let (pdu, rest) = pdus.split_at((PDU_HEADER_LENGTH + length).min(pdus.len()));
            write_pdu_bytes(&mut self.writer, pdu).await?;
            pdus = rest;
        }
        Ok(())
    }

    /// Answer an A-RELEASE-RQ and close.
    pub async fn release(&mut self) -> Result<(), DemoArchiveError> {
        write_pdu_bytes(&mut self.writer, &pdu::RELEASE_RP).await?;
        let _ = self.writer.shutdown().await;
        Ok(())
    }

    /// Send an A-ABORT (best effort) and close.
    pub async fn abort(mut self) {
        send_abort(&mut self.writer, ABORT_NOT_SPECIFIED).await;
    }
}

/// Read one PDU within `timeout`, refusing lengths above `DEMO_RECEIVE_MAX_PDU` before allocating.
/// On error the caller aborts the association.
async fn read_frame(
    reader: &mut PduReader<OwnedReadHalf>,
    timeout: Duration,
    phase: &'static str,
) -> Result<Frame, DemoArchiveError> {
    let read = async {
        let (pdu_type, at) = match reader.next(DEMO_RECEIVE_MAX_PDU).await {
            Ok(next) => next,
            Err(PduError::Closed) => return Ok(Frame::Closed),
            Err(PduError::TooLarge { length, limit, .. }) => {
                return Err(DemoArchiveError::PduTooLarge { length, max: limit });
            }
            Err(PduError::UnknownType(_)) => return Ok(Frame::Other),
            Err(PduError::Io(e)) => return Err(DemoArchiveError::Io(e)),
        };
        let bytes = reader.get(at);
        match pdu_type {
            pdu::A_RELEASE_RQ => Ok(Frame::ReleaseRq),
            pdu::A_ABORT => Ok(Frame::Abort),
            pdu::A_ASSOCIATE_RQ => match parse_request(bytes) {
                Ok(rq) => Ok(Frame::Request(Box::new(rq))),
                Err(AssociationError::Malformed { message, .. }) => {
                    Err(DemoArchiveError::ReadPdu(message))
                }
                Err(e) => Err(DemoArchiveError::Protocol(e.to_string())),
            },
            // A P-DATA-TF without items carries nothing: it is passed over, as it always was.
            pdu::P_DATA_TF if bytes.len() == PDU_HEADER_LENGTH => Ok(Frame::PData(Vec::new())),
            pdu::P_DATA_TF => {
                let mut spans = PdvSpans::default();
                let checked = spans.check(bytes).map_err(DemoArchiveError::ReadPdu)?;
                let items = checked.items().map(|p| OwnedPdv {
                    presentation_context_id: p.presentation_context_id,
                    is_command: p.is_command,
                    is_last: p.is_last,
                    data: p.data.to_vec(),
                });
                Ok(Frame::PData(items.collect()))
            }
            _ => Ok(Frame::Other),
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| DemoArchiveError::Timeout { phase })?
}

/// Encode a PDU the demo builds itself (the A-ASSOCIATE-AC).
fn encode(pdu: &Pdu) -> Result<Vec<u8>, DemoArchiveError> {
    let mut bytes = Vec::new();
    write_pdu(&mut bytes, pdu)?;
    Ok(bytes)
}

/// Write one whole PDU within `WRITE_TIMEOUT`.
async fn write_pdu_bytes(
    writer: &mut OwnedWriteHalf,
    bytes: &[u8],
) -> Result<(), DemoArchiveError> {
    tokio::time::timeout(WRITE_TIMEOUT, crate::ul::io::write_flush(writer, bytes))
        .await
        .map_err(|_| DemoArchiveError::Timeout { phase: "write PDU" })??;
    Ok(())
}

/// A-ABORT from the service provider with `reason` (best effort), then close.
async fn send_abort(writer: &mut OwnedWriteHalf, reason: u8) {
    let _ = write_pdu_bytes(writer, &pdu::abort(reason)).await;
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use dicom_dictionary_std::uids;
    use dicom_ul::pdu::{
        AbortRQServiceProviderReason, AbortRQSource, AssociationRJ, AssociationRJResult,
        AssociationRJServiceProviderASCEReason, AssociationRJServiceUserReason,
        AssociationRJSource, PresentationContextProposed, UserVariableItem,
    };

    use super::*;

    /// An associated peer on loopback: (stream, the first PDU it read back).
    async fn associate(port: u16) -> (tokio::net::TcpStream, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let rq = Pdu::AssociationRQ(AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "TESTSCU".into(),
            called_ae_title: "DEMO".into(),
            application_context_name: crate::ul::association::DICOM_APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![PresentationContextProposed {
                id: 1,
                abstract_syntax: uids::VERIFICATION.into(),
                transfer_syntaxes: vec![uids::IMPLICIT_VR_LITTLE_ENDIAN.into()],
            }],
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        });
        s.write_all(&encode(&rq).expect("encode"))
            .await
            .expect("rq");
        let mut ac = Vec::new();
        pdu::read_pdu(&mut s, &mut ac, 1 << 16)
            .await
            .expect("answer");
        (s, ac)
    }

    /// The framing paths the acceptor took from `ul`: an empty P-DATA-TF is passed over, a C-ECHO
    /// is answered in one PDU, a release gets A-RELEASE-RP, and PDV items that do not tile their
    /// PDU get an A-ABORT.
    #[tokio::test]
    async fn the_acceptor_frames_on_ul_as_before() {
        use crate::dimse::{self, command_field, status};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let archive = std::sync::Arc::new(super::super::DemoArchive::empty());
        let server = tokio::spawn(super::super::serve(listener, archive, "DEMO".into()));

        let (mut s, ac) = associate(port).await;
        assert_eq!(ac.first(), Some(&pdu::A_ASSOCIATE_AC));
        s.write_all(&[pdu::P_DATA_TF, 0, 0, 0, 0, 0])
            .await
            .expect("empty");
        let echo = dimse::encode_command(vec![
            dicom_core::DataElement::new(
                dicom_dictionary_std::tags::AFFECTED_SOP_CLASS_UID,
                dicom_core::VR::UI,
                dicom_core::PrimitiveValue::from(uids::VERIFICATION),
            ),
            dicom_core::DataElement::new(
                dicom_dictionary_std::tags::COMMAND_FIELD,
                dicom_core::VR::US,
                dicom_core::PrimitiveValue::from(command_field::C_ECHO_RQ),
            ),
            dicom_core::DataElement::new(
                dicom_dictionary_std::tags::MESSAGE_ID,
                dicom_core::VR::US,
                dicom_core::PrimitiveValue::from(7u16),
            ),
            dicom_core::DataElement::new(
                dicom_dictionary_std::tags::COMMAND_DATA_SET_TYPE,
                dicom_core::VR::US,
                dicom_core::PrimitiveValue::from(dimse::NO_DATA_SET),
            ),
        ]);
        let mut w = PDataWriter::new(16384);
        w.push(1, true, true, &echo);
        s.write_all(&w.into_bytes()).await.expect("echo");
        let mut back = Vec::new();
        pdu::read_pdu(&mut s, &mut back, 1 << 16)
            .await
            .expect("response");
        crate::ul::pdata::check_pdv_items(&back).expect("well-formed");
        let items: Vec<_> = crate::ul::pdata::pdv_items(&back).collect();
        assert!(items.len() == 1 && items[0].is_command && items[0].is_last);
        let response = dimse::decode_command(items[0].data).expect("decode");
        assert_eq!(
            (response.status, response.responded_to),
            (Some(status::SUCCESS), 7)
        );
        s.write_all(&[pdu::A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0])
            .await
            .expect("release");
        pdu::read_pdu(&mut s, &mut back, 1 << 16).await.expect("rp");
        assert_eq!(back, pdu::RELEASE_RP);

        let (mut s, _) = associate(port).await;
        s.write_all(&[pdu::P_DATA_TF, 0, 0, 0, 0, 6, 0, 0, 0, 1, 1, 3])
            .await
            .expect("short item");
        pdu::read_pdu(&mut s, &mut back, 1 << 16)
            .await
            .expect("abort");
        assert_eq!(back, pdu::abort(ABORT_NOT_SPECIFIED));
        server.abort();
    }

    /// The control PDUs the demo writes from `ul::pdu` are byte for byte the ones dicom-ul wrote.
    #[test]
    fn control_pdus_are_the_bytes_dicom_ul_wrote() {
        let rj = |source| {
            encode(&Pdu::AssociationRJ(AssociationRJ {
                result: AssociationRJResult::Permanent,
                source,
            }))
            .expect("encode")
        };
        let cases = [
            (
                Rejection::ProtocolVersion,
                AssociationRJSource::ServiceProviderASCE(
                    AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
                ),
            ),
            (
                Rejection::ApplicationContext,
                AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
                ),
            ),
            (
                Rejection::CalledAe,
                AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CalledAETitleNotRecognized,
                ),
            ),
        ];
        for (rejection, source) in cases {
            assert_eq!(rejection.pdu().to_vec(), rj(source), "{rejection:?}");
        }
        for (code, reason) in [
            (
                ABORT_NOT_SPECIFIED,
                AbortRQServiceProviderReason::ReasonNotSpecified,
            ),
            (
                ABORT_UNEXPECTED_PDU,
                AbortRQServiceProviderReason::UnexpectedPdu,
            ),
            (
                ABORT_INVALID_PARAMETER,
                AbortRQServiceProviderReason::InvalidPduParameter,
            ),
        ] {
            let abort = Pdu::AbortRQ {
                source: AbortRQSource::ServiceProvider(reason),
            };
            assert_eq!(pdu::abort(code).to_vec(), encode(&abort).expect("encode"));
        }
        assert_eq!(
            pdu::RELEASE_RP.to_vec(),
            encode(&Pdu::ReleaseRP).expect("encode")
        );
    }
}
