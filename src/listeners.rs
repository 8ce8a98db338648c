//! The gateway's listening sockets, by configuration key: bound at start, and on reload opened,
//! moved or closed to match the new file. New sockets are bound before anything changes, so a
//! reload whose new address cannot be bound is refused whole (naming the listener) and the old
//! configuration and sockets stay as they were.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::gateway::{Gateway, ServerError};

/// One kind of listener, named after its configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `[gateway] listen`: DICOM over TLS.
    Dicom,
    /// `[gateway] device_listen`: plain DICOM for `[[device]]` entries.
    Device,
    /// `[gateway] return_listen`: the archive's C-MOVE sub-operations.
    Return,
    /// `[http] listen`: the DICOMweb door (HTTPS).
    Http,
    /// `[admin] listen`: /metrics, /healthz, /readyz.
    Admin,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Dicom,
        Kind::Device,
        Kind::Return,
        Kind::Http,
        Kind::Admin,
    ];

    /// The configuration key, as the log and the errors name it.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Dicom => "gateway.listen",
            Kind::Device => "gateway.device_listen",
            Kind::Return => "gateway.return_listen",
            Kind::Http => "http.listen",
            Kind::Admin => "admin.listen",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::Dicom => "DICOM TLS",
            Kind::Device => "plain DICOM, [[device]] entries only",
            Kind::Return => "C-MOVE return path, plain DICOM, for the archive",
            Kind::Http => "DICOMweb door, HTTPS",
            Kind::Admin => "admin endpoints: /metrics /healthz /readyz",
        }
    }

    /// The address this configuration wants for this listener, if any.
    pub fn address(self, config: &Config) -> Option<SocketAddr> {
        match self {
            Kind::Dicom => Some(config.gateway.listen),
            Kind::Device => config.gateway.device_listen,
            Kind::Return => config.gateway.return_listen,
            Kind::Http => config.http.as_ref().map(|h| h.listen),
            Kind::Admin => config.admin_listen,
        }
    }
}

/// A listener being served.
struct Running {
    kind: Kind,
    /// The configured address (what a reload compares).
    address: SocketAddr,
    /// The accept loop; aborting it closes the socket. Connections it accepted run on.
    task: JoinHandle<()>,
}

/// Sockets bound for a reload, not yet served: dropping this closes them again.
pub struct Plan {
    open: Vec<(Kind, SocketAddr, TcpListener)>,
    close: Vec<Kind>,
}

/// The listeners being served.
#[derive(Default)]
pub struct Listeners {
    running: Vec<Running>,
}

async fn bind(kind: Kind, address: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| ServerError::Listener {
            key: kind.key(),
            address,
            source,
        })
}

fn spawn(gateway: &Gateway, kind: Kind, listener: TcpListener) -> JoinHandle<()> {
    let g = gateway.clone();
    match kind {
        Kind::Dicom => tokio::spawn(async move { g.serve(listener, true).await }),
        Kind::Device => tokio::spawn(async move { g.serve(listener, false).await }),
        Kind::Return => tokio::spawn(crate::gateway::return_path::serve_return(g, listener)),
        Kind::Http => tokio::spawn(crate::web::serve(g, listener)),
        Kind::Admin => tokio::spawn(crate::admin::serve(g, listener)),
    }
}

impl Listeners {
    /// Bind every listener the running configuration names and serve them; the first that cannot
    /// be bound is the error (nothing is served then).
    pub async fn start(gateway: &Gateway) -> Result<Listeners, ServerError> {
        let state = gateway.current();
        let mut bound = Vec::new();
        for kind in Kind::ALL {
            if let Some(address) = kind.address(&state.config) {
                bound.push((kind, address, bind(kind, address).await?));
            }
        }
        let mut listeners = Listeners::default();
        for (kind, address, listener) in bound {
            listeners.serve(gateway, kind, address, listener);
        }
        Ok(listeners)
    }

    fn serve(&mut self, gateway: &Gateway, kind: Kind, address: SocketAddr, listener: TcpListener) {
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let state = gateway.current();
        let c = &state.config;
        match kind {
            Kind::Dicom => tracing::info!(
                listener = kind.key(),
                listen = %local,
                ae_title = ?c.gateway.ae_title,
                upstreams = c.upstreams.len(),
                users = c.users.len(),
                "pacsgate listening ({})", kind.what()
            ),
            _ => {
                tracing::info!(listener = kind.key(), listen = %local, "listener open ({})", kind.what())
            }
        }
        let task = spawn(gateway, kind, listener);
        self.running.push(Running {
            kind,
            address,
            task,
        });
    }

    /// The address a listener of this kind is served on now (as configured).
    pub fn address(&self, kind: Kind) -> Option<SocketAddr> {
        self.running
            .iter()
            .find(|r| r.kind == kind)
            .map(|r| r.address)
    }

    /// Bind what `config` adds or moves. Nothing is closed or served yet.
    pub async fn plan(&self, config: &Config) -> Result<Plan, ServerError> {
        let mut plan = Plan {
            open: Vec::new(),
            close: Vec::new(),
        };
        for kind in Kind::ALL {
            let now = self.address(kind);
            let next = kind.address(config);
            if now == next {
                continue;
            }
            if now.is_some() {
                plan.close.push(kind);
            }
            if let Some(address) = next {
                // On error the sockets bound so far close with `plan`.
                plan.open.push((kind, address, bind(kind, address).await?));
            }
        }
        Ok(plan)
    }

    /// Close what the plan closes, serve what it opens; one log line per listener that changed.
    pub fn apply(&mut self, gateway: &Gateway, plan: Plan) {
        for kind in &plan.close {
            let Some(i) = self.running.iter().position(|r| r.kind == *kind) else {
                continue;
            };
            let old = self.running.remove(i);
            old.task.abort();
            match plan.open.iter().find(|(k, ..)| k == kind) {
                Some((_, to, _)) => tracing::info!(
                    listener = kind.key(),
                    from = %old.address,
                    to = %to,
                    "listener moved: the old address is closed (connections accepted there run on)"
                ),
                None => tracing::info!(
                    listener = kind.key(),
                    address = %old.address,
                    "listener closed: removed from the configuration (connections accepted there run on)"
                ),
            }
        }
        for (kind, address, listener) in plan.open {
            self.serve(gateway, kind, address, listener);
        }
    }

    /// SIGHUP: load the file, bind the listeners it adds or moves, then put both in force; or refuse
    /// the reload (one ERROR line naming the problem) and change nothing.
    pub async fn reload(&mut self, gateway: &Gateway) {
        let next = match gateway.load_next() {
            Ok(next) => next,
            Err(e) => return gateway.refuse_reload(&e),
        };
        let plan = match self.plan(&next.config).await {
            Ok(plan) => plan,
            Err(e) => return gateway.refuse_reload(&e),
        };
        gateway.install(next);
        self.apply(gateway, plan);
    }

    /// Stop accepting on every listener but those in `keep` (shutdown keeps the return path open
    /// while moves in flight finish).
    pub fn close_except(&mut self, keep: &[Kind]) {
        self.running.retain(|r| {
            let stays = keep.contains(&r.kind);
            if !stays {
                r.task.abort();
            }
            stays
        });
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.close_except(&[]);
    }
}
