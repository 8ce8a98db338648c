//! The admin port (`[admin]`): `/metrics`, `/healthz`, `/readyz` over HTTP/1.1, kept from costing the doors:
//! at most `max_connections` served at once (more wait in the kernel's backlog, holding none of our file
//! descriptors), at most a quarter of them (at least 1) from one source address (more are closed at once),
//! one request per connection (`Connection: close`, no keep-alive), `header_timeout` per request head, a
//! lifetime per connection, nothing accepted while fewer than `fd_reserve` descriptors are free, optional
//! bearer-token or client-certificate auth for `/metrics`, and `/readyz` answered from a cached check (one
//! generic word; the details go to the log).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, Tls};
use crate::metrics::metrics;

/// The longest one admin connection lives (a scraper reconnects; an idle holder is let go).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How often `/readyz`'s check runs (each archive and the DICOMweb upstream get one TCP connect).
pub const READY_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest gap between two "not accepting: file descriptors" warnings.
const FD_WARN_EVERY: Duration = Duration::from_secs(10);

/// Why the `[admin]` access settings could not be loaded (at start or reload: fail closed).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin.bearer_token_file: cannot read {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin.bearer_token_file: {path} holds no token")]
    EmptyToken { path: PathBuf },
    #[error("admin.client_ca: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// What the admin port reads from the running gateway (`gateway::Gateway` implements it): this
/// module needs nothing else of the gateway's.
pub trait Running: Clone + Send + Sync + 'static {
    /// The configuration and admin access new connections are served with.
    fn now(&self) -> Arc<dyn InForce>;
    /// True once shutdown has begun (no new associations): `/readyz` answers "not ready".
    fn draining(&self) -> bool;
}

/// The configuration in force and the admin access loaded with it.
pub trait InForce: Send + Sync {
    fn config(&self) -> &Config;
    fn access(&self) -> &AdminAccess;
}

/// Who may read `/metrics`, and the TLS of the admin port; loaded with each configuration.
pub struct AdminAccess {
    /// SHA-256 of the bearer token (compared digest to digest; the token itself is not kept).
    token: Option<[u8; 32]>,
    /// With `client_ca`: the admin port's TLS (client certificates optional at the handshake).
    tls: Option<TlsAcceptor>,
}

impl AdminAccess {
    /// Read the token file and build the TLS config `[admin]` names (nothing when it names neither).
    pub fn load(config: &Config) -> Result<AdminAccess, AdminError> {
        let Some(admin) = &config.admin else {
            return Ok(AdminAccess {
                token: None,
                tls: None,
            });
        };
        let token = match &admin.bearer_token_file {
            None => None,
            Some(path) => Some(read_token(path)?),
        };
        let tls = match &admin.client_ca {
            None => None,
            Some(ca) => {
                let tls = Tls {
                    client_ca: Some(ca.clone()),
                    require_client_certificate: false,
                    client_crl: Vec::new(),
                    ..config.tls.clone()
                };
                Some(TlsAcceptor::from(crate::tls::server_config_for(
                    &tls,
                    crate::tls::Door::Web,
                )?))
            }
        };
        Ok(AdminAccess { token, tls })
    }

    fn open(&self) -> bool {
        self.token.is_none() && self.tls.is_none()
    }
}

fn read_token(path: &Path) -> Result<[u8; 32], AdminError> {
    let text = std::fs::read_to_string(path).map_err(|source| AdminError::Token {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(AdminError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    if let Some(warning) = crate::tls::key_permission_warning(path) {
        tracing::warn!(path = ?path.display().to_string(), "{}", warning.replace("private key", "admin token file"));
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

/// The last readiness check: `None` until the first one finished.
struct Readiness {
    ready: tokio::sync::watch::Sender<Option<bool>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            ready: tokio::sync::watch::channel(None).0,
        }
    }
}

impl Readiness {
    /// The cached result; before the first check has finished, wait for it (at most `within`).
    async fn get(&self, within: Duration) -> Option<bool> {
        let mut rx = self.ready.subscribe();
        let first = tokio::time::timeout(within, rx.wait_for(Option::is_some)).await;
        match first {
            Ok(Ok(v)) => *v,
            _ => None,
        }
    }
    fn set(&self, ready: bool) {
        self.ready.send_replace(Some(ready));
    }
}

/// Connections being served (in all and per source address), and a wake-up for the accept loop when one ends.
#[derive(Default)]
struct Active {
    count: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    ended: tokio::sync::Notify,
}

impl Active {
    /// Take a slot for a connection from `ip`, unless that address already holds `share` of them.
    fn take(self: &Arc<Self>, ip: IpAddr, share: usize) -> Option<ActiveSlot> {
        let mut per = self
            .per_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = per.entry(ip).or_insert(0);
        if *held >= share {
            return None;
        }
        *held += 1;
        self.count.fetch_add(1, Ordering::SeqCst);
        Some(ActiveSlot(self.clone(), ip))
    }
}

struct ActiveSlot(Arc<Active>, IpAddr);

impl Drop for ActiveSlot {
    fn drop(&mut self) {
        {
            let mut per = self
                .0
                .per_address
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(held) = per.get_mut(&self.1) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    per.remove(&self.1);
                }
            }
        }
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_one();
    }
}

/// The most admin connections one source address may hold: a quarter of `max_connections`, at least 1.
pub fn per_address_share(max_connections: usize) -> usize {
    (max_connections / 4).max(1)
}

/// The process's free file descriptors (soft `RLIMIT_NOFILE` minus those open), read from /proc;
/// `None` when there is no limit or /proc cannot say.
pub fn free_descriptors() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let soft: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
    Some(soft.saturating_sub(open))
}

/// The authority (`host:port`) of an `http://` or `https://` upstream URL, for a TCP connect.
fn authority(url: &str) -> Option<String> {
    let uri: hyper::Uri = url.parse().ok()?;
    let host = uri.host()?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// One readiness check: every archive (`[[upstream]]`) and the DICOMweb upstream (`[http] upstream`)
/// accept a TCP connection within `upstream_connect`, all at once. The problems, said in full (for the log).
async fn check_upstreams(config: &Config) -> Vec<String> {
    let within = config.timeouts.upstream_connect;
    let mut targets: Vec<(String, String)> = config
        .upstreams
        .iter()
        .map(|u| (format!("upstream {:?}", u.called_ae), u.address.clone()))
        .collect();
    if let Some(http) = &config.http {
        match authority(&http.upstream) {
            Some(a) => targets.push(("DICOMweb upstream (http.upstream)".to_string(), a)),
            None => {
                return vec![format!(
                    "DICOMweb upstream {:?} has no host to connect to",
                    http.upstream
                )];
            }
        }
    }
    let mut set = tokio::task::JoinSet::new();
    for (name, address) in targets {
        set.spawn(async move {
            match tokio::time::timeout(within, tokio::net::TcpStream::connect(&address)).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(format!("{name} at {address}: {e}")),
                Err(_) => Some(format!("{name} at {address}: no answer within {within:?}")),
            }
        });
    }
    let mut problems = Vec::new();
    while let Some(done) = set.join_next().await {
        match done {
            Ok(Some(p)) => problems.push(p),
            Ok(None) => {}
            Err(e) => problems.push(format!("readiness check failed: {e}")),
        }
    }
    problems.sort();
    problems
}

/// Check every `READY_INTERVAL`, keep the answer, log when it changes (what is wrong, in full).
async fn check_loop<G: Running>(gateway: G, readiness: Arc<Readiness>) {
    let mut last: Option<Vec<String>> = None;
    loop {
        let config = gateway.now().config().clone();
        let problems = check_upstreams(&config).await;
        readiness.set(problems.is_empty());
        if last.as_ref() != Some(&problems) {
            if problems.is_empty() {
                tracing::info!(
                    ready = true,
                    "readiness: every upstream accepts connections"
                );
            } else {
                tracing::warn!(ready = false, problems = ?problems, "readiness: not ready");
            }
            last = Some(problems);
        }
        tokio::time::sleep(READY_INTERVAL).await;
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// May this request read `/metrics`? Open when `[admin]` names no token and no client CA; else the
/// bearer token or a verified client certificate.
fn may_read_metrics(access: &AdminAccess, req: &Request<Incoming>, certificate: bool) -> bool {
    if access.open() || (access.tls.is_some() && certificate) {
        return true;
    }
    let Some(want) = access.token else {
        return false;
    };
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Some(offered) = value.to_str().ok().and_then(|v| {
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    }) else {
        return false;
    };
    let got: [u8; 32] = Sha256::digest(offered.as_bytes()).into();
    got == want
}

async fn answer<G: Running>(
    req: &Request<Incoming>,
    gateway: &G,
    access: &AdminAccess,
    readiness: &Readiness,
    certificate: bool,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            // Right after start the first check may still run: wait for it, within its own bound.
            let within = gateway.now().config().timeouts.upstream_connect + Duration::from_secs(1);
            if !gateway.draining() && readiness.get(within).await == Some(true) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => {
            if !may_read_metrics(access, req, certificate) {
                tracing::info!(peer = %peer, path = "/metrics", outcome = "rejected", reason = "no valid bearer token or client certificate", "admin request");
                let mut r = text(StatusCode::UNAUTHORIZED, "authentication required\n");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"pacsgate-admin\""),
                );
                return r;
            }
            let mut r = Response::new(Full::new(Bytes::from(metrics().encode())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serve one connection's request (HTTP/1.1, no keep-alive: the answer says `Connection: close` and the
/// connection ends), bounded by `header_timeout` for the request head and [`CONNECTION_LIFETIME`] in all.
async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static, G: Running>(
    io: S,
    gateway: G,
    readiness: Arc<Readiness>,
    header_timeout: Duration,
    certificate: bool,
    peer: SocketAddr,
) {
    let access_state = gateway.now();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (gateway, access_state, readiness) =
            (gateway.clone(), access_state.clone(), readiness.clone());
        async move {
            let response = answer(
                &req,
                &gateway,
                access_state.access(),
                &readiness,
                certificate,
                peer,
            )
            .await;
            let mut response = response;
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, served).await;
}

/// What `check` and the start say about `[admin]`: a port beyond loopback, louder when `/metrics`
/// is open to anyone who reaches it.
pub fn warnings(config: &Config) -> Vec<String> {
    let Some(admin) = &config.admin else {
        return Vec::new();
    };
    if admin.listen.ip().is_loopback() {
        return Vec::new();
    }
    vec![
        if admin.bearer_token_file.is_none() && admin.client_ca.is_none() {
            format!(
                "admin.listen {} is beyond loopback and /metrics is open to anyone who reaches it: set admin.bearer_token_file or admin.client_ca, or listen on 127.0.0.1",
                admin.listen
            )
        } else {
            format!(
                "admin.listen {} is beyond loopback (/metrics needs the bearer token or a client certificate; /healthz and /readyz answer anyone)",
                admin.listen
            )
        },
    ]
}

/// Serve the admin endpoints on `listener` until the task is dropped; the readiness check runs
/// alongside (and stops with it).
pub async fn serve<G: Running>(gateway: G, listener: TcpListener) {
    let readiness = Arc::new(Readiness::default());
    let checks = check_loop(gateway.clone(), readiness.clone());
    let accepting = accept_loop(gateway, listener, readiness);
    tokio::select! {
        () = checks => {}
        () = accepting => {}
    }
}

async fn accept_loop<G: Running>(gateway: G, listener: TcpListener, readiness: Arc<Readiness>) {
    let active = Arc::new(Active::default());
    let mut fd_warned: Option<Instant> = None;
    let mut backoff = Duration::from_millis(10);
    let mut share_warned: Option<Instant> = None;
    for warning in warnings(gateway.now().config()) {
        tracing::warn!("{warning}");
    }
    loop {
        let state = gateway.now();
        let Some(admin) = state.config().admin.clone() else {
            // Not configured (an embedder serving the port anyway): the defaults.
            return;
        };
        // The cap: wait for a connection to end before accepting (the rest wait in the backlog).
        if active.count.load(Ordering::SeqCst) >= admin.max_connections {
            let _ = tokio::time::timeout(Duration::from_secs(1), active.ended.notified()).await;
            continue;
        }
        // The reserve: while few descriptors are free, accept nothing; the doors need them.
        if let Some(free) = free_descriptors()
            && free < admin.fd_reserve
        {
            if fd_warned.is_none_or(|t| t.elapsed() >= FD_WARN_EVERY) {
                tracing::warn!(
                    free_descriptors = free,
                    fd_reserve = admin.fd_reserve,
                    "admin port: not accepting connections while fewer file descriptors are free than admin.fd_reserve"
                );
                fd_warned = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(reason = ?e.to_string(), "admin port: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let share = per_address_share(admin.max_connections);
        let Some(slot) = active.take(peer.ip(), share) else {
            // One address may not hold every slot: over its share, the connection is closed at once.
            if share_warned.is_none_or(|t| t.elapsed() >= FD_WARN_EVERY) {
                tracing::warn!(peer = %peer, outcome = "rejected", reason = "the address holds its share of admin connections", per_address = share, "admin connection");
                share_warned = Some(Instant::now());
            }
            drop(stream);
            continue;
        };
        let g = gateway.clone();
        let readiness = readiness.clone();
        let tls = state.access().tls.clone();
        let header_timeout = admin.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            connection(stream, peer, tls, g, readiness, header_timeout).await
        });
    }
}

/// One admin connection: the TLS handshake (when the port has TLS), then its requests.
async fn connection<G: Running>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    gateway: G,
    readiness: Arc<Readiness>,
    header_timeout: Duration,
) {
    let Some(acceptor) = tls else {
        return serve_connection(stream, gateway, readiness, header_timeout, false, peer).await;
    };
    let tls = match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = crate::tls::handshake_failure(&e);
            tracing::info!(peer = %peer, outcome = "tls_failed", reason = ?reason, "admin connection");
            return;
        }
        Err(_) => {
            tracing::info!(peer = %peer, outcome = "tls_failed", reason = "TLS handshake timed out", "admin connection");
            return;
        }
    };
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    serve_connection(tls, gateway, readiness, header_timeout, certificate, peer).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_give_a_host_and_port() {
        assert_eq!(
            authority("http://10.0.0.20:8042").as_deref(),
            Some("10.0.0.20:8042")
        );
        assert_eq!(
            authority("http://pacs:8042/dicom-web").as_deref(),
            Some("pacs:8042")
        );
        assert_eq!(
            authority("https://pacs.example").as_deref(),
            Some("pacs.example:443")
        );
        assert_eq!(
            authority("http://[::1]:8042").as_deref(),
            Some("[::1]:8042")
        );
        assert_eq!(authority("not a url"), None);
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_admin_slots() {
        assert_eq!(per_address_share(16), 4);
        assert_eq!(per_address_share(3), 1);
        let active = Arc::new(Active::default());
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let first = active.take(a, 2).expect("first");
        let _second = active.take(a, 2).expect("second");
        assert!(active.take(a, 2).is_none(), "over its share");
        let _other = active.take(b, 2).expect("another address");
        drop(first);
        let third = active.take(a, 2);
        assert!(third.is_some(), "a slot freed");
        assert_eq!(active.count.load(Ordering::SeqCst), 3);
        drop(third);
        assert_eq!(
            active.count.load(Ordering::SeqCst),
            2,
            "a dropped slot is given back"
        );
    }

    #[test]
    fn free_descriptors_reads_this_process() {
        let free = free_descriptors().expect("/proc/self/limits");
        assert!(free > 0);
    }
}
