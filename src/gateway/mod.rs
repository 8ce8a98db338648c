//! The accept loop and one association's way through the gateway: TLS, A-ASSOCIATE-RQ, called AE,
//! authentication, upstream connect, the archive's answer, then the relay. One log line per association.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::audit::Audit;
use crate::auth::{self, Authenticator, Principal};
use crate::config::Config;
use crate::metrics::{DirectionLabels, OutcomeLabels, UpstreamLabels, metrics};
use crate::moves::{DestinationConnectors, MovesInProgress, ReturnPeer};
use crate::policy::{Grants, Limiter, login};
use crate::relay::{self, RelayLimits};
use crate::session::{Party, Session};
use crate::tls;
use crate::ul::association::{self, DICOM_APPLICATION_CONTEXT, UpstreamAnswer};
use crate::ul::pdu::{self, PduError, Rejection, read_pdu};
use dicom_ul::pdu::{AssociationAC, AssociationRQ};
use serde_json::json;
use tokio_util::task::TaskTracker;

/// Errors that stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Jwt(#[from] auth::jwt::JwtSetupError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{key}: cannot listen on {address}: {source}")]
    Listener {
        /// The configuration key of the listener (`gateway.return_listen`, `http.listen`, ...).
        key: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything a new association is judged by; replaced whole on reload, never changed in place.
pub struct State {
    pub config: Config,
    /// The DICOM door's TLS (no ALPN, no resumption).
    pub acceptor: TlsAcceptor,
    /// The web door's TLS (ALPN http/1.1), a config and session state of its own.
    pub web_acceptor: TlsAcceptor,
    pub authenticator: Authenticator,
    pub limiter: Arc<Limiter>,
    pub destinations: DestinationConnectors,
    pub audit: Arc<Audit>,
    /// Who may read the admin port's `/metrics`, and its TLS.
    pub admin: crate::admin::AdminAccess,
}

impl State {
    pub fn new(config: Config) -> Result<State, ServerError> {
        let acceptor = TlsAcceptor::from(tls::server_config_for(&config.tls, tls::Door::Dicom)?);
        let web_acceptor = TlsAcceptor::from(tls::server_config_for(&config.tls, tls::Door::Web)?);
        let authenticator = Authenticator::new(&config)?;
        let limiter = Arc::new(Limiter::new(&config));
        let destinations = DestinationConnectors::new(&config)?;
        let audit = Arc::new(Audit::open(config.audit.as_ref())?);
        metrics().prepare_upstreams(&config);
        let admin = crate::admin::AdminAccess::load(&config)?;
        Ok(State {
            config,
            acceptor,
            web_acceptor,
            authenticator,
            limiter,
            destinations,
            audit,
            admin,
        })
    }
}

/// The running gateway's shared state.
#[derive(Clone)]
pub struct Gateway {
    state: Arc<RwLock<Arc<State>>>,
    /// Connections of the TLS and device listeners that have not authenticated yet.
    pending: Arc<PendingConnections>,
    /// Connections of the return listener that have not been admitted yet.
    return_pending: Arc<PendingConnections>,
    /// C-MOVEs in progress, for the return path.
    pub moves: Arc<MovesInProgress>,
    /// Every association task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Set to true when the shutdown grace period is over: relays abort.
    abort: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Gateway {
    pub fn new(state: State) -> Gateway {
        // The first write to the audit file: with `on_failure = "refuse"`, a file that cannot be
        // written refuses the first association already.
        state.audit.record(
            "started",
            json!({"version": env!("CARGO_PKG_VERSION"), "path": state.config.path.display().to_string()}),
        );
        Gateway {
            state: Arc::new(RwLock::new(Arc::new(state))),
            pending: Arc::default(),
            return_pending: Arc::default(),
            moves: Arc::default(),
            tasks: TaskTracker::new(),
            abort: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// The state new associations start with.
    pub fn current(&self) -> Arc<State> {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Bind the TLS listener named in the configuration (for an embedder that serves only that one;
    /// `pacsgate run` binds every listener through `listeners`).
    pub async fn bind(&self) -> Result<TcpListener, ServerError> {
        let address = self.current().config.gateway.listen;
        TcpListener::bind(address)
            .await
            .map_err(|source| ServerError::Listen { address, source })
    }

    /// The pending-connection pool of the return listener.
    pub(crate) fn return_pending(&self) -> &Arc<PendingConnections> {
        &self.return_pending
    }

    /// The pending-connection pool of the TLS and device listeners, which the web door shares.
    pub(crate) fn pending(&self) -> &Arc<PendingConnections> {
        &self.pending
    }

    /// Reload, first step: re-read and validate the configuration file and build what new
    /// associations will need (users, roles, devices, JWT keys, certificates and CRLs, destinations,
    /// audit). Nothing is in force yet; an error leaves everything as it was. The limiter is the
    /// running one: its records (lockouts, failure counts, rate buckets, open associations) carry
    /// over, and [`Gateway::install`] gives it the new `[limits]`.
    pub fn load_next(&self) -> Result<State, ServerError> {
        let old = self.current();
        let mut state = Config::load(&old.config.path)
            .map_err(ServerError::from)
            .and_then(State::new)?;
        state.limiter = old.limiter.clone();
        Ok(state)
    }

    /// Reload, last step: new associations get `state`. Associations in flight keep the state they
    /// started with, but share the limiter, which now applies the new `[limits]`.
    pub fn install(&self, state: State) {
        let old = self.current();
        let path = state.config.path.clone();
        let limits_changed = state.config.limits != old.config.limits;
        state.limiter.reconfigure(&state.config.limits);
        let users = state.config.users.len();
        state.audit.record(
            "reload",
            json!({"outcome": "ok", "path": path.display().to_string(), "users": users}),
        );
        match self.state.write() {
            Ok(mut s) => *s = Arc::new(state),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(state),
        }
        metrics()
            .reloads
            .get_or_create(&OutcomeLabels {
                outcome: "ok",
                reason: "sighup",
            })
            .inc();
        tracing::info!(
            path = %path.display(),
            users,
            limits_changed,
            "configuration reloaded"
        );
    }

    /// A reload that did not happen: one log line, an audit event and a metric; the running
    /// configuration stays in force.
    pub fn refuse_reload(&self, error: &ServerError) {
        let old = self.current();
        let path = old.config.path.display().to_string();
        old.audit.record(
            "reload",
            json!({"outcome": "refused", "path": path, "reason": error.to_string()}),
        );
        metrics()
            .reloads
            .get_or_create(&OutcomeLabels {
                outcome: "refused",
                reason: "sighup",
            })
            .inc();
        tracing::error!(path = %path, reason = %error, "configuration reload refused; the previous configuration stays in force");
    }

    /// A receiver that turns true when relays must abort (the end of the shutdown grace period).
    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.abort.subscribe()
    }

    /// Graceful shutdown, once the listeners are no longer served: wait up to `grace` for the
    /// associations in flight, then abort the rest (A-ABORT both ways) and wait for them to close.
    pub async fn drain(&self, grace: Duration) {
        self.tasks.close();
        let open = self.tasks.len();
        if open > 0 {
            tracing::info!(
                associations = open,
                grace_s = grace.as_secs_f64(),
                "waiting for associations to finish"
            );
        }
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                associations = self.tasks.len(),
                "grace period over: aborting the remaining associations"
            );
            self.abort.send_replace(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        }
    }

    /// Accept associations until the task is dropped. `tls` is false on the device listener.
    pub async fn serve(&self, listener: TcpListener, tls: bool) {
        let mut backoff = Duration::from_millis(10);
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    let state = self.current();
                    let moves = self.moves.clone();
                    let shutdown = self.abort.subscribe();
                    let pending = self.pending.clone();
                    // Admission (a bounded wait for a handshake slot) runs in the connection's own
                    // task: the accept loop never waits, so no address holds up another's accept.
                    self.tasks.spawn(async move {
                        handle(state, moves, stream, peer, tls, pending, shutdown).await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(reason = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

pub(crate) use crate::policy::limits::{Bounds, Cap, PendingConnections, PendingSlot};

/// What is known about one association, for its log line.
#[derive(Default)]
struct Outcome {
    user: Option<String>,
    method: Option<&'static str>,
    calling_ae: String,
    called_ae: String,
    bytes_from_client: u64,
    bytes_from_archive: u64,
    counts: crate::session::Counts,
}

/// An association that ended before the relay, with the reason for the log.
pub(crate) struct Stop {
    pub(crate) outcome: &'static str,
    /// A short, fixed name for the reason (metrics label, audit `rule`).
    pub(crate) kind: &'static str,
    pub(crate) reason: String,
}

impl Stop {
    pub(crate) fn new(outcome: &'static str, reason: impl Into<String>) -> Stop {
        Stop {
            outcome,
            kind: outcome,
            reason: reason.into(),
        }
    }

    pub(crate) fn kind(mut self, kind: &'static str) -> Stop {
        self.kind = kind;
        self
    }
}

/// The fixed reason name of a relay's end (metrics label).
fn end_kind(end: &relay::RelayEnd) -> &'static str {
    use relay::{RelayEnd, Side};
    match end {
        RelayEnd::Released => "released",
        RelayEnd::Aborted(Side::Client) => "aborted_by_client",
        RelayEnd::Aborted(Side::Archive) => "aborted_by_upstream",
        RelayEnd::Closed(Side::Client) => "client_closed",
        RelayEnd::Closed(Side::Archive) => "upstream_closed",
        RelayEnd::Failed(Side::Client, _) => "client_failed",
        RelayEnd::Failed(Side::Archive, _) => "upstream_failed",
        RelayEnd::IdleTimeout => "idle_timeout",
        RelayEnd::Shutdown => "shutdown",
    }
}

async fn handle(
    state: Arc<State>,
    moves: Arc<MovesInProgress>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: bool,
    pending: Arc<PendingConnections>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let accepted = Instant::now();
    let mut outcome = Outcome::default();
    // Phase: admission. The wait for a handshake slot is bounded by `tls_handshake`; the phase timers
    // (TLS handshake, ARTIM) start once the connection holds a slot.
    let bounds = Bounds::from_limits(&state.config.limits);
    let admitted = pending
        .admit(peer.ip(), bounds, state.config.timeouts.tls_handshake)
        .await;
    let admission_ms = accepted.elapsed().as_millis() as u64;
    let started = Instant::now();
    let result = match admitted {
        Err(cap) => refuse_unadmitted(&state, stream, peer, tls, cap, &mut outcome).await,
        Ok(permit) => Some(
            associate_connection(
                &state,
                moves,
                stream,
                peer,
                tls,
                permit,
                shutdown,
                &mut outcome,
                started,
            )
            .await,
        ),
    };
    let Some(result) = result else {
        return;
    };
    let started = accepted;
    let (result_name, kind, reason) = match result {
        Ok(end) => (
            match end {
                relay::RelayEnd::Released => "released",
                _ => "aborted",
            },
            end_kind(&end),
            end.reason(),
        ),
        Err(stop) => (stop.outcome, stop.kind, stop.reason),
    };
    let m = metrics();
    m.associations
        .get_or_create(&OutcomeLabels {
            outcome: result_name,
            reason: kind,
        })
        .inc();
    if result_name == "tls_failed" {
        m.tls_handshake_failures.inc();
    }
    if result_name == "rejected" {
        m.refusal(kind);
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
    // Connections that never sent an association request are not audit events (scanners, probes).
    if !outcome.calling_ae.is_empty() {
        let event = match result_name {
            "released" | "aborted" => "association.ended",
            _ => "association.rejected",
        };
        state.audit.record(
            event,
            json!({
                "peer": peer.to_string(),
                "user": outcome.user,
                "method": outcome.method,
                "calling_ae": outcome.calling_ae,
                "called_ae": outcome.called_ae,
                "outcome": result_name,
                "rule": kind,
                "reason": reason,
                "bytes_from_client": outcome.bytes_from_client,
                "bytes_from_upstream": outcome.bytes_from_archive,
                "duration_ms": started.elapsed().as_millis() as u64,
            }),
        );
    }
    tracing::info!(
        peer = %peer,
        user = outcome.user.as_deref().unwrap_or("-"),
        method = outcome.method.unwrap_or("-"),
        calling_ae = ?outcome.calling_ae,
        called_ae = ?outcome.called_ae,
        outcome = result_name,
        reason = ?reason,
        admission_ms,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_from_client = outcome.bytes_from_client,
        bytes_from_archive = outcome.bytes_from_archive,
        requests = outcome.counts.requests,
        refused = outcome.counts.refused,
        "association"
    );
}

/// A connection that holds a handshake slot: TLS (on the TLS listener), then the association.
#[allow(clippy::too_many_arguments)]
async fn associate_connection(
    state: &Arc<State>,
    moves: Arc<MovesInProgress>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: bool,
    permit: PendingSlot,
    shutdown: tokio::sync::watch::Receiver<bool>,
    outcome: &mut Outcome,
    started: Instant,
) -> Result<relay::RelayEnd, Stop> {
    if tls {
        match handshake(state, stream, started).await {
            Ok((client, names)) => {
                associate(
                    state, moves, client, peer, &names, true, outcome, started, permit, shutdown,
                )
                .await
            }
            Err(stop) => Err(stop),
        }
    } else {
        let _ = stream.set_nodelay(true);
        associate(
            state,
            moves,
            stream,
            peer,
            &[],
            false,
            outcome,
            started,
            permit,
            shutdown,
        )
        .await
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
) -> Option<Result<relay::RelayEnd, Stop>> {
    static REFUSALS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(REFUSALS_AT_ONCE);
    let permit = match cap {
        Cap::Timeout => REFUSALS.try_acquire().ok(),
        Cap::QueueFull | Cap::Evicted => None,
    };
    let Some(_permit) = permit else {
        metrics().refusal(cap.rule());
        tracing::debug!(peer = %peer, outcome = "dropped", reason = %cap, "association");
        return None;
    };
    let started = Instant::now();
    let answer = async {
        if tls {
            let (mut client, _) = handshake(state, stream, started).await?;
            refuse_request(&mut client, &state.config, started, cap, outcome).await
        } else {
            let mut client = stream;
            refuse_request(&mut client, &state.config, started, cap, outcome).await
        }
    };
    Some(Err(
        match tokio::time::timeout(REFUSAL_WITHIN, answer).await {
            Ok(stop) => stop.unwrap_or_else(|stop| stop),
            Err(_) => Stop::new("timeout", format!("{cap}; then the refusal timed out")),
        },
    ))
}

/// Read the association request and answer it with A-ASSOCIATE-RJ 2/3/2 for `cap`.
async fn refuse_request<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    cfg: &Config,
    started: Instant,
    cap: Cap,
    outcome: &mut Outcome,
) -> Result<Stop, Stop> {
    let rq = read_request(client, cfg, started).await?;
    outcome.calling_ae = rq.calling_ae_title.clone();
    outcome.called_ae = rq.called_ae_title.clone();
    Ok(
        reject(client, Rejection::LocalLimitExceeded, cap.to_string())
            .await
            .kind(cap.rule()),
    )
}

/// Phase: TLS handshake; returns the stream and the names of a verified client certificate.
async fn handshake(
    state: &State,
    stream: TcpStream,
    started: Instant,
) -> Result<
    (
        tokio_rustls::server::TlsStream<relay::ReadAhead<TcpStream>>,
        Vec<String>,
    ),
    Stop,
> {
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
        Ok(Err(e)) => return Err(Stop::new("tls_failed", tls::handshake_failure(&e))),
        Err(_) => return Err(Stop::new("tls_failed", "TLS handshake timed out")),
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

#[allow(clippy::too_many_arguments)]
async fn associate<S: AsyncRead + AsyncWrite + Unpin>(
    state: &State,
    moves: Arc<MovesInProgress>,
    mut client: S,
    peer: SocketAddr,
    certificate_names: &[String],
    over_tls: bool,
    outcome: &mut Outcome,
    started: Instant,
    permit: PendingSlot,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<relay::RelayEnd, Stop> {
    let cfg = &state.config;
    let t = cfg.timeouts;

    let rq = read_request(&mut client, cfg, started).await?;
    outcome.calling_ae = rq.calling_ae_title.clone();
    outcome.called_ae = rq.called_ae_title.clone();

    // Phase: `[audit] on_failure = "refuse"` and the audit file cannot be written: no association
    // that would go unrecorded. 2/3/1 (transient, presentation-related, temporary congestion): the
    // client may try again later, as with an unreachable archive.
    if let Some(why) = state.audit.refusing() {
        let stop = reject(&mut client, Rejection::UpstreamUnavailable, why).await;
        return Err(stop.kind("audit_unavailable"));
    }

    // Phase: limits on the address, before any credential is looked at.
    let address = peer.ip();
    let limiter = &state.limiter;
    if let Err(locked) = limiter.check_locked(None, address) {
        return Err(reject(
            &mut client,
            Rejection::LocalLimitExceeded,
            locked.to_string(),
        )
        .await);
    }
    if !limiter.rates.associations.allow(&address) {
        let reason = "associations_per_minute exceeded for this address";
        return Err(reject(&mut client, Rejection::LocalLimitExceeded, reason).await);
    }

    // Phase: called AE -> upstream.
    let Some(upstream) = cfg.upstream_for(&rq.called_ae_title) else {
        let reason = format!("called AE {:?} maps to no upstream", rq.called_ae_title);
        return Err(reject(&mut client, Rejection::CalledAeNotRecognized, reason).await);
    };

    // Phase: authentication: lock check, credential, the failed-login rule (policy::login).
    let identity = association::user_identity(&rq);
    let origin = auth::Origin {
        address,
        calling_ae: &rq.calling_ae_title,
        over_tls,
    };
    let door = login::Door::Dicom {
        calling_ae: &rq.calling_ae_title,
        called_ae: &rq.called_ae_title,
    };
    let principal: Principal = match login::Login::new(limiter, &state.audit, peer, door)
        .dicom(&state.authenticator, identity, certificate_names, origin)
        .await
    {
        Ok(p) => p,
        Err(refused) => {
            outcome.user = refused.user().map(str::to_string);
            outcome.method = refused.method().map(|m| m.name());
            // Failed credentials: 1/2/1. Locked out, or password checks busy: 2/3/2 (transient).
            let rejection = if refused.is_failed_login() {
                Rejection::NotAuthenticated
            } else {
                Rejection::LocalLimitExceeded
            };
            return Err(reject(&mut client, rejection, refused.to_string()).await);
        }
    };
    outcome.user = Some(principal.user.clone());
    outcome.method = Some(principal.method.name());
    let _slot = match limiter.admit(&principal.user) {
        Ok(slot) => slot,
        Err(full) => {
            return Err(reject(&mut client, Rejection::LocalLimitExceeded, full.to_string()).await);
        }
    };
    let wants_response = identity.is_some_and(|i| i.positive_response_requested())
        && principal.method != auth::Method::Certificate;

    // Phase: upstream connect and the archive's answer.
    let request =
        match association::rewrite_request(&rq, &upstream.ae_title, cfg.gateway.max_pdu_length) {
            Ok(r) => r,
            Err(e) => {
                return Err(
                    reject(&mut client, Rejection::UpstreamUnavailable, e.to_string()).await,
                );
            }
        };
    let connect = connect_tcp(&upstream.address, t.upstream_connect, "archive");
    let (mut archive, ac) = open_upstream(
        &mut client,
        connect,
        &request,
        t.upstream_response,
        "archive",
    )
    .await?;
    let (accept, archive_max) = match association::rewrite_accept(
        &ac,
        &rq.called_ae_title,
        wants_response,
        cfg.gateway.max_pdu_length,
    ) {
        Ok(a) => a,
        Err(e) => {
            send(&mut archive, &pdu::abort(0)).await;
            return Err(reject(&mut client, Rejection::UpstreamUnavailable, e.to_string()).await);
        }
    };
    if let Err(e) = write_within(&mut client, &accept, t.association_request).await {
        send(&mut archive, &pdu::abort(0)).await;
        return Err(Stop::new("aborted", format!("client: {e}")));
    }
    tracing::debug!(peer = %peer, user = ?principal.user, "association accepted");
    metrics()
        .association_setup_seconds
        .observe(started.elapsed().as_secs_f64());
    state.audit.record(
        "association.accepted",
        json!({
            "peer": peer.to_string(),
            "user": principal.user,
            "method": principal.method.name(),
            "roles": principal.roles,
            "calling_ae": rq.calling_ae_title,
            "called_ae": rq.called_ae_title,
            "upstream": upstream.address,
        }),
    );
    drop(permit); // authenticated and established: no longer a pending connection

    // C-MOVE results of this association may come back only from this archive: from the addresses
    // configured for it, or else the one the gateway reached it at, calling as its ae_title.
    let return_addresses = match &upstream.return_addresses {
        Some(list) => list.clone(),
        None => archive
            .peer_addr()
            .map(|a| vec![ipnet::IpNet::from(crate::config::unmapped(a.ip()))])
            .unwrap_or_default(),
    };
    let moves = Arc::new(moves.for_upstream(ReturnPeer {
        upstream: upstream.called_ae.clone(),
        ae_title: upstream.ae_title.clone(),
        addresses: return_addresses,
    }));

    // Phase: relay.
    // Each peer was told the other's (clamped) maximum; some send a little more. The relay reads
    // anything up to the gateway's own limit, and re-packs what it rebuilds to the receiver's maximum.
    let client_max = association::client_max_pdu(&rq, cfg.gateway.max_pdu_length);
    let limits = RelayLimits {
        from_client: cfg.gateway.max_pdu_length,
        from_archive: cfg.gateway.max_pdu_length,
        idle: t.idle,
    };
    let contexts = association::accepted_contexts(&rq, &ac);
    let session = Session::new(
        Party {
            peer,
            user: principal.user.clone(),
            calling_ae: rq.calling_ae_title.clone(),
            called_ae: rq.called_ae_title.clone(),
        },
        Grants::for_roles(cfg, &principal.roles),
        state.limiter.clone(),
        moves,
        state.audit.clone(),
        contexts,
        client_max,
        archive_max,
    );
    metrics().active.inc();
    let (end, stats, session) = relay::relay(client, archive, limits, session, shutdown).await;
    metrics().active.dec();
    outcome.bytes_from_client = stats.from_client;
    outcome.bytes_from_archive = stats.from_archive;
    outcome.counts = session.counts;
    Ok(end)
}

fn connect_failed(address: &str) {
    metrics()
        .upstream_connect_failures
        .get_or_create(&UpstreamLabels {
            upstream: address.to_string(),
        })
        .inc();
}

/// Phase: the association request, within the ARTIM timer (counted from accept), bounded in size,
/// parsed, and checked for protocol version and application context.
pub(crate) async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    cfg: &Config,
    started: Instant,
) -> Result<AssociationRQ, Stop> {
    let artim = cfg
        .timeouts
        .association_request
        .saturating_sub(started.elapsed());
    let mut buf = Vec::new();
    let limit = cfg.gateway.max_association_request_length;
    let pdu_type = match tokio::time::timeout(artim, read_pdu(client, &mut buf, limit)).await {
        Ok(Ok(t)) => t,
        Ok(Err(PduError::Closed)) => {
            return Err(Stop::new("closed", "closed before A-ASSOCIATE-RQ"));
        }
        Ok(Err(e)) => {
            send(client, &pdu::abort(2)).await;
            return Err(Stop::new(
                "protocol_error",
                format!("association request: {e}"),
            ));
        }
        Err(_) => {
            send(client, &pdu::abort(0)).await;
            return Err(Stop::new(
                "timeout",
                "association request timed out (ARTIM)",
            ));
        }
    };
    if pdu_type != pdu::A_ASSOCIATE_RQ {
        send(client, &pdu::abort(1)).await;
        return Err(Stop::new(
            "protocol_error",
            format!("PDU type {pdu_type:#04x} before A-ASSOCIATE-RQ"),
        ));
    }
    let rq = match association::parse_request(&buf) {
        Ok(rq) => rq,
        Err(e) => {
            send(client, &pdu::abort(2)).await;
            return Err(Stop::new("protocol_error", e.to_string()));
        }
    };
    if rq.protocol_version & 1 == 0 {
        return Err(reject(
            client,
            Rejection::ProtocolVersion,
            "protocol version 1 not offered",
        )
        .await);
    }
    if rq.application_context_name.trim_end_matches('\0') != DICOM_APPLICATION_CONTEXT {
        return Err(reject(
            client,
            Rejection::ApplicationContext,
            "not the DICOM application context",
        )
        .await);
    }
    Ok(rq)
}

/// Phase: connect to the next hop, send it the (rewritten) request, and read its answer.
/// An A-ASSOCIATE-RJ or A-ABORT from it goes back to the client as it came; a hop that cannot be
/// reached or does not answer in time gets the client a 2/3/1 rejection.
pub(crate) async fn open_upstream<S, U>(
    client: &mut S,
    connect: impl std::future::Future<Output = Result<U, String>>,
    request: &[u8],
    within: Duration,
    what: &str,
) -> Result<(U, AssociationAC), Stop>
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = match connect.await {
        Ok(u) => u,
        Err(reason) => return Err(reject(client, Rejection::UpstreamUnavailable, reason).await),
    };
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
            let reason = format!("{what} failed during association: {e}");
            return Err(reject(client, Rejection::UpstreamUnavailable, reason).await);
        }
        Err(_) => {
            let reason = format!("{what} did not answer the association in time");
            return Err(reject(client, Rejection::UpstreamUnavailable, reason).await);
        }
    };
    match answer {
        Ok(UpstreamAnswer::Accepted(ac)) => Ok((upstream, ac)),
        Ok(UpstreamAnswer::Refused { pdu_type, bytes }) => {
            send(client, &bytes).await;
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
            Err(Stop::new("rejected_by_upstream", reason))
        }
        Err(e) => {
            send(&mut upstream, &pdu::abort(0)).await;
            Err(reject(
                client,
                Rejection::UpstreamUnavailable,
                format!("{what}: {e}"),
            )
            .await)
        }
    }
}

/// A TCP connection to `address` within `within`, with TCP_NODELAY.
pub(crate) async fn connect_tcp(
    address: &str,
    within: Duration,
    what: &str,
) -> Result<TcpStream, String> {
    match tokio::time::timeout(within, TcpStream::connect(address)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => {
            connect_failed(address);
            Err(format!("{what} {address} unreachable: {e}"))
        }
        Err(_) => {
            connect_failed(address);
            Err(format!("{what} {address} connect timed out"))
        }
    }
}

pub(crate) async fn reject<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    rejection: Rejection,
    reason: impl Into<String>,
) -> Stop {
    send(client, &rejection.pdu()).await;
    let (r, s, why) = rejection.codes();
    Stop::new("rejected", format!("{} ({r}/{s}/{why})", reason.into())).kind(rejection.name())
}

/// Best effort: a bounded write and close, for answers to peers we are about to drop.
/// After an A-ASSOCIATE-RJ or A-ABORT the requestor closes the connection (PS3.8 state Sta13);
/// closing first can reset the connection before the peer has read the answer.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Best effort: send a last PDU, wait (bounded) for the peer to close, then close.
pub(crate) async fn send<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        write_flush(stream, bytes).await?;
        let mut sink = [0u8; 512];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        stream.shutdown().await
    })
    .await;
}

/// Write a PDU to a peer that must take it within `within` (a peer that stops reading is not waited for).
pub(crate) async fn write_within<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    within: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(within, write_flush(stream, bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer did not take the A-ASSOCIATE-AC in time",
        )),
    }
}

pub(crate) async fn write_flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}
