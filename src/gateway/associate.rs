//! One association's way through the gateway, phase by phase: admission to a handshake slot, TLS
//! handshake, A-ASSOCIATE-RQ within the ARTIM timer (PS3.8 9.1.1, 9.3.2), limits on the address,
//! called AE, authentication (User Identity, PS3.7 D.3.3.7), upstream connect and the archive's
//! A-ASSOCIATE-AC, then the relay. Each phase returns `Result<_, Stop>`; a stop is answered on the
//! wire by [`Stop::answer`] and reported by [`super::stop::report`], nowhere else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_ul::pdu::{AssociationAC, AssociationRQ};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::io::{connect_tcp, send, write_flush, write_within};
use super::stop::{Outcome, Stop, Timing, report};
use super::{Bounds, Cap, PendingConnections, PendingSlot, State};
use crate::auth::{self, Principal};
use crate::config::{Config, Upstream};
use crate::metrics::metrics;
use crate::moves::{MovesInProgress, ReturnPeer};
use crate::policy::{Grants, limits::Slot, login};
use crate::relay::{self, RelayEnd, RelayLimits};
use crate::session::{Party, Session};
use crate::tls;
use crate::ul::association::{self, DICOM_APPLICATION_CONTEXT, UpstreamAnswer};
use crate::ul::io::RequestError;
use crate::ul::pdu::{self, Rejection, read_pdu};

/// A connection just accepted, with what its association will need.
pub(super) struct Accepted {
    pub(super) state: Arc<State>,
    pub(super) moves: Arc<MovesInProgress>,
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    /// False on the device listener (plain DICOM).
    pub(super) tls: bool,
    pub(super) pending: Arc<PendingConnections>,
    pub(super) shutdown: watch::Receiver<bool>,
}

/// One accepted connection, from admission to its log line.
pub(super) async fn handle(c: Accepted) {
    let accepted = Instant::now();
    let state = c.state;
    // Phase: admission. The wait for a handshake slot is bounded by `tls_handshake`; the phase timers
    // (TLS handshake, ARTIM) start once the connection holds a slot.
    let bounds = Bounds::from_limits(&state.config.limits);
    let admitted = c
        .pending
        .admit(c.peer.ip(), bounds, state.config.timeouts.tls_handshake)
        .await;
    let admission_ms = accepted.elapsed().as_millis() as u64;
    let (outcome, result) = match admitted {
        Err(cap) => {
            let mut outcome = Outcome::default();
            let Some(stop) =
                refuse_unadmitted(&state, c.stream, c.peer, c.tls, cap, &mut outcome).await
            else {
                return;
            };
            (outcome, Err(stop))
        }
        Ok(permit) => {
            let mut association = Association {
                state: &state,
                peer: c.peer,
                over_tls: c.tls,
                certificate_names: Vec::new(),
                started: Instant::now(),
                moves: c.moves,
                shutdown: c.shutdown,
                outcome: Outcome::default(),
                permit: Some(permit),
                user_slot: None,
            };
            let result = association.run(c.stream).await;
            (association.outcome, result)
        }
    };
    let timing = Timing {
        accepted,
        admission_ms,
    };
    report(&state, c.peer, &outcome, &result, timing);
}

/// What one association's phases share.
struct Association<'a> {
    state: &'a State,
    peer: SocketAddr,
    over_tls: bool,
    /// The names of a verified client certificate.
    certificate_names: Vec<String>,
    /// When the connection got its handshake slot: the TLS and ARTIM timers count from here.
    started: Instant,
    moves: Arc<MovesInProgress>,
    shutdown: watch::Receiver<bool>,
    outcome: Outcome,
    /// The handshake slot, held until the association is authenticated and established.
    permit: Option<PendingSlot>,
    /// The user's open-association slot, held for the association's life.
    user_slot: Option<Slot>,
}

/// What the phases before the relay establish.
struct Established<'a> {
    rq: AssociationRQ,
    ac: AssociationAC,
    upstream: &'a Upstream,
    principal: Principal,
    archive: TcpStream,
    archive_max: u32,
}

impl<'a> Association<'a> {
    /// TLS (on the TLS listener), then the association.
    async fn run(&mut self, stream: TcpStream) -> Result<RelayEnd, Stop> {
        if self.over_tls {
            let (client, names) = handshake(self.state, stream, self.started).await?;
            self.certificate_names = names;
            // Boxed: the TLS state (~1.3 KiB) is then not kept in each phase's future (by value, the
            // phases' arguments and locals each kept room for it).
            self.associate(Box::new(client)).await
        } else {
            let _ = stream.set_nodelay(true);
            self.associate(stream).await
        }
    }

    /// The phases up to the A-ASSOCIATE-AC, then the relay; a stop is answered to the client here.
    async fn associate<S>(&mut self, mut client: S) -> Result<RelayEnd, Stop>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match self.establish(&mut client).await {
            Ok(established) => Ok(self.relay(client, established).await),
            Err(stop) => {
                stop.answer(&mut client).await;
                Err(stop)
            }
        }
    }

    async fn establish<S>(&mut self, client: &mut S) -> Result<Established<'a>, Stop>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let cfg = &self.state.config;
        let rq = request_phase(client, cfg, self.started).await?;
        self.outcome.calling_ae = rq.calling_ae_title.clone();
        self.outcome.called_ae = rq.called_ae_title.clone();
        self.check_address()?;
        // Phase: called AE -> upstream.
        let Some(upstream) = cfg.upstream_for(&rq.called_ae_title) else {
            let reason = format!("called AE {:?} maps to no upstream", rq.called_ae_title);
            return Err(Stop::rejected(Rejection::CalledAeNotRecognized, reason));
        };
        let principal = self.authenticate(&rq).await?;
        let wants_response = association::user_identity(&rq)
            .is_some_and(|i| i.positive_response_requested())
            && principal.method != auth::Method::Certificate;
        let (archive, ac, archive_max) = self
            .open_archive(client, &rq, upstream, wants_response)
            .await?;
        let established = Established {
            rq,
            ac,
            upstream,
            principal,
            archive,
            archive_max,
        };
        self.accepted(&established);
        Ok(established)
    }

    /// Phases: `[audit] on_failure = "refuse"` with an audit file that cannot be written, then the
    /// limits on the address, before any credential is looked at.
    fn check_address(&self) -> Result<(), Stop> {
        // No association that would go unrecorded. 2/3/1 (transient, presentation-related,
        // temporary congestion): the client may try again later, as with an unreachable archive.
        if let Some(why) = self.state.audit.refusing() {
            let stop = Stop::rejected(Rejection::UpstreamUnavailable, why);
            return Err(stop.rule("audit_unavailable"));
        }
        let address = self.peer.ip();
        let limiter = &self.state.limiter;
        if let Err(locked) = limiter.check_locked(None, address) {
            return Err(Stop::rejected(
                Rejection::LocalLimitExceeded,
                locked.to_string(),
            ));
        }
        if !limiter.rates.associations.allow(&address) {
            let reason = "associations_per_minute exceeded for this address";
            return Err(Stop::rejected(Rejection::LocalLimitExceeded, reason));
        }
        Ok(())
    }

    /// Phase: authentication: lock check, credential, the failed-login rule (policy::login), then
    /// the user's open-association slot.
    async fn authenticate(&mut self, rq: &AssociationRQ) -> Result<Principal, Stop> {
        let state = self.state;
        let origin = auth::Origin {
            address: self.peer.ip(),
            calling_ae: &rq.calling_ae_title,
            over_tls: self.over_tls,
        };
        let door = login::Door::Dicom {
            calling_ae: &rq.calling_ae_title,
            called_ae: &rq.called_ae_title,
        };
        let identity = association::user_identity(rq);
        let names = &self.certificate_names;
        let principal = match login::Login::new(&state.limiter, &state.audit, self.peer, door)
            .dicom(&state.authenticator, identity, names, origin)
            .await
        {
            Ok(p) => p,
            Err(refused) => {
                self.outcome.user = refused.user().map(str::to_string);
                self.outcome.method = refused.method().map(|m| m.name());
                // Failed credentials: 1/2/1. Locked out, or password checks busy: 2/3/2 (transient).
                let rejection = if refused.is_failed_login() {
                    Rejection::NotAuthenticated
                } else {
                    Rejection::LocalLimitExceeded
                };
                return Err(Stop::rejected(rejection, refused.to_string()));
            }
        };
        self.outcome.user = Some(principal.user.clone());
        self.outcome.method = Some(principal.method.name());
        match state.limiter.admit(&principal.user) {
            Ok(slot) => self.user_slot = Some(slot),
            Err(full) => {
                return Err(Stop::rejected(
                    Rejection::LocalLimitExceeded,
                    full.to_string(),
                ));
            }
        }
        Ok(principal)
    }

    /// Phase: upstream connect, the archive's answer, and the A-ASSOCIATE-AC to the client.
    async fn open_archive<S>(
        &self,
        client: &mut S,
        rq: &AssociationRQ,
        upstream: &Upstream,
        wants_response: bool,
    ) -> Result<(TcpStream, AssociationAC, u32), Stop>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let cfg = &self.state.config;
        let t = cfg.timeouts;
        let max = cfg.gateway.max_pdu_length;
        let request = association::rewrite_request(rq, &upstream.ae_title, max)
            .map_err(|e| Stop::rejected(Rejection::UpstreamUnavailable, e.to_string()))?;
        let connect = connect_tcp(&upstream.address, t.upstream_connect, "archive");
        let (mut archive, ac) =
            open_upstream(connect, &request, t.upstream_response, "archive").await?;
        let (accept, archive_max) =
            match association::rewrite_accept(&ac, &rq.called_ae_title, wants_response, max) {
                Ok(a) => a,
                Err(e) => {
                    send(&mut archive, &pdu::abort(0)).await;
                    return Err(Stop::rejected(
                        Rejection::UpstreamUnavailable,
                        e.to_string(),
                    ));
                }
            };
        if let Err(e) = write_within(client, &accept, t.association_request).await {
            send(&mut archive, &pdu::abort(0)).await;
            return Err(Stop::Aborted(format!("client: {e}")));
        }
        Ok((archive, ac, archive_max))
    }

    /// The association is established: its debug line, set-up metric and audit event, and the
    /// handshake slot is given back.
    fn accepted(&mut self, e: &Established<'_>) {
        let principal = &e.principal;
        tracing::debug!(target: crate::logfmt::targets::SERVER, peer = %self.peer, user = ?principal.user, "association accepted");
        metrics()
            .association_setup_seconds
            .observe(self.started.elapsed().as_secs_f64());
        self.state.audit.record(
            "association.accepted",
            json!({
                "peer": self.peer.to_string(),
                "user": principal.user,
                "method": principal.method.name(),
                "roles": principal.roles,
                "calling_ae": e.rq.calling_ae_title,
                "called_ae": e.rq.called_ae_title,
                "upstream": e.upstream.address,
            }),
        );
        self.permit = None; // authenticated and established: no longer a pending connection
    }

    /// Phase: relay, with the session's DIMSE policy.
    async fn relay<S>(&mut self, client: S, e: Established<'_>) -> RelayEnd
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let cfg = &self.state.config;
        // C-MOVE results of this association may come back only from this archive: from the
        // addresses configured for it, or else the one the gateway reached it at, calling as its
        // ae_title.
        let return_addresses = match &e.upstream.return_addresses {
            Some(list) => list.clone(),
            None => e
                .archive
                .peer_addr()
                .map(|a| vec![ipnet::IpNet::from(crate::config::unmapped(a.ip()))])
                .unwrap_or_default(),
        };
        let moves = Arc::new(self.moves.for_upstream(ReturnPeer {
            upstream: e.upstream.called_ae.clone(),
            ae_title: e.upstream.ae_title.clone(),
            addresses: return_addresses,
        }));
        // Each peer was told the other's (clamped) maximum; some send a little more. The relay
        // reads anything up to the gateway's own limit, and re-packs what it rebuilds to the
        // receiver's maximum.
        let client_max = association::client_max_pdu(&e.rq, cfg.gateway.max_pdu_length);
        let limits = RelayLimits {
            from_client: cfg.gateway.max_pdu_length,
            from_archive: cfg.gateway.max_pdu_length,
            idle: cfg.timeouts.idle,
        };
        let contexts = association::accepted_contexts(&e.rq, &e.ac);
        let session = Session::new(
            Party {
                peer: self.peer,
                user: e.principal.user.clone(),
                calling_ae: e.rq.calling_ae_title.clone(),
                called_ae: e.rq.called_ae_title.clone(),
            },
            Grants::for_roles(cfg, &e.principal.roles),
            self.state.limiter.clone(),
            moves,
            self.state.audit.clone(),
            contexts,
            client_max,
            e.archive_max,
        );
        metrics().active.inc();
        let shutdown = self.shutdown.clone();
        let (end, stats, session) =
            relay::relay(client, e.archive, limits, session, shutdown).await;
        metrics().active.dec();
        self.outcome.bytes_from_client = stats.from_client;
        self.outcome.bytes_from_archive = stats.from_archive;
        self.outcome.counts = session.counts;
        end
    }
}

/// Connections refused at once or answered after TLS while refusals are in progress at most.
const REFUSALS_AT_ONCE: usize = 64;
/// How long a refusal may take: TLS handshake, A-ASSOCIATE-RQ, A-ASSOCIATE-RJ.
const REFUSAL_WITHIN: Duration = Duration::from_secs(3);

/// A connection that got no handshake slot. One that waited its turn in vain is told so after TLS,
/// with an A-ASSOCIATE-RJ 2/3/2 (transient: local limit exceeded), while few refusals run at once; one
/// turned away from a full queue (the address with the most connections waiting) is closed, with a
/// debug line: that is a flood, and answering each would cost a TLS handshake.
async fn refuse_unadmitted(
    state: &State,
    stream: TcpStream,
    peer: SocketAddr,
    tls: bool,
    cap: Cap,
    outcome: &mut Outcome,
) -> Option<Stop> {
    static REFUSALS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(REFUSALS_AT_ONCE);
    let permit = match cap {
        Cap::Timeout => REFUSALS.try_acquire().ok(),
        Cap::QueueFull | Cap::Evicted => None,
    };
    let Some(_permit) = permit else {
        metrics().refusal(cap.rule());
        tracing::debug!(target: crate::logfmt::targets::SERVER, peer = %peer, outcome = "dropped", reason = %cap, "association");
        return None;
    };
    let started = Instant::now();
    let answer = async {
        if tls {
            let (mut client, _) = handshake(state, stream, started).await?;
            Ok(refuse_request(&mut client, &state.config, started, cap, outcome).await)
        } else {
            let mut client = stream;
            Ok(refuse_request(&mut client, &state.config, started, cap, outcome).await)
        }
    };
    Some(match tokio::time::timeout(REFUSAL_WITHIN, answer).await {
        Ok(stop) => stop.unwrap_or_else(|stop| stop),
        Err(_) => Stop::RefusalTimeout(format!("{cap}; then the refusal timed out")),
    })
}

/// Read the association request and answer it with A-ASSOCIATE-RJ 2/3/2 for `cap`.
async fn refuse_request<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    cfg: &Config,
    started: Instant,
    cap: Cap,
    outcome: &mut Outcome,
) -> Stop {
    let stop = match request_phase(client, cfg, started).await {
        Ok(rq) => {
            outcome.calling_ae = rq.calling_ae_title.clone();
            outcome.called_ae = rq.called_ae_title.clone();
            Stop::rejected(Rejection::LocalLimitExceeded, cap.to_string()).rule(cap.rule())
        }
        Err(stop) => stop,
    };
    stop.answer(client).await;
    stop
}

/// The client side of the DICOM door after TLS.
type TlsClient = tokio_rustls::server::TlsStream<relay::ReadAhead<TcpStream>>;

/// Phase: TLS handshake; returns the stream and the names of a verified client certificate.
async fn handshake(
    state: &State,
    stream: TcpStream,
    started: Instant,
) -> Result<(TlsClient, Vec<String>), Stop> {
    let _ = stream.set_nodelay(true);
    let within = state
        .config
        .timeouts
        .tls_handshake
        .min(state.config.timeouts.association_request);
    let client = match tokio::time::timeout(
        within.saturating_sub(started.elapsed()),
        // rustls reads 4 KiB at a time; the socket is read 64 KiB at a time beneath it.
        state.acceptor.accept(relay::ReadAhead::new(stream)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(Stop::TlsFailed(tls::handshake_failure(&e))),
        Err(_) => return Err(Stop::TlsFailed("TLS handshake timed out".into())),
    };
    let names = client
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|leaf| auth::certificate::names_for(leaf, state.config.tls.client_identity))
        .unwrap_or_default();
    Ok((client, names))
}

/// Phase: the association request, within the ARTIM timer (counted from `started`), bounded in
/// size, parsed, and checked for protocol version and application context. The stop it returns is
/// for the caller to answer ([`Stop::answer`]).
pub(crate) async fn request_phase<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    cfg: &Config,
    started: Instant,
) -> Result<AssociationRQ, Stop> {
    let artim = cfg
        .timeouts
        .association_request
        .saturating_sub(started.elapsed());
    let limit = cfg.gateway.max_association_request_length;
    let rq = crate::ul::io::read_request(client, artim, limit)
        .await
        .map_err(|e| match e {
            RequestError::Closed => Stop::Closed,
            RequestError::Timeout => Stop::RequestTimeout,
            e => Stop::protocol(e.abort_reason(), e.to_string()),
        })?;
    if rq.protocol_version & 1 == 0 {
        let reason = "protocol version 1 not offered";
        return Err(Stop::rejected(Rejection::ProtocolVersion, reason));
    }
    if rq.application_context_name.trim_end_matches('\0') != DICOM_APPLICATION_CONTEXT {
        let reason = "not the DICOM application context";
        return Err(Stop::rejected(Rejection::ApplicationContext, reason));
    }
    Ok(rq)
}

/// Phase: connect to the next hop, send it the (rewritten) request, and read its answer.
/// An A-ASSOCIATE-RJ or A-ABORT from it is to go back to the client as it came
/// ([`Stop::ByUpstream`]); a hop that cannot be reached or does not answer in time gets the client
/// a 2/3/1 rejection.
pub(crate) async fn open_upstream<U>(
    connect: impl std::future::Future<Output = Result<U, String>>,
    request: &[u8],
    within: Duration,
    what: &str,
) -> Result<(U, AssociationAC), Stop>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let unavailable = |reason: String| Stop::rejected(Rejection::UpstreamUnavailable, reason);
    let mut upstream = connect.await.map_err(unavailable)?;
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(within, async {
        write_flush(&mut upstream, request).await?;
        read_pdu(&mut upstream, &mut buf, 1024 * 1024)
            .await
            .map_err(std::io::Error::other)
    })
    .await;
    let answer = match answer {
        Ok(Ok(_)) => association::parse_answer(&buf),
        Ok(Err(e)) => {
            return Err(unavailable(format!(
                "{what} failed during association: {e}"
            )));
        }
        Err(_) => {
            return Err(unavailable(format!(
                "{what} did not answer the association in time"
            )));
        }
    };
    match answer {
        Ok(UpstreamAnswer::Accepted(ac)) => Ok((upstream, ac)),
        Ok(UpstreamAnswer::Refused { pdu_type, bytes }) => {
            let reason = if pdu_type == pdu::A_ASSOCIATE_RJ {
                format!(
                    "{what} rejected the association ({}/{}/{})",
                    bytes.get(7).copied().unwrap_or(0),
                    bytes.get(8).copied().unwrap_or(0),
                    bytes.get(9).copied().unwrap_or(0)
                )
            } else {
                format!("{what} aborted the association request")
            };
            Err(Stop::ByUpstream {
                answer: bytes,
                reason,
            })
        }
        Err(e) => {
            send(&mut upstream, &pdu::abort(0)).await;
            Err(unavailable(format!("{what}: {e}")))
        }
    }
}
