//! One move-as-get retrieval: a C-MOVE the local client addressed to a local storage SCP, performed as a
//! C-GET on a second association to the gateway. Each C-STORE sub-operation is streamed to the local
//! SCP over a plain association, answered with its status, and the C-GET responses go back to the
//! local client as C-MOVE responses with the same counts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::dimse_extra::{self, SubOperations};
use super::gateway::Gateway;
use super::link::{self, Answer, EXPLICIT_LE, IMPLICIT_LE, Link, LinkError, Proposal};
use super::local_storage::LocalStorage;
use super::storage_classes::STORAGE_CLASSES;
use crate::dimse::{self, Command, command_field as cf, status};
use crate::ul::pdata::PDataWriter;

/// Study Root and Patient Root Query/Retrieve Information Model - MOVE and - GET (PS3.4 C.6).
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
pub const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";
pub const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";
pub const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";

// C-STORE processing failure (0x0110) when the local SCP cannot be reached.
pub(super) use crate::dimse::status::PROCESSING_FAILURE;
use crate::dimse::status::UNABLE_TO_PERFORM_SUB_OPERATIONS as UNABLE_TO_PERFORM;
/// The largest identifier (e.g. a Failed SOP Instance UID List) taken from a C-GET response.
pub(super) const MAX_RESPONSE_IDENTIFIER: usize = 4 * 1024 * 1024;
/// The most of a C-GET response's data set read at all, held or dropped.
const MAX_DROPPED_RESPONSE: usize = 16 * MAX_RESPONSE_IDENTIFIER;
/// Messages read on one C-GET association at most: a bound on the loop, far above real studies.
const MAX_MESSAGES: usize = 10_000_000;

/// The C-GET model that serves a C-MOVE model.
pub fn get_model(move_model: &str) -> Option<&'static str> {
    match move_model {
        STUDY_ROOT_MOVE => Some(STUDY_ROOT_GET),
        PATIENT_ROOT_MOVE => Some(PATIENT_ROOT_GET),
        _ => None,
    }
}

/// A local storage SCP, by AE title: `AE@HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStore {
    pub ae_title: String,
    pub address: String,
}

impl std::str::FromStr for LocalStore {
    type Err = String;

    fn from_str(s: &str) -> Result<LocalStore, String> {
        let Some((ae, address)) = s.split_once('@') else {
            return Err(format!(
                "{s:?} is not AE@HOST:PORT (e.g. VIEWER@127.0.0.1:11113)"
            ));
        };
        let ae = ae.trim();
        if ae.is_empty() || ae.len() > 16 || ae.contains('\\') || !ae.is_ascii() {
            return Err(format!(
                "{ae:?} in {s:?} is not an AE title (1 to 16 ASCII characters, no backslash)"
            ));
        }
        match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => return Err(format!("{address:?} in {s:?} is not HOST:PORT")),
        }
        Ok(LocalStore {
            ae_title: ae.to_string(),
            address: address.to_string(),
        })
    }
}

impl std::fmt::Display for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.ae_title, self.address)
    }
}

/// Everything one retrieval needs.
pub struct Retrieval {
    pub gateway: Arc<Gateway>,
    pub store: LocalStore,
    /// The local client's C-MOVE-RQ.
    pub request: Command,
    pub identifier: Vec<u8>,
    /// Transfer syntax of the local C-MOVE's presentation context.
    pub identifier_ts: String,
    /// The local C-MOVE's presentation context, for the responses.
    pub context: u8,
    pub calling_ae: String,
    pub called_ae: String,
    /// Largest PDU body the local client accepts.
    pub to_client_max: u32,
    /// Bound on each step: connect, handshake, association answer, each local store.
    pub timeout: Duration,
    /// The longest wait for the archive's next message on the C-GET association.
    pub archive_wait: Duration,
    /// The identifier's bytes in the move-as-get buffer, given back when the retrieval ends.
    pub held: super::move_as_get::Reservation,
    /// The association's account, for a C-GET response's data set (failed-instance list).
    pub account: super::move_as_get::Account,
}

/// Why a retrieval ended early, and what the local client is told.
#[derive(Debug)]
struct Failure {
    status: u16,
    /// Error Comment for the client (at most 64 characters).
    comment: &'static str,
    /// For the log.
    detail: String,
}

fn failure(status: u16, comment: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        status,
        comment,
        detail: detail.into(),
    }
}

impl From<LinkError> for Failure {
    fn from(e: LinkError) -> Failure {
        failure(
            UNABLE_TO_PERFORM,
            "move-as-get: the C-GET association failed",
            format!("C-GET association: {e}"),
        )
    }
}

/// How a retrieval ended.
struct Finished {
    status: u16,
    counts: SubOperations,
    stored: u32,
    failed: u32,
}

/// Perform the retrieval, send every response to the local client through `out`, and log the result.
/// `cancel` turns true on a C-CANCEL; its sender is dropped when the local association ends.
pub async fn run(r: Retrieval, out: mpsc::Sender<Vec<u8>>, cancel: watch::Receiver<bool>) {
    let started = Instant::now();
    let study = crate::dimse::decode_identifier(&r.identifier, &r.identifier_ts)
        .map(|i| dimse::attribute(&i, dicom_dictionary_std::tags::STUDY_INSTANCE_UID))
        .unwrap_or_default();
    tracing::info!(
        calling_ae = ?r.calling_ae,
        called_ae = ?r.called_ae,
        destination = %r.store,
        study_uid = %study,
        "move-as-get: C-MOVE to a local storage SCP performed as C-GET through the gateway"
    );
    match perform(&r, &out, cancel).await {
        Ok(f) => tracing::info!(
            destination = %r.store,
            study_uid = %study,
            status = %format!("{:#06x}", f.status),
            completed = f.counts.completed,
            failed = f.counts.failed,
            warning = f.counts.warning,
            stored_locally = f.stored,
            failed_locally = f.failed,
            duration_ms = started.elapsed().as_millis() as u64,
            "move-as-get finished"
        ),
        Err(f) => {
            tracing::warn!(
                destination = %r.store,
                study_uid = %study,
                status = %format!("{:#06x}", f.status),
                reason = ?f.detail,
                duration_ms = started.elapsed().as_millis() as u64,
                "move-as-get failed"
            );
            let _ = respond(
                &r,
                &out,
                f.status,
                &SubOperations::default(),
                None,
                f.comment,
            )
            .await;
        }
    }
}

/// Send a C-MOVE-RSP (and its identifier, if any) to the local client.
async fn respond(
    r: &Retrieval,
    out: &mpsc::Sender<Vec<u8>>,
    status: u16,
    counts: &SubOperations,
    data: Option<&[u8]>,
    comment: &str,
) -> Result<(), Failure> {
    let command = dimse_extra::move_response(&r.request, status, counts, data.is_some(), comment);
    let mut writer = PDataWriter::new(r.to_client_max);
    writer.push(r.context, true, true, &command);
    if let Some(data) = data {
        writer.push(r.context, false, true, data);
    }
    out.send(writer.into_bytes()).await.map_err(|_| {
        failure(
            UNABLE_TO_PERFORM,
            "",
            "the local client's association ended",
        )
    })
}

/// The C-GET association to the gateway, with its GET presentation context and transfer syntax.
struct GetAssociation {
    link: Link<GatewayStream>,
    pc: u8,
    ts: String,
}

type GatewayStream = tokio_rustls::client::TlsStream<TcpStream>;

async fn perform(
    r: &Retrieval,
    out: &mpsc::Sender<Vec<u8>>,
    cancel: watch::Receiver<bool>,
) -> Result<Finished, Failure> {
    let model = get_model(&r.request.affected_sop_class).ok_or_else(|| {
        failure(
            UNABLE_TO_PERFORM,
            "move-as-get: information model not supported",
            format!("no C-GET model for {}", r.request.affected_sop_class),
        )
    })?;
    let mut get = open_get(r, model).await?;
    let identifier = identifier_for(r, &get.ts)?;
    let get_id = get.link.message_id();
    let command = crate::tools::client::request_command(cf::C_GET_RQ, model, get_id, true);
    get.link
        .send_message(get.pc, &command, Some(&identifier))
        .await?;

    let mut local = LocalStorage::new(r);
    // An error of `exchange` itself leaves the C-GET association as it is (dropped, no A-ABORT).
    let result = exchange(r, out, cancel, &mut get, get_id, &mut local).await?;
    match &result {
        Ok(_) => get.link.release().await,
        Err(_) => get.link.abort().await,
    }
    local.close().await;
    result
}

/// Open the C-GET association: both GET models, every storage class with the SCP role.
async fn open_get(r: &Retrieval, model: &str) -> Result<GetAssociation, Failure> {
    let uncompressed = vec![EXPLICIT_LE.to_string(), IMPLICIT_LE.to_string()];
    let mut proposals: Vec<Proposal> = [STUDY_ROOT_GET, PATIENT_ROOT_GET]
        .iter()
        .chain(STORAGE_CLASSES.iter())
        .map(|class| Proposal {
            abstract_syntax: class.to_string(),
            transfer_syntaxes: uncompressed.clone(),
        })
        .collect();
    proposals.truncate(128);
    let roles: Vec<String> = STORAGE_CLASSES.iter().map(|c| c.to_string()).collect();
    let rq = link::request(&r.calling_ae, &r.called_ae, &proposals, &roles, None);
    let bytes = r.gateway.request(&rq).map_err(|e| {
        failure(
            UNABLE_TO_PERFORM,
            "move-as-get: credentials unavailable",
            e.to_string(),
        )
    })?;
    let (stream, answer) = r.gateway.open(&bytes).await.map_err(|e| {
        failure(
            UNABLE_TO_PERFORM,
            "move-as-get: gateway unreachable",
            e.to_string(),
        )
    })?;
    let ac = match answer {
        Answer::Accepted(ac) => ac,
        Answer::Rejected(rj) => {
            return Err(failure(
                UNABLE_TO_PERFORM,
                "move-as-get: the gateway rejected the C-GET association",
                format!(
                    "the gateway rejected the C-GET association: {}",
                    super::gateway::rejection_words(&rj)
                ),
            ));
        }
        Answer::Aborted(abort) => {
            return Err(failure(
                UNABLE_TO_PERFORM,
                "move-as-get: the gateway aborted the C-GET association",
                super::gateway::abort_words(&abort),
            ));
        }
    };
    let link = Link::new(stream, &rq, &ac, r.archive_wait);
    let Some(pc) = link.context_for(model, None) else {
        link.abort().await;
        return Err(failure(
            UNABLE_TO_PERFORM,
            "move-as-get: the gateway did not accept C-GET",
            format!("the gateway did not accept the presentation context for {model}"),
        ));
    };
    let ts = link
        .contexts()
        .get(&pc)
        .map(|c| c.transfer_syntax.clone())
        .unwrap_or_default();
    Ok(GetAssociation { link, pc, ts })
}

/// The local C-MOVE's identifier in the C-GET context's transfer syntax.
fn identifier_for(r: &Retrieval, get_ts: &str) -> Result<Vec<u8>, Failure> {
    if get_ts == r.identifier_ts {
        return Ok(r.identifier.clone());
    }
    let object = dimse::decode_identifier(&r.identifier, &r.identifier_ts).map_err(|e| {
        failure(
            status::IDENTIFIER_DOES_NOT_MATCH,
            "identifier does not match",
            e.to_string(),
        )
    })?;
    crate::tools::client::encode_identifier(&object, get_ts).map_err(|e| {
        failure(
            status::IDENTIFIER_DOES_NOT_MATCH,
            "identifier does not match",
            e.to_string(),
        )
    })
}

/// Count one local C-STORE's status among the sub-operations.
fn tally(mine: &mut SubOperations, status: u16) {
    match status {
        status::SUCCESS => mine.completed = mine.completed.saturating_add(1),
        s if status::is_warning(s) => mine.warning = mine.warning.saturating_add(1),
        _ => mine.failed = mine.failed.saturating_add(1),
    }
}

/// Send the C-CANCEL once, when the local client cancelled; the inner error is the failure when
/// the local client's association ended, an outer error a failed send.
async fn forward_cancel(
    cancel: &mut watch::Receiver<bool>,
    cancel_sent: &mut bool,
    get: &mut GetAssociation,
    get_id: u16,
) -> Result<Result<(), Failure>, Failure> {
    match cancel.has_changed() {
        Ok(true) if !*cancel_sent => {
            cancel.borrow_and_update();
            *cancel_sent = true;
            get.link
                .send_message(get.pc, &dimse::c_cancel(get_id), None)
                .await?;
        }
        Ok(_) => {}
        Err(_) => {
            return Ok(Err(failure(
                UNABLE_TO_PERFORM,
                "",
                "the local client's association ended",
            )));
        }
    }
    Ok(Ok(()))
}

/// The C-GET exchange: C-STOREs handed to the local SCP and answered, C-GET responses passed to
/// the client as C-MOVE responses, a C-CANCEL sent once on `cancel`. The inner result is how the
/// retrieval ended (the association then released or aborted); an outer error ends it at once.
async fn exchange(
    r: &Retrieval,
    out: &mpsc::Sender<Vec<u8>>,
    mut cancel: watch::Receiver<bool>,
    get: &mut GetAssociation,
    get_id: u16,
    local: &mut LocalStorage<'_>,
) -> Result<Result<Finished, Failure>, Failure> {
    let mut mine = SubOperations::default();
    let mut cancel_sent = false;
    for _ in 0..MAX_MESSAGES {
        if let Err(ended) = forward_cancel(&mut cancel, &mut cancel_sent, get, get_id).await? {
            return Ok(Err(ended));
        }
        let (pc, command) = match get.link.read_command("waiting for C-GET responses").await {
            Ok(m) => m,
            Err(e) => return Ok(Err(e.into())),
        };
        if command.field == cf::C_STORE_RQ {
            let status = match store_one(&mut get.link, local, pc, &command).await {
                Ok(s) => s,
                Err(e) => return Ok(Err(e.into())),
            };
            tally(&mut mine, status);
            get.link
                .send_message(pc, &dimse::refusal(&command, status, ""), None)
                .await?;
            continue;
        }
        if command.field != (cf::C_GET_RQ | cf::RESPONSE) || command.responded_to != get_id {
            // Nothing else is expected here; skip it (and its data set).
            if command.has_data_set {
                get.link
                    .read_data(pc, MAX_RESPONSE_IDENTIFIER, "skipping a data set")
                    .await?;
            }
            continue;
        }
        let st = command.status.unwrap_or(status::SUCCESS);
        let mut counts = if SubOperations::present_in(&command) {
            SubOperations::of(&command)
        } else {
            mine
        };
        let data = if command.has_data_set {
            read_held(&mut get.link, pc, &r.account).await?
        } else {
            None
        };
        if status::is_pending(st) {
            respond(r, out, st, &counts, None, "").await?;
            continue;
        }
        counts.remaining = None;
        // The Failed SOP Instance UID List goes along when it is in the client's transfer syntax.
        let data = data.filter(|_| get.ts == r.identifier_ts).map(|(d, _)| d);
        let comment = dimse::attribute(&command.object, dicom_dictionary_std::tags::ERROR_COMMENT);
        respond(r, out, st, &counts, data.as_deref(), &comment).await?;
        return Ok(Ok(Finished {
            status: st,
            counts,
            stored: local.stored,
            failed: local.failed,
        }));
    }
    Ok(Err(failure(
        UNABLE_TO_PERFORM,
        "move-as-get: too many messages",
        "message bound reached",
    )))
}

/// A C-GET response's data set (a Failed SOP Instance UID List), held within the move-as-get buffer:
/// past the buffer (or [`MAX_RESPONSE_IDENTIFIER`]) the rest is read and dropped, and the response
/// goes to the client without it; past [`MAX_DROPPED_RESPONSE`] in all, the association fails (no
/// such list is that long: a peer that never ends one would keep this reading forever).
async fn read_held<G: AsyncRead + AsyncWrite + Unpin>(
    get: &mut Link<G>,
    pc: u8,
    account: &super::move_as_get::Account,
) -> Result<Option<(Vec<u8>, super::move_as_get::Reservation)>, LinkError> {
    let mut data = Vec::new();
    let mut reservation = Some(account.reservation());
    let mut read = 0usize;
    loop {
        let pdv = get
            .read_data_pdv(pc, "reading a C-GET response's data set")
            .await?;
        read = read.saturating_add(pdv.data.len());
        if read > MAX_DROPPED_RESPONSE {
            return Err(LinkError::Protocol(format!(
                "a C-GET response's data set over {MAX_DROPPED_RESPONSE} bytes"
            )));
        }
        if let Some(r) = reservation.as_mut() {
            let room = if data.len() + pdv.data.len() > MAX_RESPONSE_IDENTIFIER {
                Err(format!("over {MAX_RESPONSE_IDENTIFIER} bytes"))
            } else {
                r.grow(pdv.data.len()).map_err(|e| e.to_string())
            };
            match room {
                Ok(()) => data.extend_from_slice(&pdv.data),
                Err(reason) => {
                    tracing::warn!(
                        reason = ?reason,
                        "move-as-get: a C-GET response's data set is dropped"
                    );
                    reservation = None;
                    data = Vec::new();
                }
            }
        }
        if pdv.is_last {
            return Ok(reservation.map(|r| (data, r)));
        }
    }
}

/// One C-STORE sub-operation from the gateway: forward it to the local SCP, data set fragment by
/// fragment, and return the status to answer it with. An error means the C-GET association failed;
/// a local failure is a failure status.
async fn store_one<G: AsyncRead + AsyncWrite + Unpin>(
    get: &mut Link<G>,
    local: &mut LocalStorage<'_>,
    pc: u8,
    command: &Command,
) -> Result<u16, LinkError> {
    if !command.has_data_set {
        return Ok(PROCESSING_FAILURE);
    }
    let ts = get
        .contexts()
        .get(&pc)
        .map(|c| c.transfer_syntax.clone())
        .unwrap_or_default();
    let mut target = match local.begin(command, &ts).await {
        Ok(t) => Some(t),
        Err(e) => {
            local.note_failure(command, &e);
            None
        }
    };
    // Bounded by the data set: the last fragment ends the loop, a broken association an error.
    loop {
        let pdv = get
            .read_data_pdv(pc, "receiving a C-STORE sub-operation")
            .await?;
        if let Some((lpc, _)) = target
            && let Err(e) = local.send_data(lpc, &pdv.data, pdv.is_last).await
        {
            local.note_failure(command, &e);
            target = None;
        }
        if pdv.is_last {
            break;
        }
    }
    let Some((_, id)) = target else {
        return Ok(PROCESSING_FAILURE);
    };
    match local.finish(id).await {
        Ok(status) => {
            if status == status::SUCCESS || status::is_warning(status) {
                local.stored += 1;
            } else {
                local.failed += 1;
            }
            Ok(status)
        }
        Err(e) => {
            local.note_failure(command, &e);
            Ok(PROCESSING_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_stores_parse_as_ae_at_host_port() {
        let s: LocalStore = "VIEWER@127.0.0.1:11113".parse().expect("parse");
        assert_eq!(s.ae_title, "VIEWER");
        assert_eq!(s.address, "127.0.0.1:11113");
        assert_eq!(s.to_string(), "VIEWER@127.0.0.1:11113");
        assert!("[::1]:104".parse::<LocalStore>().is_err());
        assert!("VIEWER@localhost".parse::<LocalStore>().is_err());
        assert!("WAY_TOO_LONG_AE_TITLE@h:1".parse::<LocalStore>().is_err());
        assert!("@h:1".parse::<LocalStore>().is_err());
        assert!("V@h:0".parse::<LocalStore>().is_err());
        assert!("V@[::1]:104".parse::<LocalStore>().is_ok());
    }

    #[test]
    fn move_models_map_to_get_models() {
        assert_eq!(get_model(STUDY_ROOT_MOVE), Some(STUDY_ROOT_GET));
        assert_eq!(get_model(PATIENT_ROOT_MOVE), Some(PATIENT_ROOT_GET));
        assert_eq!(get_model("1.2.840.10008.5.1.4.1.2.3.2"), None);
    }

    #[tokio::test]
    async fn a_c_get_response_data_set_that_never_ends_fails_the_association() {
        use dicom_ul::pdu::{
            AssociationAC, PresentationContextResult, PresentationContextResultReason,
        };
        use tokio::io::AsyncWriteExt;
        let rq = link::request(
            "VIEWER",
            "ARCHIVE",
            &[Proposal {
                abstract_syntax: STUDY_ROOT_GET.into(),
                transfer_syntaxes: vec![EXPLICIT_LE.into()],
            }],
            &[],
            None,
        );
        let ac = AssociationAC {
            protocol_version: 1,
            calling_ae_title: "VIEWER".into(),
            called_ae_title: "ARCHIVE".into(),
            application_context_name: crate::ul::association::DICOM_APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![PresentationContextResult {
                id: 1,
                reason: PresentationContextResultReason::Acceptance,
                transfer_syntax: format!("{EXPLICIT_LE}\0"),
            }],
            user_variables: vec![],
        };
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let mut get = Link::new(ours, &rq, &ac, Duration::from_secs(5));
        // Data set fragments of 16 KiB on context 1, none the last, more than the bound in all.
        let fragment = {
            let data = vec![0u8; 16 * 1024];
            let mut pdu = vec![crate::ul::pdu::P_DATA_TF, 0];
            pdu.extend_from_slice(&((data.len() + 6) as u32).to_be_bytes());
            pdu.extend_from_slice(&((data.len() + 2) as u32).to_be_bytes());
            pdu.extend_from_slice(&[1, 0x00]);
            pdu.extend_from_slice(&data);
            pdu
        };
        let peer = tokio::spawn(async move {
            for _ in 0..(MAX_DROPPED_RESPONSE / (16 * 1024) + 16) {
                if theirs.write_all(&fragment).await.is_err() {
                    break;
                }
            }
            theirs
        });
        let account = super::super::buffer::Buffer::new(Default::default()).association();
        let e = read_held(&mut get, 1, &account)
            .await
            .expect_err("a data set past the bound");
        assert!(
            e.to_string().contains(&MAX_DROPPED_RESPONSE.to_string()),
            "{e}"
        );
        drop(get);
        let _ = peer.await;
    }
}
