//! The running gateway: its [`State`] (replaced whole on reload), the accept loop, reload and drain.
//! One association's way through it is in [`associate`], the typed [`Stop`] and its one answer and
//! report in [`stop`], the C-MOVE return path in [`return_path`], the bounded TCP connect and write in
//! [`io`]; `pacsgate run` is assembled in the `service` module.

mod associate;
mod io;
pub mod return_path;
mod stop;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::audit::Audit;
use crate::auth::{self, Authenticator};
use crate::config::Config;
use crate::metrics::{OutcomeLabels, metrics};
use crate::moves::{DestinationConnectors, MovesInProgress};
use crate::policy::Limiter;
use crate::tls;

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
        tracing::info!(target: crate::logfmt::targets::SERVER, path = %path.display(),
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
        tracing::error!(target: crate::logfmt::targets::SERVER, path = %path, reason = %error, "configuration reload refused; the previous configuration stays in force");
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
            tracing::info!(target: crate::logfmt::targets::SERVER, associations = open,
                grace_s = grace.as_secs_f64(),
                "waiting for associations to finish"
            );
        }
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(target: crate::logfmt::targets::SERVER, associations = self.tasks.len(),
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
                    let accepted = associate::Accepted {
                        state: self.current(),
                        moves: self.moves.clone(),
                        stream,
                        peer,
                        tls,
                        pending: self.pending.clone(),
                        shutdown: self.abort.subscribe(),
                    };
                    // Admission (a bounded wait for a handshake slot) runs in the connection's own
                    // task: the accept loop never waits, so no address holds up another's accept.
                    self.tasks.spawn(associate::handle(accepted));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(target: crate::logfmt::targets::SERVER, reason = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

impl crate::admin::InForce for State {
    fn config(&self) -> &Config {
        &self.config
    }
    fn access(&self) -> &crate::admin::AdminAccess {
        &self.admin
    }
}

impl crate::admin::Running for Gateway {
    fn now(&self) -> Arc<dyn crate::admin::InForce> {
        self.current()
    }
    fn draining(&self) -> bool {
        self.tasks.is_closed()
    }
}

pub(crate) use crate::policy::limits::{Bounds, Cap, PendingConnections, PendingSlot};
pub(crate) use associate::{open_upstream, request_phase};
pub(crate) use io::{connect_tcp, send, write_within};
pub(crate) use stop::Stop;
