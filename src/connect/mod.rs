//! `pacsgate connect`: a local tunnel on the clinician's machine. Plain DICOM from a viewer on loopback
//! goes to the gateway over TLS with the clinician's credentials in the A-ASSOCIATE-RQ.
//!
//! - `cli.rs`             the command line and `[connect]` file, validated into `Settings`
//! - `run.rs`             `run`: settings, secrets, listeners, serve until a signal
//! - `gateway.rs`         TLS to the gateway (verified, fail closed), credentials, answers in words
//! - `mod.rs`             the accept loop and one association's way: request, gateway, answer, relay
//! - `move_as_get.rs`     C-MOVE to a local storage SCP taken out of the relay ...
//! - `injection.rs`       ... the relay with its C-MOVE responses injected and keep-alive C-ECHOs
//! - `buffer.rs`          ... what it holds for local clients, capped per association and in total
//! - `retrieve.rs`        ... and performed as a C-GET whose C-STOREs are forwarded to that SCP
//! - `local_storage.rs`  ... the association to that local SCP
//! - `local.rs`           the local listeners (TCP on loopback, Unix socket) and who is calling (UID)
//! - `link.rs`            the associations connect requests itself (C-GET, local storage), over `ul::requestor`
//! - `dimse_extra.rs`     C-MOVE-RSP with counts, C-STORE-RQ re-addressed
//! - `storage_classes.rs` the storage SOP classes proposed for C-GET

pub mod buffer;
pub mod cli;
pub mod dimse_extra;
pub mod gateway;
pub mod injection;
pub mod link;
pub mod local;
mod local_storage;
pub mod move_as_get;
pub mod retrieve;
mod run;
pub mod storage_classes;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, Pdu, PresentationContextProposed,
    PresentationContextResultReason, UserVariableItem,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::client::TlsStream;
use tokio_util::task::TaskTracker;

use crate::relay::{self, PassThrough, RelayEnd, RelayLimits, RelayStats};
use crate::ul::MAX_PDU_LENGTH;
use crate::ul::association;
use crate::ul::io::write_flush;
use crate::ul::pdu::{self, Rejection};
use gateway::{Gateway, OpenError};
use link::Answer;
use local::{Caller, Callers, Listeners};

/// What stops `connect` from starting, or from building a request; each variant names its cause.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {message}")]
    ConfigFile {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{0}")]
    Secret(String),
    #[error("the {what} is {bytes} bytes; a DICOM User Identity holds at most {limit}")]
    IdentityTooLarge {
        what: &'static str,
        bytes: usize,
        limit: usize,
    },
    #[error(transparent)]
    TlsFiles(#[from] crate::tls::TlsError),
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on the Unix socket {path}: {source}")]
    ListenUnix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Owner(#[from] local::OwnerError),
    #[error("cannot encode the A-ASSOCIATE-RQ for the gateway: {0}")]
    Encode(String),
    #[error("cannot install a signal handler: {0}")]
    Signal(std::io::Error),
}

/// The largest A-ASSOCIATE-RQ taken from a local client.
const MAX_REQUEST_LENGTH: u32 = 256 * 1024;
/// Local associations open at once.
const MAX_ASSOCIATIONS: usize = 64;
/// A PDU larger than this is refused from either side, whatever was announced.
const MAX_RELAY_PDU: u32 = 16 * 1024 * 1024;
/// Item type of the User Identity server response in an A-ASSOCIATE-AC.
const USER_IDENTITY_AC_ITEM: u8 = 0x59;

/// Everything a local association is carried with.
pub struct Tunnel {
    pub gateway: Arc<Gateway>,
    /// Present when move-as-get is on.
    pub move_as_get: Option<Arc<move_as_get::Settings>>,
    /// The ARTIM timer for the local client's A-ASSOCIATE-RQ.
    pub request_timeout: Duration,
    /// No PDU either way for this long: both sides get an A-ABORT.
    pub idle: Duration,
    /// The local users who may use the tunnel.
    pub callers: Callers,
}

/// The rejection a local caller who is not the tunnel's owner (nor an --allow-user) gets:
/// 1/1/1, permanent, service-user, no reason given. It differs from the gateway's 1/2/1 for
/// failed credentials, so the two are told apart.
pub const REFUSED_CALLER: Rejection = Rejection::NotExpected;

/// Accept local associations until `stop` completes; then let those in flight finish for a
/// few seconds before aborting them.
pub async fn serve(
    tunnel: Arc<Tunnel>,
    listeners: Listeners,
    stop: impl std::future::Future<Output = ()>,
) {
    let tasks = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_ASSOCIATIONS));
    let (abort, aborted) = watch::channel(false);
    let accept = async {
        let mut backoff = Duration::from_millis(10);
        loop {
            match listeners.accept().await {
                Ok(caller) => {
                    backoff = Duration::from_millis(10);
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(peer = %caller.peer, "{MAX_ASSOCIATIONS} associations open: connection refused");
                        drop(caller);
                        continue;
                    };
                    let tunnel = tunnel.clone();
                    let aborted = aborted.clone();
                    tasks.spawn(async move {
                        handle(&tunnel, caller, aborted).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(reason = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = stop => {}
    }
    drop(listeners);
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::info!(
            associations = tasks.len(),
            "stopping: aborting open associations"
        );
        abort.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), tasks.wait()).await;
    }
    tracing::info!("stopped");
}

/// An association that ended before the relay.
struct Stop {
    outcome: &'static str,
    reason: String,
}

fn stop(outcome: &'static str, reason: impl Into<String>) -> Stop {
    Stop {
        outcome,
        reason: reason.into(),
    }
}

/// What is known about one association, for its log line.
#[derive(Default)]
struct Seen {
    calling_ae: String,
    called_ae: String,
    identity_confirmed: bool,
    move_as_get: bool,
}

async fn handle(tunnel: &Tunnel, caller: Caller, aborted: watch::Receiver<bool>) {
    let started = Instant::now();
    let mut seen = Seen::default();
    let Caller {
        mut stream,
        peer,
        uid,
    } = caller;
    let owner_uid = tunnel.callers.owner;
    let uid = match uid {
        Ok(uid) if tunnel.callers.admits(uid) => uid,
        refused => {
            refuse_caller(tunnel, &mut stream, &peer, refused, started).await;
            return;
        }
    };
    let result = associate(tunnel, stream, &mut seen, aborted).await;
    let (outcome, reason, stats) = match result {
        Ok((end, stats)) => (
            if end == RelayEnd::Released {
                "released"
            } else {
                "aborted"
            },
            end.reason(),
            stats,
        ),
        Err(s) => (s.outcome, s.reason, RelayStats::default()),
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    if matches!(outcome, "released" | "aborted" | "closed") {
        tracing::info!(
            peer = %peer,
            local_uid = uid,
            owner_uid,
            calling_ae = ?seen.calling_ae,
            called_ae = ?seen.called_ae,
            outcome,
            reason = ?reason,
            identity_confirmed = seen.identity_confirmed,
            move_as_get = seen.move_as_get,
            bytes_to_gateway = stats.from_client,
            bytes_from_gateway = stats.from_archive,
            duration_ms,
            "association"
        );
    } else {
        tracing::warn!(
            peer = %peer,
            local_uid = uid,
            owner_uid,
            calling_ae = ?seen.calling_ae,
            called_ae = ?seen.called_ae,
            outcome,
            reason = ?reason,
            duration_ms,
            "association"
        );
    }
}

/// A caller who is not the owner nor an --allow-user: its A-ASSOCIATE-RQ (ARTIM) is answered
/// 1/1/1 and logged; nothing reaches the gateway.
async fn refuse_caller(
    tunnel: &Tunnel,
    stream: &mut impl Local,
    peer: &str,
    refused: Result<u32, local::OwnerError>,
    started: Instant,
) {
    let owner_uid = tunnel.callers.owner;
    let (mut calling_ae, mut called_ae) = (String::new(), String::new());
    // Phase: the refused caller's A-ASSOCIATE-RQ (ARTIM), answered 1/1/1; nothing reaches the gateway.
    let (local_uid, reason) = match &refused {
        Ok(uid) => (
            Some(*uid),
            format!(
                "local user {uid} is not the user who started connect ({owner_uid}) nor an --allow-user"
            ),
        ),
        Err(e) => (None, format!("the calling local user is unknown: {e}")),
    };
    let answered = match local_request(stream, tunnel.request_timeout).await {
        Ok(rq) => {
            calling_ae = rq.calling_ae_title.trim().to_string();
            called_ae = rq.called_ae_title.trim().to_string();
            refuse(stream, &REFUSED_CALLER.pdu()).await;
            "A-ASSOCIATE-RJ 1/1/1"
        }
        Err(s) => s.outcome,
    };
    tracing::warn!(
        peer = %peer,
        local_uid,
        owner_uid,
        calling_ae = ?calling_ae,
        called_ae = ?called_ae,
        outcome = "refused_local_user",
        reason = ?format!("{reason} ({answered})"),
        duration_ms = started.elapsed().as_millis() as u64,
        "association"
    );
}

/// What a local client's connection is: TCP or the Unix socket.
trait Local: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Local for T {}

/// Send a last PDU to the local client and close (bounded).
async fn refuse(stream: &mut impl Local, bytes: &[u8]) {
    crate::ul::io::send(stream, bytes).await;
}

/// One local association: its request, the gateway's answer, the accept, then the relay.
async fn associate(
    tunnel: &Tunnel,
    mut local: local::LocalStream,
    seen: &mut Seen,
    aborted: watch::Receiver<bool>,
) -> Result<(RelayEnd, RelayStats), Stop> {
    if let local::LocalStream::Tcp(tcp) = &local {
        let _ = tcp.set_nodelay(true);
    }
    let rq = local_request(&mut local, tunnel.request_timeout).await?;
    seen.calling_ae = rq.calling_ae_title.trim().to_string();
    seen.called_ae = rq.called_ae_title.trim().to_string();

    let (to_gateway, own_context) = with_keepalive_context(tunnel, &rq);
    let (mut gw, ac) = open_gateway(tunnel, &mut local, &to_gateway).await?;
    seen.identity_confirmed = ac
        .user_variables
        .iter()
        .any(|v| matches!(v, UserVariableItem::Unknown(USER_IDENTITY_AC_ITEM, _)));
    let accepted = accept_for_client(
        &rq,
        &to_gateway,
        &ac,
        own_context,
        tunnel.move_as_get.is_some(),
    );
    let accept = match link::encode(&Pdu::AssociationAC(accepted.ac)) {
        Ok(b) => b,
        Err(e) => {
            let _ = gw.write_all(&pdu::abort(0)).await;
            refuse(&mut local, &pdu::abort(0)).await;
            return Err(stop("protocol_error", format!("A-ASSOCIATE-AC: {e}")));
        }
    };
    if let Err(e) = write_flush(&mut local, &accept).await {
        let _ = gw.write_all(&pdu::abort(0)).await;
        return Err(stop("aborted", format!("local client: {e}")));
    }

    // Phase: relay, through move-as-get when it is on and the client can send a C-MOVE.
    let limits = RelayLimits {
        from_client: relay_limit(&ac.user_variables),
        from_archive: relay_limit(&rq.user_variables),
        idle: tunnel.idle,
    };
    let moves = accepted
        .contexts
        .values()
        .any(|c| retrieve::get_model(&c.abstract_syntax).is_some());
    let Some(settings) = tunnel.move_as_get.as_ref().filter(|_| moves) else {
        let (end, stats, _) = relay::relay(local, gw, limits, PassThrough, aborted).await;
        return Ok((end, stats));
    };
    seen.move_as_get = true;
    let (tx, rx) = mpsc::channel(16);
    let interceptor = move_as_get::Interceptor::new(
        settings.clone(),
        tunnel.gateway.clone(),
        move_as_get::Association {
            keepalive_context: own_context.filter(|id| accepted.contexts.contains_key(id)),
            contexts: accepted.contexts,
            calling_ae: rq.calling_ae_title.trim().to_string(),
            called_ae: rq.called_ae_title.trim().to_string(),
            to_client_max: association::peer_max_length(&rq.user_variables, MAX_PDU_LENGTH),
            to_gateway_max: association::peer_max_length(&ac.user_variables, MAX_PDU_LENGTH),
            local_only: accepted.local_only,
        },
        tx,
    );
    let keepalive = settings.keepalive;
    Ok(
        move_as_get::relay_with_injection(local, gw, limits, interceptor, rx, keepalive, aborted)
            .await,
    )
}

/// Phase: the local A-ASSOCIATE-RQ, bounded in size and time (ARTIM), parsed.
async fn local_request(local: &mut impl Local, within: Duration) -> Result<AssociationRQ, Stop> {
    use crate::ul::io::RequestError;
    match crate::ul::io::read_request(local, within, MAX_REQUEST_LENGTH).await {
        Ok(rq) => Ok(rq),
        Err(e @ RequestError::Closed) => Err(stop("closed", e.to_string())),
        Err(e) => {
            refuse(local, &pdu::abort(e.abort_reason())).await;
            let outcome = match e {
                RequestError::Timeout => "timeout",
                _ => "protocol_error",
            };
            Err(stop(outcome, e.to_string()))
        }
    }
}

/// The request for the gateway: for a client that may C-MOVE with move-as-get on, plus a
/// Verification context of connect's own (for keep-alives), and its ID.
fn with_keepalive_context(tunnel: &Tunnel, rq: &AssociationRQ) -> (AssociationRQ, Option<u8>) {
    let mut to_gateway = rq.clone();
    let proposes_move = rq
        .presentation_contexts
        .iter()
        .any(|p| retrieve::get_model(p.abstract_syntax.trim_end_matches('\0')).is_some());
    let wanted = tunnel
        .move_as_get
        .as_ref()
        .is_some_and(|s| s.keepalive.is_some())
        && proposes_move;
    let id = wanted
        .then(|| move_as_get::free_context_id(rq.presentation_contexts.iter().map(|p| p.id)))
        .flatten();
    if let Some(id) = id {
        to_gateway
            .presentation_contexts
            .push(PresentationContextProposed {
                id,
                abstract_syntax: move_as_get::VERIFICATION.to_string(),
                transfer_syntaxes: vec![link::IMPLICIT_LE.to_string()],
            });
    }
    (to_gateway, id)
}

/// Phase: TLS to the gateway with the clinician's identity in the request, and the answer. A
/// rejection goes to the local client unchanged and is logged in words; a gateway that cannot be
/// reached, or whose certificate does not verify, gets the local client a 2/3/1.
async fn open_gateway(
    tunnel: &Tunnel,
    local: &mut impl Local,
    rq: &AssociationRQ,
) -> Result<(TlsStream<TcpStream>, AssociationAC), Stop> {
    let request = match tunnel.gateway.request(rq) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(reason = %e, "no credentials for the gateway");
            refuse(local, &Rejection::NotAuthenticated.pdu()).await;
            return Err(stop(
                "credentials",
                format!("{e} (local client rejected 1/2/1)"),
            ));
        }
    };
    let (gw, answer) = match tunnel.gateway.open(&request).await {
        Ok(x) => x,
        Err(e) => {
            let certificate = matches!(e, OpenError::Certificate { .. });
            if certificate {
                tracing::error!(gateway = %tunnel.gateway.address, reason = %e, "gateway certificate verification failed");
            }
            refuse(local, &Rejection::UpstreamUnavailable.pdu()).await;
            return Err(stop(
                if certificate {
                    "certificate_rejected"
                } else {
                    "gateway_unavailable"
                },
                format!("{e} (local client rejected 2/3/1)"),
            ));
        }
    };
    match answer {
        Answer::Accepted(ac) => Ok((gw, ac)),
        Answer::Rejected(rj) => {
            let mut words = format!(
                "gateway rejected the association: {}",
                gateway::rejection_words(&rj)
            );
            if let Some(hint) = tunnel.gateway.rejection_hint() {
                words.push_str("; ");
                words.push_str(&hint);
            }
            tracing::warn!(gateway = %tunnel.gateway.address, credentials = ?tunnel.gateway.credentials, "{words}");
            refuse(local, &rj).await;
            Err(stop("rejected_by_gateway", words))
        }
        Answer::Aborted(abort) => {
            refuse(local, &abort).await;
            Err(stop(
                "aborted_by_gateway",
                format!(
                    "gateway aborted the association request: {}",
                    gateway::abort_words(&abort)
                ),
            ))
        }
    }
}

/// The accept as the local client sees it, and the contexts the relay works with.
struct Accepted {
    ac: AssociationAC,
    contexts: HashMap<u8, association::Context>,
    local_only: HashSet<u8>,
}

/// The gateway's accept without the identity response meant for connect and without connect's
/// own keep-alive context. With move-as-get, a C-MOVE context the archive does not offer is
/// accepted by connect itself (moves to local storage SCPs need no C-MOVE upstream).
fn accept_for_client(
    rq: &AssociationRQ,
    to_gateway: &AssociationRQ,
    ac: &AssociationAC,
    own_context: Option<u8>,
    move_as_get: bool,
) -> Accepted {
    let mut to_client = ac.clone();
    to_client
        .user_variables
        .retain(|v| !matches!(v, UserVariableItem::Unknown(USER_IDENTITY_AC_ITEM, _)));
    to_client
        .presentation_contexts
        .retain(|pc| Some(pc.id) != own_context);
    let mut contexts = association::accepted_contexts(to_gateway, ac);
    let mut local_only = HashSet::new();
    let rejected = to_client
        .presentation_contexts
        .iter_mut()
        .filter(|r| move_as_get && r.reason != PresentationContextResultReason::Acceptance);
    for result in rejected {
        let Some(proposed) = rq.presentation_contexts.iter().find(|p| p.id == result.id) else {
            continue;
        };
        let abstract_syntax = proposed.abstract_syntax.trim_end_matches('\0');
        let ts = proposed
            .transfer_syntaxes
            .iter()
            .map(|t| t.trim_end_matches('\0'))
            .find(|t| *t == link::EXPLICIT_LE || *t == link::IMPLICIT_LE);
        let (Some(ts), Some(_)) = (ts, retrieve::get_model(abstract_syntax)) else {
            continue;
        };
        result.reason = PresentationContextResultReason::Acceptance;
        result.transfer_syntax = ts.to_string();
        local_only.insert(result.id);
        contexts.insert(
            result.id,
            association::Context {
                abstract_syntax: abstract_syntax.to_string(),
                transfer_syntax: ts.to_string(),
            },
        );
    }
    Accepted {
        ac: to_client,
        contexts,
        local_only,
    }
}

/// The largest PDU a side may send: what the receiver announced (0, unlimited, becomes 16 MiB).
fn relay_limit(receiver: &[UserVariableItem]) -> u32 {
    association::limited_max_length(receiver, MAX_RELAY_PDU)
}
