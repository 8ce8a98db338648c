//! Why an association ended before the relay, as a typed [`Stop`], and the one place each end becomes
//! what the peer and the operator see: [`Stop::answer`] writes its A-ASSOCIATE-RJ (PS3.8 9.3.4) or
//! A-ABORT (PS3.8 9.3.8) and [`report`] writes its log line, metrics and audit event (in the manner
//! of linkerd2-proxy's `ServerRescue`: phases return typed errors, one function turns them into
//! the wire answer, one into labels).

use std::net::SocketAddr;
use std::time::Instant;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};

use super::State;
use super::io::send;
use crate::metrics::{DirectionLabels, OutcomeLabels, metrics};
use crate::relay::{self, RelayEnd};
use crate::ul::pdu::{self, Rejection};

/// An association that ended before the relay. Each variant fixes its answer on the wire, its
/// `outcome` (log line, audit `outcome`, metric label) and its `kind` (audit `rule`, metric `reason`).
#[derive(Debug)]
pub(crate) enum Stop {
    /// The peer closed before sending an A-ASSOCIATE-RQ. No answer.
    Closed,
    /// The TLS handshake failed or ran out of time. No answer.
    TlsFailed(String),
    /// The ARTIM timer ran out before the A-ASSOCIATE-RQ: A-ABORT 0.
    RequestTimeout,
    /// The refusal of a connection that got no handshake slot took too long. No answer.
    RefusalTimeout(String),
    /// Not a usable A-ASSOCIATE-RQ: A-ABORT with `abort` as its reason, if any.
    Protocol { abort: Option<u8>, reason: String },
    /// The gateway refuses: A-ASSOCIATE-RJ `rejection`; `rule` names the rule that refused.
    Rejected {
        rejection: Rejection,
        rule: &'static str,
        reason: String,
    },
    /// The next hop refused (A-ASSOCIATE-RJ or A-ABORT): its answer goes back as it came.
    ByUpstream { answer: Vec<u8>, reason: String },
    /// The peer did not take the A-ASSOCIATE-AC. No answer.
    Aborted(String),
    /// The return listener does not admit this address. No answer.
    Refused(String),
}

impl Stop {
    /// A refusal with A-ASSOCIATE-RJ `rejection`, under the rule of the rejection's own name.
    pub(crate) fn rejected(rejection: Rejection, reason: impl Into<String>) -> Stop {
        Stop::Rejected {
            rejection,
            rule: rejection.name(),
            reason: reason.into(),
        }
    }

    /// A-ABORT `abort` for a request that is not a usable A-ASSOCIATE-RQ.
    pub(crate) fn protocol(abort: u8, reason: impl Into<String>) -> Stop {
        Stop::Protocol {
            abort: Some(abort),
            reason: reason.into(),
        }
    }

    /// The same stop under another rule name (metrics label, audit `rule`).
    pub(crate) fn rule(self, name: &'static str) -> Stop {
        match self {
            Stop::Rejected {
                rejection, reason, ..
            } => Stop::Rejected {
                rejection,
                rule: name,
                reason,
            },
            other => other,
        }
    }

    /// The outcome word of the log line, the audit event and the metric.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Stop::Closed => "closed",
            Stop::TlsFailed(_) => "tls_failed",
            Stop::RequestTimeout | Stop::RefusalTimeout(_) => "timeout",
            Stop::Protocol { .. } => "protocol_error",
            Stop::Rejected { .. } => "rejected",
            Stop::ByUpstream { .. } => "rejected_by_upstream",
            Stop::Aborted(_) => "aborted",
            Stop::Refused(_) => "refused",
        }
    }

    /// A short, fixed name for the reason (metrics label, audit `rule`).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Stop::Rejected { rule, .. } => rule,
            other => other.outcome(),
        }
    }

    /// The reason, in words, for the log line and the audit event.
    pub(crate) fn reason(&self) -> String {
        match self {
            Stop::Closed => "closed before A-ASSOCIATE-RQ".into(),
            Stop::RequestTimeout => "association request timed out (ARTIM)".into(),
            Stop::Rejected {
                rejection, reason, ..
            } => {
                let (r, s, why) = rejection.codes();
                format!("{reason} ({r}/{s}/{why})")
            }
            Stop::TlsFailed(reason)
            | Stop::RefusalTimeout(reason)
            | Stop::Protocol { reason, .. }
            | Stop::ByUpstream { reason, .. }
            | Stop::Aborted(reason)
            | Stop::Refused(reason) => reason.clone(),
        }
    }

    /// Tell the peer, best effort: the one place a stop becomes bytes on the wire.
    pub(crate) async fn answer<S: AsyncRead + AsyncWrite + Unpin>(&self, peer: &mut S) {
        match self {
            Stop::RequestTimeout => send(peer, &pdu::abort(0)).await,
            Stop::Protocol {
                abort: Some(reason),
                ..
            } => send(peer, &pdu::abort(*reason)).await,
            Stop::Rejected { rejection, .. } => send(peer, &rejection.pdu()).await,
            Stop::ByUpstream { answer, .. } => send(peer, answer).await,
            Stop::Closed
            | Stop::TlsFailed(_)
            | Stop::RefusalTimeout(_)
            | Stop::Protocol { abort: None, .. }
            | Stop::Aborted(_)
            | Stop::Refused(_) => {}
        }
    }
}

/// What is known about one association, for its log line.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) user: Option<String>,
    pub(super) method: Option<&'static str>,
    pub(super) calling_ae: String,
    pub(super) called_ae: String,
    pub(super) bytes_from_client: u64,
    pub(super) bytes_from_archive: u64,
    pub(super) counts: crate::session::Counts,
}

/// The fixed reason name of a relay's end (metrics label).
fn end_kind(end: &RelayEnd) -> &'static str {
    use relay::Side;
    match end {
        RelayEnd::Released => "released",
        RelayEnd::Aborted(Side::Requestor) => "aborted_by_client",
        RelayEnd::Aborted(Side::Acceptor) => "aborted_by_upstream",
        RelayEnd::Closed(Side::Requestor) => "client_closed",
        RelayEnd::Closed(Side::Acceptor) => "upstream_closed",
        RelayEnd::Failed(Side::Requestor, _) => "client_failed",
        RelayEnd::Failed(Side::Acceptor, _) => "upstream_failed",
        RelayEnd::IdleTimeout => "idle_timeout",
        RelayEnd::Shutdown => "shutdown",
    }
}

/// How an association ended, in the words its log line, metrics and audit event use.
struct Ending {
    outcome: &'static str,
    kind: &'static str,
    reason: String,
    /// `association.ended` (it was relayed, or accepted by the archive) or `association.rejected`.
    event: &'static str,
}

impl Ending {
    fn of(result: &Result<RelayEnd, Stop>) -> Ending {
        match result {
            Ok(end) => Ending {
                outcome: match end {
                    RelayEnd::Released => "released",
                    _ => "aborted",
                },
                kind: end_kind(end),
                reason: end.reason(),
                event: "association.ended",
            },
            Err(stop) => Ending {
                outcome: stop.outcome(),
                kind: stop.kind(),
                reason: stop.reason(),
                event: match stop {
                    Stop::Aborted(_) => "association.ended",
                    _ => "association.rejected",
                },
            },
        }
    }
}

/// When an association began and what it saw, for [`report`].
pub(super) struct Timing {
    /// When the connection was accepted.
    pub(super) accepted: Instant,
    /// How long it waited for a handshake slot.
    pub(super) admission_ms: u64,
}

/// The end of one association: its metrics, its audit event (when it sent an A-ASSOCIATE-RQ) and
/// its one log line.
pub(super) fn report(
    state: &State,
    peer: SocketAddr,
    outcome: &Outcome,
    result: &Result<RelayEnd, Stop>,
    timing: Timing,
) {
    let ending = Ending::of(result);
    let m = metrics();
    m.associations
        .get_or_create(&OutcomeLabels {
            outcome: ending.outcome,
            reason: ending.kind,
        })
        .inc();
    if matches!(result, Err(Stop::TlsFailed(_))) {
        m.tls_handshake_failures.inc();
    }
    if matches!(result, Err(Stop::Rejected { .. })) {
        m.refusal(ending.kind);
    }
    m.bytes
        .get_or_create(&DirectionLabels {
            direction: "from_client",
        })
        .inc_by(outcome.bytes_from_client);
    m.bytes
        .get_or_create(&DirectionLabels {
            direction: "from_upstream",
        })
        .inc_by(outcome.bytes_from_archive);
    let started = timing.accepted;
    // Connections that never sent an association request are not audit events (scanners, probes).
    if !outcome.calling_ae.is_empty() {
        state.audit.record(
            ending.event,
            json!({
                "peer": peer.to_string(),
                "user": outcome.user,
                "method": outcome.method,
                "calling_ae": outcome.calling_ae,
                "called_ae": outcome.called_ae,
                "outcome": ending.outcome,
                "rule": ending.kind,
                "reason": ending.reason,
                "bytes_from_client": outcome.bytes_from_client,
                "bytes_from_upstream": outcome.bytes_from_archive,
                "duration_ms": started.elapsed().as_millis() as u64,
            }),
        );
    }
    tracing::info!(target: crate::logfmt::targets::SERVER, peer = %peer,
        user = outcome.user.as_deref().unwrap_or("-"),
        method = outcome.method.unwrap_or("-"),
        calling_ae = ?outcome.calling_ae,
        called_ae = ?outcome.called_ae,
        outcome = ending.outcome,
        reason = ?ending.reason,
        admission_ms = timing.admission_ms,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_from_client = outcome.bytes_from_client,
        bytes_from_archive = outcome.bytes_from_archive,
        requests = outcome.counts.requests,
        refused = outcome.counts.refused,
        "association"
    );
}
